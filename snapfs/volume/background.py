"""The background flusher: the loop that flushes, publishes, collects, runs gc and sweeps.

owns: the wake-up call (`Wakeup`, which every component kicks when it leaves work) and the
record of the loop's failures (how many, the last one).
does not own: what a round does (`Committer.flush_once`, `Collector.collect`, `gc`,
`sweep_orphans`), nor whether this writer may still write (`Fence`).
"""

import logging

import trio
import trio.lowlevel

from snapfs.chunks import ChunkStore
from snapfs.errors import SnapfsError
from snapfs.volume.base import EngineConfig, Wakeup
from snapfs.volume.collector import Collector
from snapfs.volume.fence import Fence
from snapfs.volume.flusher import Committer
from snapfs.volume.refcounts import Refcounts

log = logging.getLogger("snapfs.engine")


class Background:
    def __init__(
        self,
        committer: Committer,
        collector: Collector,
        chunks: ChunkStore,
        refs: Refcounts,
        fence: Fence,
        config: EngineConfig,
        commit_lock: trio.Lock,
        wake: Wakeup,
    ) -> None:
        self.committer = committer
        self.collector = collector
        self.chunks = chunks
        self.refs = refs
        self.fence = fence
        self.config = config
        self.commit_lock = commit_lock
        self.wake = wake
        self.flush_errors = 0
        self.last_error: str | None = None

    def statistics(self) -> dict:
        return {"flush_errors": self.flush_errors, "last_error": self.fence.lost or self.last_error}

    async def run_flusher(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background task: every `flush_delay` (at once when kicked), flush the blocks left
        alone for `flush_delay` or dirty for `flush_max_age`. Cycles follow each other
        without a pause only while there is a backlog (a full batch or a pending
        snapshot): under steady writes, blocks that settle meanwhile wait for the next tick
        instead of making a commit each (every commit has fixed costs: barriers, a catalog
        transaction and a publish).
        Store errors are logged and retried with backoff; cancellation stops it between
        cycles (the final flush is `close()`'s, shielded)."""
        task_status.started()
        backoff = 1.0
        while True:
            await self.wake.wait(min(self.config.flush_delay, self.config.flush_max_age))
            try:
                await self._round()
                backoff = 1.0
            except Exception as exc:  # the daemon must outlive any failure of a cycle
                self.flush_errors += 1
                self.last_error = str(exc) or exc.__class__.__name__
                if isinstance(exc, SnapfsError):
                    log.warning("flush failed, retrying in %.0fs: %s", backoff, exc)
                else:
                    log.exception("flush failed unexpectedly, retrying in %.0fs", backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _round(self) -> None:
        """Flush what settled (on and on while there is a backlog), publish and collect
        what is pending, delete what is due, gc sparse packs, sweep orphans when due."""
        config = self.config
        while (
            await self.committer.flush_once(
                min_age=config.flush_delay, max_age=config.flush_max_age
            )
            and self.committer.backlog
        ):
            await trio.lowlevel.checkpoint()
        if not self.fence.lost and (not self.fence.up_to_date() or self.refs.queued(1)):
            async with self.commit_lock:
                await self.committer.publish()
                await self.collector.collect()
        due = self.fence.next_due()
        if due is not None and due <= config.clock() and not self.fence.lost:
            async with self.commit_lock:  # garbage whose grace period is over
                await self.collector.collect()
        if not self.fence.lost and self.chunks.sparse_packs(config.gc_threshold):
            await self.collector.gc()  # background gc: work follows the garbage
        if self.collector.sweep_due() and not self.fence.lost:
            await self.collector.sweep_orphans()
