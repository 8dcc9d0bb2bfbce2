"""Runtime state of one volume's head: its cache file, dirty map and copy-on-write saves."""

import contextlib
import logging
import os

import trio
import trio.lowlevel

from snapfs.errors import CacheSyncFailed
from snapfs.volume.catalog import SnapshotRow, VolumeRow
from snapfs.volume.files import Files
from snapfs.volume.inflight import InFlight

log = logging.getLogger("snapfs.engine")


class Dirty:
    """One dirty block of a head: the cache file holds a newer version than the committed
    tree. Its facts live in one record, so they cannot disagree (a block is dirty exactly
    while it has one)."""

    __slots__ = ("epoch", "gen", "hole", "new", "since", "synced", "touched")

    def __init__(self, epoch: int, gen: int, now: float = 0.0, synced: bool = False) -> None:
        self.epoch = epoch  # the volume's epoch at its last write
        self.gen = gen  # the engine's write generation then (a write during an upload)
        self.touched = now  # trio time of its last write (0: dirty since before this mount)
        self.since = now  # trio time it became dirty, as far as the store is concerned
        self.synced = synced  # its dirty row is committed (the rows are what a crash keeps)
        # Discarded (its cache range punched, it reads as zeros): whether the committed tree
        # maps it (the next flush unmaps it); None for written data.
        self.hole: bool | None = None
        self.new = False  # written data the committed tree does not map (allocated space)

    def __repr__(self) -> str:
        return f"Dirty(epoch={self.epoch}, gen={self.gen}, synced={self.synced}, hole={self.hole})"


class Head:
    """Runtime state of one volume's head: its cache file, dirty map and frozen saves."""

    def __init__(self, row: VolumeRow, cache_dir: str, files: Files) -> None:
        self.row = row
        base = os.path.join(cache_dir, f"vol-{row.id}")
        self.cache_path, self.frozen_path = base + ".cache", base + ".frozen"
        self.cache = files.open(self.cache_path, row.size)
        self.saves = files.open(self.frozen_path)  # copy-on-write saves, one slot a block
        self.dirty: dict[int, Dirty] = {}  # blk → its record, while the cache is newer
        self.frozen: dict[int, dict[int, int]] = {}  # snapshot epoch → {blk → slot}
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.pending: list[SnapshotRow] = []  # snapshots in creating/deleting, by epoch
        self.opens = 0
        self.write_lock = trio.Lock()
        self.fetching = InFlight()
        self.mapped = 0  # blocks the committed tree maps to data
        # Why an fdatasync of the cache file failed, once one did: from then on every sync
        # of the volume fails (the kernel may have dropped pages it could not write back;
        # a later fdatasync that succeeds says nothing about them) until it is remounted.
        self.sync_error: str | None = None

    @property
    def bs(self) -> int:
        return self.row.block_size

    @property
    def nblocks(self) -> int:
        return -(-self.row.size // self.row.block_size)

    def blen(self, blk: int) -> int:
        return min(self.bs, self.row.size - blk * self.bs)

    async def datasync(self) -> None:
        """Make the cache file's writes durable, or raise CacheSyncFailed, then and at every
        later call (the PostgreSQL "fsyncgate" lesson)."""
        if self.sync_error is None:
            try:
                await self.cache.datasync()
                return
            except OSError as exc:
                self.sync_error = exc.strerror or str(exc)
                log.error("%s: fdatasync failed: %s", self.cache_path, self.sync_error)
        raise CacheSyncFailed(
            f"volume {self.row.name!r}: writing its cache file back failed "
            f"({self.sync_error}); its unsynced writes may be lost: remount to recover"
        )

    def close(self) -> None:
        self.cache.close()
        self.saves.close()

    def remove_files(self) -> None:
        for path in (self.cache_path, self.frozen_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
