"""The committer: flush cycles and publication (see docs/design.md, "The flush cycle")."""

import logging

import trio
import trio.lowlevel

from snapfs.chunks import CHUNK, NODE, ChunkStore, digest
from snapfs.errors import ReadOnly
from snapfs.tasks import plain_errors_nursery
from snapfs.volume import commit
from snapfs.volume.base import EngineConfig, zeros
from snapfs.volume.cache import CacheSpace
from snapfs.volume.catalog import Catalog, SnapshotRow
from snapfs.volume.check import K_CHUNK, K_NODE
from snapfs.volume.collector import Collector
from snapfs.volume.fence import Fence
from snapfs.volume.files import BlockFile
from snapfs.volume.head import Head
from snapfs.volume.publish import publish_catalog
from snapfs.volume.refcounts import Refcounts

log = logging.getLogger("snapfs.engine")


class Committer:
    """Flush cycles: upload dirty blocks and pending snapshots, commit the catalog in one
    transaction, publish it, then let the collector delete what the published catalog no
    longer needs.

    owns: the commit (select → stage → plan → apply → publish, see commit.py) and whether
    the last cycle left work behind (`backlog`).
    does not own: the heads' blocks and saves (`Head`), the refcounts (`Refcounts`), the
    packs and the index (`ChunkStore`), publishing and the loss of the store (`Fence`),
    what goes after a commit (`Collector`)."""

    def __init__(
        self,
        heads: dict[str, Head],
        catalog: Catalog,
        chunks: ChunkStore,
        refs: Refcounts,
        fence: Fence,
        space: CacheSpace,
        config: EngineConfig,
        commit_lock: trio.Lock,
        collector: Collector,
    ) -> None:
        self.heads = heads
        self.catalog = catalog
        self.chunks = chunks
        self.store = fence.store
        self.tree = refs.tree
        self.refs = refs
        self.fence = fence
        self.space = space
        self.config = config
        self.commit_lock = commit_lock
        self.collector = collector
        self.backlog = False  # the last flush cycle left work behind (a full batch)
        self.deduplicated = 0

    def statistics(self) -> dict:
        return {"deduplicated_blocks": self.deduplicated}

    async def sync(self) -> None:
        """Make everything written before the call durable locally (as fsync does), upload
        it, complete every pending snapshot and publish the catalog. Errors of the store
        propagate after its retries."""
        if self.fence.lost:
            raise ReadOnly(f"cannot sync: {self.fence.lost}")
        # What to upload: every block dirty now. One written again during the sync is
        # uploaded all the same, with what it holds when read (the version from before
        # the call, or a newer one): skipping it left the store without either.
        want = {h.row.id: set(h.dirty) for h in self.heads.values()}
        # First make it durable here, as an fsync of every volume does: a block written
        # again during the upload stays dirty, and what it held before the call must not
        # be lost with the newer write if the machine dies before the next sync.
        for head in list(self.heads.values()):
            await head.persist_dirty()
        while await self.flush_once(want=want):
            pass
        async with self.commit_lock:
            # The cycles stop at once when this writer lost the store meanwhile (another
            # task learned it) or its catalog failed: then what came before this call is
            # not in the store, and sync must not say it is.
            self.fence.writable()
            await self.publish()
            await self.collector.collect(drain=True)

    async def flush_once(
        self,
        want: dict[int, set[int]] | None = None,
        min_age: float = 0.0,
        max_age: float = 0.0,
    ) -> bool:
        """One flush cycle: the oldest pending snapshot of a volume, else a batch of dirty
        blocks of the heads: only those in `want` (volume id → blocks), when given, which
        then leave it once committed (sync's list), and only
        those left alone for `min_age` seconds or dirty for `max_age` seconds, when given
        (the background flusher lets hot blocks be rewritten in the cache instead of
        uploading every version, but not forever). Returns whether it found work."""
        if self.fence.read_only or self.fence.lost or self.catalog.failed:
            return False
        async with self.commit_lock:
            if self.fence.lost or self.catalog.failed:  # while this cycle waited for the lock
                return False
            for head in list(self.heads.values()):
                if head.pending:
                    await self._commit(head, head.pending[0])
                    self.backlog = True
                    return True
            budget = self.config.batch_bytes
            did = False
            now = trio.current_time()
            settled, expired = now - min_age, now - max_age
            for head in list(self.heads.values()):
                if head.pending:
                    # Taken while an earlier volume of this cycle committed: its cut comes
                    # first (a head commit now would put later writes under it).
                    await self._commit(head, head.pending[0])
                    self.backlog = True
                    return True
                blocks = []
                for blk, dirty in head.dirty.items():
                    if budget <= 0:
                        break
                    if (
                        min_age
                        and dirty.touched > settled
                        and not (max_age and dirty.since <= expired)
                    ):
                        continue
                    if want is None or blk in want.get(head.row.id, ()):
                        blocks.append(blk)
                        budget -= head.bs
                if blocks:
                    await self._commit(head, None, blocks)
                    if want is not None:
                        want[head.row.id].difference_update(blocks)
                    did = True
            self.backlog = budget <= 0
            return did

    async def _commit(self, head: Head, snap: SnapshotRow | None, blocks: list[int] | None = None):
        """Upload blocks, derive the new tree, make it durable, then commit the catalog in one
        transaction and publish it. Called with commit_lock held. On error nothing is
        recorded: what was uploaded stays as unreferenced pack space."""
        try:
            await self._commit_inner(head, snap, blocks)
        except BaseException:
            self.chunks.discard_staged()
            self.collector.cycle_failed()
            raise

    async def _commit_inner(
        self, head: Head, snap: SnapshotRow | None, blocks: list[int] | None = None
    ):
        """select → stage → plan → store the plan's nodes → fence check → apply → publish
        (see snapfs/volume/commit.py). Called with commit_lock held."""
        selection = commit.select(head, snap, blocks or ())
        staged = await self._stage(head, selection)
        plan = await commit.plan(self.tree, self.refs, head.row, selection, staged)
        await self._store_nodes(plan)
        # Another writer that fenced after our newest catalog means this writer lost: the
        # blocks stay dirty (raises before anything is marked clean).
        await self.fence.check_current()
        self._apply(head, plan)  # a plain def: no await between the check and the change
        await self.publish()
        await self.collector.collect()

    async def _stage(self, head: Head, selection: commit.Selection) -> commit.Staged:
        """Read, hash and stage the selected blocks a slice at a time, so that a commit
        holds about slice_bytes of blocks in memory however big it is; full packs go up
        meanwhile. Returns the tree changes and the chunks this commit stores."""
        bs = head.bs
        reads: list[tuple[int, BlockFile, int, int | None]]
        reads = [(blk, head.cache, blk * bs, gen) for blk, gen in selection.cached]
        reads += [(blk, head.saves.file, slot * bs, None) for blk, slot in selection.saved]
        changes: dict[int, bytes | None] = {}
        uploads: dict[bytes, None] = {}  # an ordered set
        per_slice = max(1, self.config.slice_bytes // bs)
        # Full packs go up in the background, up to `uploads / 2` at a time (more gained
        # nothing on either store and cost memory), while the next slice is read and
        # hashed: the store stays busy and memory holds about one slice plus the packs in
        # flight.
        window = trio.Semaphore(max(1, self.config.uploads // 2))
        async with plain_errors_nursery() as uploading:
            for first in range(0, len(reads), per_slice):
                todo = reads[first : first + per_slice]
                hashed = await self._read_slice(head, selection, todo)
                for blk, oid, data in hashed:
                    changes[blk] = oid
                    if oid is None:
                        continue
                    if oid in uploads or self.refs.has(K_CHUNK + oid):
                        self.deduplicated += 1
                        continue
                    uploads[oid] = None
                    self.chunks.stage(CHUNK, oid, data)
                del hashed
                await self.chunks.start_sealed(uploading, window)
        return commit.Staged(changes, tuple(uploads))

    async def _read_slice(
        self, head: Head, selection: commit.Selection, todo: list
    ) -> list[tuple[int, bytes | None, bytes]]:
        """Read one slice of a commit's blocks and hash them: (blk, chunk id or None for
        zeros, data)."""
        bs = head.bs
        zero = zeros(bs)

        def load(saved: dict[int, int]) -> list[tuple[int, bytes]]:
            out = []
            for blk, file, offset, gen in todo:
                if gen is not None and blk in saved:  # overwritten since, saved before that
                    file, offset = head.saves.file, saved[blk] * bs
                data = file.pread(head.blen(blk), offset)
                out.append((blk, data + bytes(bs - len(data)) if len(data) < bs else data))
            return out

        def hash_all(blocks: list[tuple[int, bytes]]) -> list[tuple[int, bytes | None, bytes]]:
            return [(blk, None if data == zero else digest(data), data) for blk, data in blocks]

        if selection.snap is None:
            # A head commit reads in the thread: a write racing with it bumps the block's
            # generation, so the block stays dirty.
            return await trio.to_thread.run_sync(lambda: hash_all(load({})))
        # A snapshot needs exactly the content it froze: read here on the event loop, with
        # no await since its saves were looked up. A block overwritten since the commit
        # began was copied to the saves file before that.
        return await trio.to_thread.run_sync(hash_all, load(head.saves.slots(selection.epoch)))

    async def _store_nodes(self, plan: commit.CommitPlan) -> None:
        """Stage the plan's new tree nodes, then make everything this commit staged durable
        (packs, their index fragment, the barrier)."""
        for oid, data in plan.nodes.items():
            self.chunks.stage(NODE, oid, data)
        await self.flush_staged()

    async def flush_staged(self, check_fence: bool = False) -> None:
        """Upload everything staged (packs, then their index fragment) and make it durable;
        with `check_fence`, then check that no other writer published since. On any error
        what was staged is forgotten: uploaded packs are orphans for the sweep."""
        try:
            await self.chunks.flush()
            await self.store.barrier()
            if check_fence:
                await self.fence.check_current()
        except BaseException:
            self.chunks.discard_staged()
            self.collector.cycle_failed()
            raise

    def _apply(self, head: Head, plan: commit.CommitPlan) -> None:
        """Make the plan true: one catalog transaction (index rows, refcounts, the volume's
        root, the snapshot's row, the dirty rows of the blocks that turn clean, the frozen
        rows, the change counter), then memory. A plain def: nothing can come between. A
        failed transaction (CatalogFailed) changes no memory."""
        plan.take()
        assert head.row.id == plan.volume and head.row.root == plan.old_root, "tree moved"
        cleaned = plan.cleaned(head.dirty)  # not those written again since they were read
        snap = plan.snap
        with self.catalog.transaction():
            self.chunks.record()
            self.refs.apply(plan.deltas, plan.sizes)
            self.catalog.update_volume(head.row.id, root=plan.root, root_level=plan.level)
            if snap is not None:
                if plan.keep_snapshot:
                    self.catalog.update_snapshot(
                        snap.id, root=plan.root, root_level=plan.level, state="available"
                    )
                else:
                    self.catalog.delete_snapshot(snap.id)
                head.saves.clear_rows(plan.epoch)
            self.catalog.clear_dirty(head.row.id, cleaned)
            if plan.bump:
                self.fence.changed()
        head.row.root, head.row.root_level = plan.root, plan.level
        head.mapped += plan.mapped_delta
        for blk in cleaned:
            head.blocks.mark_clean(blk, mapped=plan.changes.get(blk) is not None)
        for blk, oid in plan.changes.items():
            head.blocks.rebase(blk, mapped=oid is not None)  # those still dirty
        if snap is not None:
            self._release_saves(head, snap, plan.epoch)
        self.space.evict()

    def _release_saves(self, head: Head, snap: SnapshotRow, epoch: int) -> None:
        """The snapshot of `epoch` is committed: its saves go, and it is no longer pending."""
        assert head.pending and head.pending[0].id == snap.id, f"{snap.name}: not first"
        head.pending.pop(0)
        head.saves.release(epoch, pending=bool(head.pending))

    async def replace_tree(self, head: Head, root: bytes | None) -> dict[bytes, int]:
        """The refcount deltas that make `root` the head's tree instead of its own (rollback,
        volume delete: root None), with commit_lock held. Every snapshot pending on the
        volume is committed first, since its commit builds on the tree being replaced; one
        taken during these awaits too: the caller applies the deltas with no await after
        this returns. Raises ReadOnly once this writer lost the store (they would stay
        pending for ever)."""
        while True:
            while head.pending:
                self.fence.writable()
                await self._commit(head, head.pending[0])
            deltas = {} if root is None else {K_NODE + root: 1}
            if head.row.root is not None:
                self.refs.plan_drop(deltas, K_NODE + head.row.root)
            if not head.pending:
                return deltas

    async def publish(self) -> None:
        """Publish the catalog as the next write-once object (the fence decides whether and
        at which seq). If that seq holds another writer's catalog, this writer lost the
        store: it publishes and deletes nothing from then on."""
        await publish_catalog(self.fence, self.catalog, self.chunks)
