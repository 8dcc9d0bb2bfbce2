"""The collector: what no catalog needs any more leaves the store, and only through the fence.

owns: the orphan sweep's state (whether a sweep is needed, when the orphans it remembered
are due, how many it removed).
does: `collect` after every commit (expand the queue of dropped trees in batches, release
dead blobs from the index, delete the store objects whose grace period is over), `gc`
(rewrite sparse packs, fold index fragments), `sweep_orphans` (what a failed cycle left).
does not own: the refcounts (`Refcounts`), the garbage table's grace periods and every
delete (`Fence`: it deletes only while this writer holds the store, a grace period after
the catalog without the object is out), the packs and the index (`ChunkStore`).

Every step goes through a table (`drops`, `garbage`), so a crash in between only repeats or
continues it. Every method but `statistics` is called with `commit_lock` held or takes it.
"""

import logging
from collections.abc import Callable

import trio

from snapfs.chunks import ChunkStore, fragment_key
from snapfs.volume.base import EngineConfig
from snapfs.volume.catalog import BLOB_KINDS, Catalog
from snapfs.volume.check import K_FRAG, K_PACK
from snapfs.volume.fence import STORE_KINDS, Fence
from snapfs.volume.publish import publish_catalog
from snapfs.volume.refcounts import Refcounts

log = logging.getLogger("snapfs.engine")

RELEASE_SLICE = 16384  # dead blobs released from the index per transaction


