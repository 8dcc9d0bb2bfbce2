"""A store in a local directory: the embedded default.

put writes a temporary file, fdatasyncs it in its worker thread (puts run eight at a time,
so the syncs overlap) and renames it into place, so a key holds all of its bytes or none.
`barrier()` then fsyncs the directories that gained entries since the last barrier, which
makes the renames durable; the layers above call it before publishing. (It used to call
syncfs(2), which also wrote out every other dirty page of the filesystem: with the cache
on the same disk, a flush wrote each block twice before it could publish.)
"""

import contextlib
import errno
import os
import secrets
import threading

import trio

from snapfs.errors import AlreadyExists, ObjectNotFound, StoreError
from snapfs.store.base import Bodies, Ranges, Store, check_key


class LocalStore(Store):
    def __init__(self, root: str, threads: int = 8) -> None:
        self.root = os.path.abspath(root)
        self.url = f"file://{self.root}"
        self._limiter = trio.CapacityLimiter(threads)
        self.puts = 0
        self.bytes_put = 0
        self._new_entries: set[str] = set()  # directories to fsync at the next barrier
        self._entries_lock = threading.Lock()  # puts add to it from worker threads

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
            parent = os.path.dirname(path)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                self._makedirs(parent)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if not exclusive:
                os.rename(tmp, path)
                self._entry_changed(parent)
                return
            try:
                os.link(tmp, path)  # atomic: fails when the key exists
                self._entry_changed(parent)
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

    def _makedirs(self, path: str) -> None:
        """Create path and its missing parents; each new entry is fsynced at the barrier."""
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(new)
            self._entry_changed(os.path.dirname(new))

    def _entry_changed(self, directory: str) -> None:
        """Called after (never before) an entry of `directory` changed: the next barrier
        fsyncs it. A barrier that runs before the change cannot have taken it."""
        with self._entries_lock:
            self._new_entries.add(directory)

    async def barrier(self) -> None:
        """Every put that returned is durable: its data was fdatasynced by the put; fsync
        the directories whose new entries are not yet."""
        with self._entries_lock:
            todo, self._new_entries = self._new_entries, set()

        def sync() -> None:
            for path in sorted(todo, key=len, reverse=True):  # deepest first
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

        try:
            await self._run(sync)
        except BaseException:
            with self._entries_lock:
                self._new_entries |= todo
            raise


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
