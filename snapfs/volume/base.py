"""What the engine's components share: configuration, the statistics record, the wake-up
call of the background flusher."""

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

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


class Wakeup:
    """The background flusher's wake-up call: any component that leaves work for it
    (dirty room wanted, a snapshot taken, a queue of dropped trees left) calls `kick`;
    the flusher waits on it between its rounds."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def kick(self) -> None:
        self._event.set()

    async def wait(self, at_most: float) -> None:
        """Until kicked or `at_most` seconds passed; then the next kick is a new one."""
        with trio.move_on_after(at_most):
            await self._event.wait()
        self._event = trio.Event()


@functools.lru_cache(maxsize=64)
def zeros(n: int) -> bytes:
    """`n` zero bytes, shared (reads of holes, the all-zero block test)."""
    return bytes(n)