class Collector:
    def __init__(
        self,
        catalog: Catalog,
        chunks: ChunkStore,
        refs: Refcounts,
        fence: Fence,
        config: EngineConfig,
        commit_lock: trio.Lock,
        kick: Callable[[], None],
    ) -> None:
        self.store = fence.store
        self.catalog = catalog
        self.chunks = chunks
        self.refs = refs
        self.fence = fence
        self.config = config
        self.commit_lock = commit_lock
        self.kick = kick
        self.sweep_needed = False  # a cycle failed after uploading, or a crash: sweep
        self.sweep_at = 0.0  # when the orphans the last sweep remembered are due (clock)
        self.orphans_removed = 0

    def cycle_failed(self) -> None:
        """A cycle failed after it may have uploaded something (store error, crash,
        cancellation): its packs are orphans for the sweep."""
        self.sweep_needed = True

    def sweep_due(self) -> bool:
        return self.sweep_needed and self.config.clock() >= self.sweep_at

    def statistics(self) -> dict:
        return {"orphans_removed": self.orphans_removed}

    async def publish(self) -> None:
        await publish_catalog(self.fence, self.catalog, self.chunks)

    # ------------------------------------------------------------------ collect

    async def collect(self, drain: bool = False) -> None:
        """Once a catalog without them is out: expand up to `drop_batches` batches of the
        queue of dropped trees (all of it with `drain`; the flusher is kicked for the rest)
        and release the garbage each round makes, then delete the queued store objects
        whose grace period is over. Called with commit_lock held."""
        if self.fence.read_only or not self.fence.up_to_date():
            return
        while True:
            left = await self._expand(self.config.drop_batches)
            if not (left and drain):
                break
            self._release_blobs()
        if left:
            self.kick()
        await self._release_garbage()

    async def expand_drops(self, batches: int | None = 1) -> int:
        """Expand `batches` batches of the queue of dropped trees now (None: all of it;
        the flusher does it in the background), once every change is published, and
        release the garbage. Returns how many nodes are left on the queue. Store errors
        propagate (what was expanded stays)."""
        self.fence.writable()
        async with self.commit_lock:
            await self.publish()
            if self.fence.up_to_date():
                await self._expand(batches)
                await self._release_garbage()
            return len(self.refs.queued())

    async def _release_garbage(self) -> None:
        """Release the dead blobs, then delete the queued store objects whose grace period
        is over. Only once every change is published (`collect`'s guard)."""
        self._release_blobs()
        await self.fence.delete_due()

    def _release_blobs(self) -> None:
        """Drop dead blobs from the index (their packs lose live bytes) and queue packs with
        nothing live left, `RELEASE_SLICE` blobs a transaction (a dropped tree's garbage can
        be large); the first also stamps the store objects queued before their change was
        published."""
        while True:
            blobs = self.catalog.garbage(BLOB_KINDS, RELEASE_SLICE)
            if not blobs and not self.catalog.unstamped_garbage(STORE_KINDS):
                return
            with self.catalog.transaction():
                self.fence.published_now()
                empty = self.chunks.release(blobs)
                self.catalog.forget_garbage(blobs)
                self.fence.queue(K_PACK + pid for pid in empty)
            if len(blobs) < RELEASE_SLICE:
                return

    async def _expand(self, batches: int | None) -> bool:
        """Expand the queue of dropped nodes, `batches` batches of `drop_batch` nodes (None:
        until it is empty), each one transaction that decrements the children and takes the
        nodes off the queue. Returns whether nodes are left. A node read that fails raises;
        what was expanded before stays."""
        done = 0
        while batches is None or done < batches:
            keys, deltas = await self.refs.plan_expand(self.config.drop_batch)
            if not keys:
                return False
            with self.catalog.transaction():
                self.refs.apply_expand(keys, deltas)
            done += 1
        return bool(self.refs.queued(1))

    # ------------------------------------------------------------------ gc

    async def gc(self, threshold: float | None = None) -> dict:
        """Rewrite packs whose live share fell below `threshold` (their live blobs move to new
        packs, then the old packs go), and fold the index fragments into a checkpoint when
        they have piled up. The work follows the garbage, not the data kept."""
        self.fence.writable()
        threshold = self.config.gc_threshold if threshold is None else threshold
        async with self.commit_lock:
            await self.publish()
            await self.collect()
            before = self.chunks.statistics()
            sparse = self.chunks.sparse_packs(threshold)
            moved = await self._rewrite([pid for pid, _size, _live in sparse])
            if self.chunks.statistics().fragments > 32:
                await self._fold_fragments()
            after = self.chunks.statistics()
            return {
                "rewritten_packs": len(sparse),
                "moved_bytes": moved,
                "store_bytes_before": before.pack_bytes,
                "store_bytes_after": after.pack_bytes,
                "live_bytes": after.live_bytes,
                "packs": after.packs,
            }

    async def _rewrite(self, packs: list[bytes]) -> int:
        """Move the live blobs of `packs` into new packs; the old ones go a grace period
        after the catalog naming the new index fragment is out (a reader that loaded the
        catalog before, a read-only mount, still finds its blobs). Returns the bytes moved."""
        moved = 0
        try:
            for pid in packs:
                for key, body in await self.chunks.read_live(pid):
                    self.chunks.stage_body(key, body)
                    moved += len(body)
                await self.chunks.upload_sealed()
            await self.chunks.flush()
            await self.store.barrier()
        except BaseException:
            self.chunks.discard_staged()
            self.cycle_failed()
            raise
        with self.catalog.transaction():
            self.chunks.record()
            self.chunks.forget_packs(packs)
            self.fence.queue((K_PACK + pid for pid in packs), published=False)
            if packs:
                self.fence.changed()
        await self.publish()
        await self.collect()
        return moved

    async def _fold_fragments(self) -> None:
        """Fold the index fragments into a checkpoint; the old ones go like packs."""
        old = await self.chunks.checkpoint()
        await self.store.barrier()
        with self.catalog.transaction():
            self.chunks.record()
            self.chunks.forget_fragments(old)
            self.fence.queue((K_FRAG + _fragment_id(k) for k in old), published=False)
            self.fence.changed()
        await self.publish()
        await self.collect()

    # ------------------------------------------------------------------ the sweep

    async def sweep_orphans(self) -> int:
        """Delete the packs and index fragments that no committed catalog knows: what a
        flush or gc cycle uploaded before it failed (store error, crash, cancellation), or
        what a displaced writer uploaded and never published. The flusher runs it after
        such a failure or an unclean shutdown. Only after this writer's fence, and only
        objects seen orphaned for the grace period (the fence remembers when). Objects
        queued for deletion are not orphans. Returns how many objects went."""
        self.fence.writable()
        async with self.commit_lock:
            await self.publish()
            await self.collect()
            self.fence.check_may_delete()
            removed, due = await self.fence.sweep(await self._orphans())
            if removed:
                log.info("removed %d objects that a failed cycle left in the store", removed)
            self.orphans_removed += removed
            self.sweep_needed = due is not None
            self.sweep_at = due or 0.0
            return removed

    async def _orphans(self) -> set[str]:
        """The packs and index fragments in the store that neither the index nor the
        garbage queue knows."""
        garbage = self.catalog.garbage()
        keep = self.chunks.known_packs()
        keep.update(k[1:] for k in garbage if k[:1] == K_PACK)
        orphans = set()
        for key in await self.store.list("p/"):
            pid = _pack_id(key)
            if pid is not None and pid not in keep:
                orphans.add(key)
        fragments = self.chunks.fragment_keys()
        fragments.update(fragment_key(k[1:]) for k in garbage if k[:1] == K_FRAG)
        orphans.update(k for k in await self.store.list("i/") if k not in fragments)
        return orphans


def _pack_id(key: str) -> bytes | None:
    try:
        return bytes.fromhex(key.rsplit("/", 1)[1])
    except ValueError:
        return None  # not a name snapfs writes: left alone


def _fragment_id(key: str) -> bytes:
    return bytes.fromhex(key.rsplit("/", 1)[1])
