"""Runtime state of one volume's head: its cache file, dirty map and copy-on-write saves."""

import contextlib
import ctypes
import logging
import os

import trio
import trio.lowlevel

from snapfs.volume.catalog import SnapshotRow, VolumeRow
from snapfs.volume.inflight import InFlight

log = logging.getLogger("snapfs.engine")


_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        os.pwrite(fd, bytes(length), offset)  # filesystems without hole punching


class Head:
    """Runtime state of one volume's head: its cache file, dirty map and frozen saves."""

    def __init__(self, row: VolumeRow, cache_dir: str) -> None:
        self.row = row
        base = os.path.join(cache_dir, f"vol-{row.id}")
        self.cache_path, self.frozen_path = base + ".cache", base + ".frozen"
        self.cache_fd = os.open(self.cache_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.cache_fd, row.size)
        self.frozen_fd = os.open(self.frozen_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.dirty: dict[int, int] = {}  # blk → epoch of its last write
        self.gen: dict[int, int] = {}  # blk → write generation (detects writes during upload)
        self.touched: dict[int, float] = {}  # blk → trio time of its last write
        self.since: dict[int, float] = {}  # blk → trio time it became dirty
        self.unsynced: set[int] = set()  # dirty blocks whose dirty row is not yet committed
        self.frozen: dict[int, dict[int, int]] = {}  # snapshot epoch → {blk → slot}
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.pending: list[SnapshotRow] = []  # snapshots in creating/deleting, by epoch
        self.opens = 0
        self.write_lock = trio.Lock()
        self.fetching = InFlight()
        self.mapped = 0  # blocks the committed tree maps to data
        self.dirty_new: set[int] = set()  # dirty blocks the committed tree does not map
        self.holes: dict[int, bool] = {}  # discarded dirty blocks → the committed tree maps it

    @property
    def bs(self) -> int:
        return self.row.block_size

    @property
    def nblocks(self) -> int:
        return -(-self.row.size // self.row.block_size)

    def blen(self, blk: int) -> int:
        return min(self.bs, self.row.size - blk * self.bs)

    def close(self) -> None:
        os.close(self.cache_fd)
        os.close(self.frozen_fd)

    def remove_files(self) -> None:
        for path in (self.cache_path, self.frozen_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
