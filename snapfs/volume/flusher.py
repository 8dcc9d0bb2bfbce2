"""Flush cycles and publication (see docs/design.md, "The flush cycle")."""

import logging

import trio
import trio.lowlevel

from snapfs.chunks import CHUNK, NODE, digest
from snapfs.errors import ReadOnly
from snapfs.tasks import plain_errors_nursery
from snapfs.tree import levels_for
from snapfs.volume import publish
from snapfs.volume.base import EngineBase
from snapfs.volume.catalog import SnapshotRow
from snapfs.volume.check import (
    K_CHUNK,
    K_NODE,
    K_PACK,
)
from snapfs.volume.fence import STORE_KINDS
from snapfs.volume.files import BlockFile
from snapfs.volume.head import Head

log = logging.getLogger("snapfs.engine")


class Flusher(EngineBase):
    """Flush cycles: upload dirty blocks and pending snapshots, commit the catalog in one
    transaction, publish it, then delete what the published catalog no longer needs."""

    async def sync(self) -> None:
        """Make everything written before the call durable locally (as fsync does), upload
        it, complete every pending snapshot and publish the catalog. Errors of the store
        propagate after its retries."""
        if self.lease_lost:
            raise ReadOnly(f"cannot sync: {self.lease_lost}")
        # What to upload: every block dirty now. One written again during the sync is
        # uploaded all the same, with what it holds when read (the version from before
        # the call, or a newer one): skipping it left the store without either.
        want = {h.row.id: set(h.dirty) for h in self.heads.values()}
        # First make it durable here, as an fsync of every volume does: a block written
        # again during the upload stays dirty, and what it held before the call must not
        # be lost with the newer write if the machine dies before the next sync.
        for head in list(self.heads.values()):
            await self._persist_dirty(head)
        while await self.flush_once(want=want):
            pass
        async with self.commit_lock:
            # The cycles stop at once when this writer lost the store meanwhile (another
            # task learned it) or its catalog failed: then what came before this call is
            # not in the store, and sync must not say it is.
            self.writable()
            await self._publish()
            await self._collect()

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
        if self.read_only or self.lease_lost or self.catalog.failed:
            return False
        async with self.commit_lock:
            if self.lease_lost or self.catalog.failed:  # while this cycle waited for the lock
                return False
            for head in list(self.heads.values()):
                if head.pending:
                    await self._commit(head, head.pending[0])
                    self._backlog = True
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
                    self._backlog = True
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
            self._backlog = budget <= 0
            return did

    async def _commit(self, head: Head, snap: SnapshotRow | None, blocks: list[int] | None = None):
        """Upload blocks, derive the new tree, make it durable, then commit the catalog in one
        transaction and publish it. Called with commit_lock held. On error nothing is
        recorded: what was uploaded stays as unreferenced pack space."""
        try:
            await self._commit_inner(head, snap, blocks)
        except BaseException:
            self.chunks.discard_staged()
            self.sweep_needed = True
            raise

    async def _commit_inner(
        self, head: Head, snap: SnapshotRow | None, blocks: list[int] | None = None
    ):
        """Upload blocks, derive the new tree, make it durable, then commit the catalog in one
        transaction and publish it. Called with commit_lock held."""
        # The cut of a pending snapshot: the committed tree never holds a block version
        # newer than the epoch of a snapshot still pending on the volume (the snapshot's
        # commit builds on that tree), so the head is committed only once none is pending.
        assert snap is not None or not head.pending, f"{head.row.name}: commit under a cut"
        target = head.row.epoch if snap is None else snap.epoch
        reads = self._commit_reads(head, snap, target, blocks or [])
        changes, uploads = await self._stage_blocks(head, snap, target, reads)
        old_root, old_level = head.row.root, head.row.root_level
        update = await self.tree.update(
            old_root, old_level, max(levels_for(head.nblocks), old_level), changes
        )
        new_nodes = await self._stage_nodes(update.new_nodes)
        keep_snapshot = snap is not None and snap.state != "deleting"
        deltas, sizes = await self._commit_deltas(head.bs, uploads, new_nodes)
        if update.root is not None:
            self.refs.plan_add(deltas, K_NODE + update.root, 1 + keep_snapshot)
        if old_root is not None:
            await self.refs.plan_drop(deltas, K_NODE + old_root)
        mapped_delta = 0
        for blk, oid in changes.items():
            was = await self.tree.lookup(old_root, old_level, blk)
            mapped_delta += (oid is not None) - (was is not None)
        await self.fence.check_current()
        # From here to the end: no await until the publish.
        cleaned = [
            blk
            for blk, _fd, _offset, gen in reads
            if gen is not None
            and (dirty := head.dirty.get(blk)) is not None
            and dirty.gen == gen
            and dirty.epoch <= target
        ]
        with self.catalog.transaction():
            self.chunks.record()
            self.refs.apply(deltas, sizes)
            self.catalog.update_volume(head.row.id, root=update.root, root_level=update.level)
            if snap is not None:
                if keep_snapshot:
                    self.catalog.update_snapshot(
                        snap.id, root=update.root, root_level=update.level, state="available"
                    )
                else:
                    self.catalog.delete_snapshot(snap.id)
                head.saves.clear_rows(target)
            self.catalog.clear_dirty(head.row.id, cleaned)
            if update.root != old_root or (snap is not None and not snap.temporary):
                self._bump_seq()
        head.row.root, head.row.root_level = update.root, update.level
        head.mapped += mapped_delta
        for blk in cleaned:
            head.blocks.mark_clean(blk, mapped=changes.get(blk) is not None)
        for blk, oid in changes.items():
            head.blocks.rebase(blk, mapped=oid is not None)  # those still dirty
        if snap is not None:
            self._release_saves(head, target)
        self.space.evict()
        await self._publish()
        await self._collect()

    @staticmethod
    def _commit_reads(
        head: Head, snap: SnapshotRow | None, target: int, blocks: list[int]
    ) -> list[tuple[int, BlockFile, int, int | None]]:
        """What a commit reads: (blk, file, offset, write generation or None for a save).
        A snapshot commit takes every block dirty up to its epoch, from its save when the
        block was overwritten since; a head commit takes `blocks`."""
        bs = head.bs
        frozen = {} if snap is None else head.saves.slots(target)
        if snap is not None:
            blocks = [b for b, d in head.dirty.items() if d.epoch <= target and b not in frozen]
        reads: list[tuple[int, BlockFile, int, int | None]]
        reads = [(blk, head.cache, blk * bs, head.dirty[blk].gen) for blk in blocks]
        reads += [(blk, head.saves.file, slot * bs, None) for blk, slot in frozen.items()]
        return reads

    async def _stage_blocks(
        self, head: Head, snap: SnapshotRow | None, target: int, reads: list
    ) -> tuple[dict[int, bytes | None], dict[bytes, None]]:
        """Read, hash and stage the blocks a slice at a time, so that a commit holds about
        slice_bytes of blocks in memory however big it is. Returns the tree changes (blk →
        chunk id, None for zeros) and the chunk ids this commit stores (an ordered set)."""
        bs = head.bs
        zero = self._zeros(bs)

        def load(todo, saved: dict[int, int]) -> list[tuple[int, bytes]]:
            out = []
            for blk, file, offset, gen in todo:
                if gen is not None and blk in saved:  # overwritten since, saved before that
                    file, offset = head.saves.file, saved[blk] * bs
                data = file.pread(head.blen(blk), offset)
                out.append((blk, data + bytes(bs - len(data)) if len(data) < bs else data))
            return out

        def hash_all(blocks: list[tuple[int, bytes]]) -> list[tuple[int, bytes | None, bytes]]:
            return [(blk, None if data == zero else digest(data), data) for blk, data in blocks]

        def load_and_hash(todo) -> list[tuple[int, bytes | None, bytes]]:
            return hash_all(load(todo, {}))

        changes: dict[int, bytes | None] = {}
        uploads: dict[bytes, None] = {}
        per_slice = max(1, self.config.slice_bytes // bs)
        # Full packs go up in the background, up to `uploads / 2` at a time (more gained
        # nothing on either store and cost memory), while the next slice is read and
        # hashed: the store stays busy and memory holds about one slice plus the packs in
        # flight.
        window = trio.Semaphore(max(1, self.config.uploads // 2))
        async with plain_errors_nursery() as uploading:
            for first in range(0, len(reads), per_slice):
                todo = reads[first : first + per_slice]
                if snap is None:
                    # A head commit reads in the thread: a write racing with it bumps the
                    # block's generation, so the block stays dirty.
                    hashed = await trio.to_thread.run_sync(load_and_hash, todo)
                else:
                    # A snapshot needs exactly the content it froze: read here, with no await
                    # since the check. A block overwritten since the commit began was copied
                    # to the frozen file before that.
                    loaded = load(todo, head.saves.slots(target))
                    hashed = await trio.to_thread.run_sync(hash_all, loaded)
                    del loaded
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
        return changes, uploads

    async def _stage_nodes(self, nodes: dict[bytes, bytes]) -> dict[bytes, bytes]:
        """Stage the tree nodes the store does not hold yet, then make everything this
        commit staged durable (packs, their index fragment, the barrier). Returns them."""
        new_nodes = {oid: data for oid, data in nodes.items() if not self.refs.has(K_NODE + oid)}
        for oid, data in new_nodes.items():
            self.chunks.stage(NODE, oid, data)
        await self._flush_staged()
        return new_nodes

    async def _flush_staged(self, check_fence: bool = False) -> None:
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
            self.sweep_needed = True
            raise

    async def _commit_deltas(
        self, bs: int, uploads: dict[bytes, None], new_nodes: dict[bytes, bytes]
    ) -> tuple[dict[bytes, int], dict[bytes, int]]:
        """Refcount increments of what a commit stored (new nodes count their children) and
        the sizes of the new objects; the roots' own counts are the caller's."""
        deltas: dict[bytes, int] = {}
        sizes: dict[bytes, int] = {}
        for oid in uploads:
            sizes[K_CHUNK + oid] = bs + 1
            deltas.setdefault(K_CHUNK + oid, 0)
        for oid, data in new_nodes.items():
            sizes[K_NODE + oid] = len(data) + 1
            deltas.setdefault(K_NODE + oid, 0)
            level, entries = await self.tree.node(oid)
            kind = K_NODE if level else K_CHUNK
            for child in entries.values():
                self.refs.plan_add(deltas, kind + child)
        return deltas, sizes

    def _release_saves(self, head: Head, epoch: int) -> None:
        """The snapshot of `epoch` is committed: its saves go, and it is no longer pending."""
        head.pending.pop(0)
        head.saves.release(epoch, pending=bool(head.pending))

    async def _replace_tree(self, head: Head, root: bytes | None) -> dict[bytes, int]:
        """The refcount deltas that make `root` the head's tree instead of its own (rollback,
        volume delete: root None), with commit_lock held. Every snapshot pending on the
        volume is committed first, since its commit builds on the tree being replaced; one
        taken during these awaits too: the caller applies the deltas with no await after
        this returns. Raises ReadOnly once this writer lost the store (they would stay
        pending for ever)."""
        while True:
            while head.pending:
                self.writable()
                await self._commit(head, head.pending[0])
            deltas = {} if root is None else {K_NODE + root: 1}
            if head.row.root is not None:
                await self.refs.plan_drop(deltas, K_NODE + head.row.root)
            if not head.pending:
                return deltas

    async def _publish(self) -> None:
        """Publish the catalog as the next write-once object (the fence decides whether and
        at which seq). If that seq holds another writer's catalog, this writer lost the
        store: it publishes and deletes nothing from then on."""
        try:
            await self.fence.publish(
                lambda seq, writer, changes: publish.catalog_doc(
                    self.catalog, seq, writer, changes, self.chunks.fragment_keys()
                )
            )
        except ReadOnly:
            if self.fence.lost:
                self.last_error = self.fence.lost
            raise

    async def _collect(self) -> None:
        """Once a catalog without them is out: drop dead blobs from the index (their packs
        lose live bytes) and queue packs with nothing live left; then delete the queued
        store objects whose grace period is over. Both steps go through the `garbage`
        table, so a crash in between only repeats them."""
        if self.read_only or not self.fence.up_to_date():
            return
        garbage = self.catalog.garbage()
        blobs = [k for k in garbage if k[:1] in (K_CHUNK, K_NODE)]
        if blobs or self.catalog.unstamped_garbage(STORE_KINDS):
            with self.catalog.transaction():
                self.fence.published_now()
                empty = self.chunks.release(blobs)
                self.catalog.forget_garbage(blobs)
                self.fence.queue(K_PACK + pid for pid in empty)
        await self.fence.delete_due()
