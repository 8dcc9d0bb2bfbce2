"""The local data files of a volume head: its cache file and its copy-on-write saves.

Every byte the engine writes to them, and every fdatasync, goes through `BlockFile`, so that
what is durable is decided in one place: a simulation swaps in files that drop every write
not fdatasynced when it crashes the engine (tests/sim). The FUSE layer splices replies from
`fd` directly (reads only).
"""

import ctypes
import os

import trio

_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


class BlockFile:
    """A sparse local file; writes are durable only after `datasync()` returns."""

    def __init__(self, path: str, size: int | None = None) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if size is not None:
            os.ftruncate(self.fd, size)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data, offset: int) -> None:
        os.pwrite(self.fd, data, offset)

    def punch(self, offset: int, length: int) -> None:
        """Make the range read as zeros and give its space back."""
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            os.pwrite(self.fd, bytes(length), offset)  # filesystems without hole punching

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    async def datasync(self) -> None:
        """fdatasync in a worker thread. Cancelled: the sync may or may not have happened."""
        await trio.to_thread.run_sync(os.fdatasync, self.fd)

    def close(self) -> None:
        os.close(self.fd)


class Files:
    """Opens a head's files; tests pass a subclass that opens simulated ones."""

    def open(self, path: str, size: int | None = None) -> BlockFile:
        return BlockFile(path, size)
