"""Runtime state of one volume's head: its cache file, dirty map and copy-on-write saves."""

import contextlib
import logging
import os

import trio
import trio.lowlevel

from snapfs.errors import CacheSyncFailed
from snapfs.volume.cache import CacheSpace, Dirty, VolumeCache
from snapfs.volume.catalog import Catalog, SnapshotRow, VolumeRow
from snapfs.volume.files import BlockFile, Files
from snapfs.volume.inflight import InFlight
from snapfs.volume.saves import CowSaves

log = logging.getLogger("snapfs.engine")


class Head:
    """Runtime state of one volume's head: its cache file, dirty map and frozen saves."""

    def __init__(
        self, row: VolumeRow, cache_dir: str, files: Files, space: CacheSpace, catalog: Catalog
    ) -> None:
        self.row = row
        base = os.path.join(cache_dir, f"vol-{row.id}")
        self.cache_path, self.frozen_path = base + ".cache", base + ".frozen"
        self.cache = files.open(self.cache_path, row.size)
        self.blocks = VolumeCache(space, row, self.cache)  # which blocks the file holds
        # Copy-on-write saves for pending snapshots, one slot a block.
        self.saves = CowSaves(
            files.open(self.frozen_path), catalog, row.id, row.block_size, space, self.datasync
        )
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
    def dirty(self) -> dict[int, Dirty]:
        """The dirty records, to read (`blocks` changes them)."""
        return self.blocks.dirty

    @property
    def bs(self) -> int:
        return self.row.block_size

    @property
    def nblocks(self) -> int:
        return -(-self.row.size // self.row.block_size)

    def blen(self, blk: int) -> int:
        return min(self.bs, self.row.size - blk * self.bs)

    async def datasync(self, file: BlockFile | None = None) -> None:
        """Make the writes to the cache file (or to `file`, the saves file) durable, or
        raise CacheSyncFailed, then and at every later sync of the volume: the PostgreSQL
        "fsyncgate" lesson (a failed fdatasync may have dropped the pages it could not
        write, and a later one that succeeds says nothing of them)."""
        file = file or self.cache
        if self.sync_error is None:
            try:
                await file.datasync()
                return
            except OSError as exc:
                self.sync_error = exc.strerror or str(exc)
                log.error("%s: fdatasync failed: %s", file.path, self.sync_error)
        raise CacheSyncFailed(
            f"volume {self.row.name!r}: writing its cache files back failed "
            f"({self.sync_error}); its unsynced writes may be lost: remount to recover"
        )

    def close(self) -> None:
        """The volume is gone from this engine (deleted, or the engine closes): its blocks
        and saves take no room in the cache any more."""
        self.blocks.close()
        self.cache.close()
        self.saves.close()

    def remove_files(self) -> None:
        for path in (self.cache_path, self.frozen_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
