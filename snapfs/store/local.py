"""A store in a local directory: the embedded default.

put writes a temporary file and renames it into place, so a key holds all of its bytes or
none. Durability is batched: `barrier()` calls syncfs(2) on the store's filesystem once,
instead of one fsync per object, and the layers above call it before publishing.
"""

import contextlib
import ctypes
import errno
import os
import secrets

import trio

from snapfs.errors import AlreadyExists, ObjectNotFound, StoreError
from snapfs.store.base import Bodies, Ranges, Store, check_key

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LocalStore(Store):
    def __init__(self, root: str, threads: int = 8) -> None:
        self.root = os.path.abspath(root)
        self.url = f"file://{self.root}"
        self._limiter = trio.CapacityLimiter(threads)
        self.puts = 0
        self.bytes_put = 0

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    async def _run(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreError(f"{self.url}: {exc.strerror or exc}") from None

    async def put(self, key: str, data: bytes) -> None:
        await self._put(key, data, exclusive=False)

    async def put_new(self, key: str, data: bytes) -> None:
        await self._put(key, data, exclusive=True)

    async def _put(self, key: str, data: bytes, exclusive: bool) -> None:
        path = self._path(key)

        def write() -> None:
            tmp = f"{path}.tmp-{secrets.token_hex(4)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            if not exclusive:
                os.rename(tmp, path)
                return
            try:
                os.link(tmp, path)  # atomic: fails when the key exists
            except FileExistsError:
                with open(path, "rb") as f:
                    if f.read() != bytes(data):
                        raise AlreadyExists(
                            f"{self.url}/{key}: already written by another writer"
                        ) from None
            finally:
                os.unlink(tmp)

        await self._run(write)
        self.puts += 1
        self.bytes_put += len(data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            return await self._run(_read_range, path, offset, length)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{key}: not found") from None

    async def get_ranges(self, ranges: Ranges) -> Bodies:
        """All in one trip to a worker thread (read-ahead asks for many small ranges)."""
        paths = [(self._path(key), offset, length) for key, offset, length in ranges]

        def read_all() -> Bodies:
            out = []
            for i, (path, offset, length) in enumerate(paths):
                try:
                    out.append(_read_range(path, offset, length))
                except FileNotFoundError:
                    raise ObjectNotFound(f"{self.url}/{ranges[i][0]}: not found") from None
            return out

        return await self._run(read_all)

    async def head(self, key: str) -> int | None:
        path = self._path(key)
        try:
            return (await self._run(os.stat, path)).st_size
        except FileNotFoundError:
            return None

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            await self._run(os.unlink, path)

    async def list(self, prefix: str = "") -> list[str]:
        def walk() -> list[str]:
            keys = []
            # Only the directory the prefix names: listing catalog/ must not walk every pack.
            top = os.path.join(self.root, prefix.rpartition("/")[0])
            for dirpath, _dirs, files in os.walk(top):
                rel = os.path.relpath(dirpath, self.root)
                for name in files:
                    if ".tmp-" in name:
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
            return sorted(keys)

        return await self._run(walk)

    async def barrier(self) -> None:
        def sync() -> None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _syncfs(fd)
            finally:
                os.close(fd)

        await self._run(sync)


def check_local_root(path: str) -> None:
    if not os.path.isabs(path):
        raise StoreError(f"file:// store path must be absolute: {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"{path}: {os.strerror(errno.ENOTDIR)}")


def _read_range(path: str, offset: int, length: int | None) -> bytes:
    fd = os.open(path, os.O_RDONLY)  # no buffered file object: one pread, no copy
    try:
        pos = offset
        end = os.fstat(fd).st_size if length is None else offset + length
        parts = []
        while pos < end:  # a pread may return less than asked
            part = os.pread(fd, end - pos, pos)
            if not part:
                break
            parts.append(part)
            pos += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)
