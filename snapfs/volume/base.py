"""Engine state shared by its parts: configuration, statistics record, caches and helpers."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
import trio.lowlevel

from snapfs.chunks import ChunkStore
from snapfs.errors import (
    CatalogFailed,
    NotFound,
    ReadOnly,
)
from snapfs.store.base import Store
from snapfs.tree import TreeReader
from snapfs.volume.cache import CacheSpace
from snapfs.volume.catalog import Catalog, SnapshotRow
from snapfs.volume.chunkcache import ChunkCache
from snapfs.volume.fence import Fence
from snapfs.volume.files import Files
from snapfs.volume.head import Head
from snapfs.volume.inflight import InFlight
from snapfs.volume.readahead import ReadAhead
from snapfs.volume.refcounts import Refcounts

log = logging.getLogger("snapfs.engine")


DEFAULT_BLOCK_SIZE = 128 << 10


@dataclass
class EngineConfig:
    cache_size: int = 2 << 30
    dirty_fraction: float = 0.5
    # Write-back: a dirty block goes to the store once left alone for flush_delay seconds
    # (hot blocks are rewritten in the cache, not uploaded again and again), and at the
    # latest flush_max_age seconds after it became dirty, however hot (a bound on what a
    # lost machine loses; fsync and snapshots are durable at once regardless).
    flush_delay: float = 5.0
    flush_max_age: float = 30.0
    uploads: int = 8
    batch_bytes: int = 256 << 20  # dirty blocks per flush commit
    slice_bytes: int = 16 << 20  # a commit holds two slices in memory (one hashed, one uploading)
    pack_size: int = 4 << 20
    gc_threshold: float = 0.5  # rewrite packs whose live share fell below this
    # Dropped trees are expanded a batch of `drop_batch` nodes per transaction (each holds
    # at most drop_batch * 256 decrements in memory), up to `drop_batches` batches per
    # collect; the flusher comes back for the rest (sync expands them all).
    drop_batch: int = 256
    drop_batches: int = 16
    readahead_bytes: int = 4 << 20  # fetched ahead of a sequential reader (0: off)
    # Store objects no longer needed are deleted this long after the catalog or index that
    # stopped needing them was published (read-only mounts and reads in flight finish).
    grace: float = 600.0
    refresh: float = 30.0  # a read-only engine follows the writer's catalog this often
    clock: Callable[[], float] = time.time  # this host's clock, for grace periods


@dataclass(frozen=True)
class EngineStatistics:
    volumes: int
    snapshots: int
    dirty_bytes: int
    cached_bytes: int
    frozen_bytes: int
    stored_bytes: int
    stored_data_bytes: int
    stored_objects: int
    uploaded_bytes: int
    discarded_bytes: int
    orphans_removed: int
    uploaded_objects: int
    uploading_objects: int  # blobs staged for a pack PUT that has not succeeded yet
    deduplicated_blocks: int
    fetched_blocks: int
    catalog_seq: int
    published_seq: int
    flush_errors: int
    last_error: str | None
    packs: int
    pack_bytes: int
    live_bytes: int
    index_fragments: int
    lease_lost: str | None


class EngineBase:
    """The engine's state and the small helpers every part of it uses. The parts are
    mixins over it: `Flusher` (commits to the store), `Maintenance` (background loop, gc,
    checks), `DataPath` (reads, writes, discards) and `Engine` (lifecycle, volumes,
    snapshots)."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        cache_dir: str,
        config: EngineConfig,
        read_only: bool = False,
        files: Files | None = None,
    ):
        self.read_only = read_only
        self.files = files or Files()
        self.fence = Fence(store, catalog, read_only, config.grace, config.clock, config.uploads)
        self.store = store
        self.chunks = ChunkStore(store, catalog.db, config.pack_size, config.uploads)
        self.tree = TreeReader(self.chunks)
        self.refs = Refcounts(catalog, self.tree)  # counts of stored objects
        self.catalog = catalog
        self.cache_dir = cache_dir
        self.config = config
        self.heads: dict[str, Head] = {}
        self.space = CacheSpace(config.cache_size, config.dirty_fraction)  # the block cache
        self.commit_lock = trio.Lock()
        self.gen = 0
        self.snap_opens: dict[int, int] = {}
        self.discarded_bytes = 0
        self.orphans_removed = 0
        self.sweep_needed = False  # a cycle failed after uploading, or a crash: sweep
        self.deduplicated = 0
        self.fetched = 0
        self.flush_errors = 0
        self.last_error: str | None = None
        self._kick = trio.Event()
        self._backlog = False  # the last flush cycle left work behind (a full batch)
        self._zero: dict[int, bytes] = {}
        self.readahead = ReadAhead(config.readahead_bytes, config.uploads)
        self.snap_cache = ChunkCache(2 * config.readahead_bytes + (4 << 20))
        self._snap_fetching = InFlight()

    # ------------------------------------------------------------------ helpers

    def head(self, name: str) -> Head:
        head = self.heads.get(name)
        if head is None:
            raise NotFound(f"volume {name!r} not found")
        return head

    def snapshot_row(self, volume: str, name: str) -> SnapshotRow:
        snap = self.catalog.snapshot(volume, name)
        if snap is None or snap.state == "deleting":
            if volume not in self.heads and not self.catalog.snapshots(volume):
                raise NotFound(f"volume {volume!r} not found")
            raise NotFound(f"snapshot {volume}@{name} not found")
        return snap

    def _zeros(self, n: int) -> bytes:
        z = self._zero.get(n)
        if z is None:
            z = self._zero[n] = bytes(n)
        return z

    def evict_all(self) -> None:
        """Drop every clean cached block (tests use it to force reads from the store)."""
        self.space.evict(limit=0)

    def writable(self) -> None:
        """Raise ReadOnly on a read-only mount, or after this writer lost the store."""
        if self.read_only:
            raise ReadOnly("this mount is read-only")
        if self.lease_lost:
            raise ReadOnly(f"this writer lost the store ({self.lease_lost}): remount")
        if self.catalog.failed:
            raise CatalogFailed(f"the local catalog failed ({self.catalog.failed}): remount")

    @property
    def lease_lost(self) -> str | None:
        """Why this writer lost the store (the fence owns it), or None."""
        return self.fence.lost

    def lost(self, reason: str) -> None:
        """This writer no longer owns the store: keep the cache, publish and delete nothing,
        refuse snapshots until remounted."""
        if not self.fence.lost:
            self.fence.mark_lost(reason)
            self.last_error = reason

    def kick(self) -> None:
        self._kick.set()
