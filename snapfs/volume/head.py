"""Runtime state of one volume's head: its cache file, dirty map and copy-on-write saves."""

import contextlib
import logging
import os

import trio
import trio.lowlevel

from snapfs.errors import CacheSyncFailed, NotFound
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
        self.catalog = catalog
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
        self.gen = 0  # write generation: bumped at every change of a block's dirty record
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

    def next_gen(self) -> int:
        """A new write generation (a commit leaves a block dirty that was written again,
        with a newer generation, after the commit read it)."""
        self.gen += 1
        return self.gen

    async def persist_dirty(self) -> None:
        """Sync the cache file, then commit the rows of the dirty blocks that have none yet.
        A block is `synced` only once its row is in: at every await, each dirty block has
        a row or is not synced. A block written again during the sync keeps the row (it is
        dirty, in the same epoch); its new bytes wait for the next sync."""
        todo = self.blocks.unsynced()
        await self.datasync()
        rows = [(blk, self.dirty[blk].epoch) for blk in todo if blk in self.dirty]
        with self.catalog.transaction():
            self.catalog.set_dirty(self.row.id, rows)
        self.blocks.mark_synced(todo)

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


def find_head(heads: dict[str, Head], name: str) -> Head:
    """The head of volume `name`; NotFound when there is none."""
    head = heads.get(name)
    if head is None:
        raise NotFound(f"volume {name!r} not found")
    return head


def find_snapshot(catalog: Catalog, heads: dict[str, Head], volume: str, name: str) -> SnapshotRow:
    """Snapshot volume@name (not one being deleted); NotFound naming what is missing."""
    snap = catalog.snapshot(volume, name)
    if snap is None or snap.state == "deleting":
        if volume not in heads and not catalog.snapshots(volume):
            raise NotFound(f"volume {volume!r} not found")
        raise NotFound(f"snapshot {volume}@{name} not found")
    return snap
