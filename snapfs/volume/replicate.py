"""The copy of a snapshot's tree from one store into another (docs/design.md, "Replicate").

`Replicator` reads a snapshot through a source engine (read-only, any store) and fills an
inbound reference of a target engine (a writer of the other store):

- The walk is post-order over the source tree: a subtree whose root node the target
  already counts (refcount row) is complete there and is not entered, so an unchanged
  subtree of a later snapshot costs one lookup; chunks the target counts are not sent.
  What is missing is read from the source (verified against its digest there), staged
  byte-exact into the target's ChunkStore (same ids: a node's bytes are not re-encoded),
  and committed with its counts, as a flush commits (a node counts its children).
- The *frontier* is the stack of complete subtrees not yet absorbed by a parent node:
  the inbound reference holds one count on each (its `pins`). A node absorbs its children
  (their pin counts become its child counts: net zero) and is pushed in their place; at
  the end the stack is the root alone, which the available reference holds.
- Batches: once `batch_bytes` were staged, the target commits them (packs, index fragment,
  barrier, one transaction with the counts and the pins, publish). A kill loses the
  batch in flight's commit, not its uploads: a rerun finds the inbound reference with its
  pins (nothing committed is sent again) and first lists the target's packs that its
  index does not know (orphans: that batch's, or any failed cycle's). Each is read whole
  and verified (pack digest, then each blob's digest); when the walk needs a blob one of
  them holds, it is *adopted* instead of sent: indexed where it is (`ChunkStore.adopt`),
  counted in the same batch as a sent one. What the walk does not need is never indexed:
  a pack nothing was adopted from stays an orphan for the sweep, the rest of a pack
  partly adopted is dead bytes for gc (its live bytes count the adopted blobs only).
  Pins of an earlier run are taken over as the walk meets their subtrees again; those it
  does not meet (their subtree was completed by other means) are dropped at the end.
- A target that serves a mount (`shared`: a restore runs inside the mount's daemon) is
  changed by others meanwhile: its flusher, deletes, gc. Each batch then holds the
  target's commit lock from its first lookup to its commit, so what the walk found present
  stays counted until its own counts are applied, and nothing else stages into the
  ChunkStore meanwhile; between batches everything copied is held by the pins. Others wait
  for at most one batch. The target's sweep may delete an orphan pack between batches, so
  a batch adopts from a pack only after a HEAD found it (once per batch, under the lock:
  the sweep takes it too; once the batch commits, the pack is indexed and kept).

owns: the walk, the frontier, the batch's deltas and sizes, the orphans found at a resume,
the statistics; the source side helpers (`read_only_engine`, `reference_snapshot`).
does not own: the reference rows and transactions (`References` in the target engine),
the stores, the lease (the caller's: snapfs/replicate.py, or the mount's daemon).
"""

import contextlib
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import trio

from snapfs.chunks import CHUNK, NODE, pack_key
from snapfs.errors import IntegrityError, InvalidReference, ObjectNotFound
from snapfs.store.base import Store
from snapfs.tree import decode_node
from snapfs.volume.catalog import ReferenceRow, SnapshotRow
from snapfs.volume.check import K_CHUNK, K_NODE, K_PACK
from snapfs.volume.engine import Engine, EngineConfig

FETCH_BYTES = 8 << 20  # chunks read from the source per request


@dataclass
class ReplicateStatistics:
    sent_objects: int = 0  # nodes and chunks staged into the target
    sent_bytes: int = 0  # their stored bytes
    present_objects: int = 0  # nodes and chunks the target had (not sent)
    adopted_objects: int = 0  # found in packs an interrupted run uploaded (not sent)
    adopted_bytes: int = 0
    batches: int = 0


class Replicator:
    """One replicate of `snap` (a row of `source`) into `target`; `run` once."""

    def __init__(
        self,
        source: Engine,
        snap: SnapshotRow,
        target: Engine,
        batch_bytes: int = 64 << 20,
        pause: float = 0.0,
        on_bytes: Callable[[int], None] | None = None,
        shared: bool = False,
    ) -> None:
        self.source, self.snap, self.target = source, snap, target
        self.shared = shared  # the target serves a mount: a batch holds its commit lock
        self._locked = False
        self.batch_bytes = batch_bytes
        self.pause = pause  # seconds before each commit, packs uploaded (tests kill then)
        self.on_bytes = on_bytes or (lambda n: None)
        self.stats = ReplicateStatistics()
        self.rid = ""  # the inbound reference, once begun
        self.frontier: list[bytes] = []
        self.old_pins: Counter[bytes] = Counter()
        self.orphans: dict[bytes, tuple[bytes, int, int]] = {}  # key → pack, offset, length
        self.orphan_packs: dict[bytes, int] = {}  # pack → size
        self._reset_batch()

    def _reset_batch(self) -> None:
        self.deltas: dict[bytes, int] = {}
        self.sizes: dict[bytes, int] = {}
        self.staged = 0
        self.alive: set[bytes] = set()  # orphan packs this batch found in the store

    async def run(
        self, name: str, description: str, source: str, unique: bool = False
    ) -> ReferenceRow:
        """Copy what the target lacks; returns the available reference. A rerun after an
        interruption resumes the inbound reference of the same guid and root (`unique`: a
        backup; see `References.begin_inbound`). On error or cancellation what this batch
        staged is forgotten (its uploaded packs are orphans, which a rerun adopts)."""
        known = {r.id for r in self.target.references()}
        ref = await self.target.begin_inbound(self.snap, name, description, source, unique)
        if ref.state == "available":
            return ref
        self.rid = ref.id
        self.old_pins = Counter(ref.held())
        await self._lock()
        try:
            if ref.id in known:  # resumed
                await self._find_orphans()
            if self.snap.root is not None:
                await self._complete(self.snap.root)
            assert self.frontier == ([] if self.snap.root is None else [self.snap.root])
            stale = list(self.old_pins.elements())
            await self._commit(stale)
        except BaseException:
            if self._locked or not self.shared:  # else nothing of ours is staged
                self.target.chunks.discard_staged()
                self.target.collector.cycle_failed()
            raise
        finally:
            self._unlock()
        return await self.target.finish_inbound(ref.id, stale)

    async def _lock(self) -> None:
        if self.shared:
            await self.target.commit_lock.acquire()
            self._locked = True

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            self.target.commit_lock.release()

    def _have(self, key: bytes) -> bool:
        return key in self.sizes or self.target.refs.has(key)

    async def _find_orphans(self) -> None:
        """The blobs of the target's packs that its index does not know (not those queued
        for deletion), read whole and verified: those a blob of which fails its digest
        are kept out, and so are packs that do not read back (deleted since the listing,
        damaged, not a pack)."""
        chunks = self.target.chunks
        retired = {k[1:] for k in self.target.catalog.garbage() if k[:1] == K_PACK}
        for pid in await chunks.unknown_packs(retired):
            try:
                blobs, size = await chunks.orphan_blobs(pid)
            except (ObjectNotFound, IntegrityError, TypeError, ValueError):
                continue
            self.orphan_packs[pid] = size
            for key, offset, length in blobs:
                self.orphans.setdefault(key, (pid, offset, length))

    async def _adopted(self, key: bytes) -> bool:
        """Adopt `key` into this batch when an orphan pack holds it and is still in the
        store (HEAD, once per pack and batch); False: it must be sent."""
        where = self.orphans.get(key)
        if where is None:
            return False
        pid = where[0]
        if pid not in self.alive:
            if await self.target.store.head(pack_key(pid)) is None:
                self.orphans = {k: w for k, w in self.orphans.items() if w[0] != pid}
                return False
            self.alive.add(pid)
        del self.orphans[key]
        self.target.chunks.adopt(key, where, self.orphan_packs[pid])
        self.sizes[key] = where[2]
        self.deltas.setdefault(key, 0)
        self.staged += where[2]
        self.stats.adopted_objects += 1
        self.stats.adopted_bytes += where[2]
        return True

    async def _complete(self, oid: bytes) -> None:
        """Make the subtree of node `oid` complete in the target and push it."""
        if self._have(K_NODE + oid):
            self.stats.present_objects += 1
            self._push(oid)
            return
        data = await self.source.chunks.get(NODE, oid)
        level, entries = decode_node(data, oid)
        if level:
            for child in entries.values():
                await self._complete(child)
            for _child in entries:
                self._pop()
        else:
            await self._copy_chunks(entries.values())
        kind = K_NODE if level else K_CHUNK
        for child in entries.values():
            self.target.refs.plan_add(self.deltas, kind + child)
        if not await self._adopted(K_NODE + oid):
            self._stage(NODE, oid, data)
        self._push(oid)
        if self.staged >= self.batch_bytes:
            await self._commit(list(self.old_pins.elements()))

    async def _copy_chunks(self, oids: Iterable[bytes]) -> None:
        """The chunks of a leaf that the target lacks (and no orphan pack holds), read a
        few MiB at a time."""
        lacking = [o for o in dict.fromkeys(oids) if not self._have(K_CHUNK + o)]
        self.stats.present_objects += len(set(oids)) - len(lacking)
        missing = [o for o in lacking if not await self._adopted(K_CHUNK + o)]
        per = max(1, FETCH_BYTES // self.snap.block_size)
        for first in range(0, len(missing), per):
            group = missing[first : first + per]
            got = await self.source.chunks.get_many(CHUNK, group)
            for oid in group:
                self._stage(CHUNK, oid, got[oid])
            await self.target.chunks.upload_sealed()

    def _stage(self, kind: str, oid: bytes, data: bytes) -> None:
        size = self.target.chunks.stage(kind, oid, data)
        key = kind.encode() + oid
        self.sizes[key] = size
        self.deltas.setdefault(key, 0)
        self.staged += size
        self.stats.sent_objects += 1
        self.stats.sent_bytes += size
        self.on_bytes(size)

    def _push(self, oid: bytes) -> None:
        """A complete subtree joins the frontier: the reference holds a count on it (one an
        earlier run's pin already holds is taken over)."""
        self.frontier.append(oid)
        if self.old_pins[oid]:
            self.old_pins[oid] -= 1
        else:
            self.target.refs.plan_add(self.deltas, K_NODE + oid)

    def _pop(self) -> None:
        """The newest subtree leaves the frontier: its parent counts it instead."""
        oid = self.frontier.pop()
        self.target.refs.plan_add(self.deltas, K_NODE + oid, -1)

    async def _commit(self, stale: list[bytes]) -> None:
        """Commit the batch; a shared target is let go between batches."""
        if self.pause:  # tests: a kill now leaves this batch's packs uploaded, not committed
            await self.target.chunks.flush()
            await trio.sleep(self.pause)
        pins = self.frontier + stale
        await self.target.commit_inbound(self.rid, self.deltas, self.sizes, pins, self.shared)
        self._reset_batch()
        self.stats.batches += 1
        self._unlock()
        await self._lock()


@contextlib.asynccontextmanager
async def read_only_engine(store: Store) -> AsyncIterator[Engine]:
    """A read-only engine of `store` in a temporary cache dir (its newest catalog)."""
    with tempfile.TemporaryDirectory(prefix="snapfs-replicate-") as cache:
        engine = await Engine.open(store, cache, EngineConfig(), read_only=True)
        try:
            yield engine
        finally:
            await engine.close()


def reference_snapshot(ref: ReferenceRow, owner: int | None = None) -> SnapshotRow:
    """An available reference seen as the snapshot it keeps (same root, size, block size,
    guid), to be copied like one; `owner`: whom the copy belongs to (default: the same)."""
    if ref.state != "available":
        raise InvalidReference(f"reference {ref.id} ({ref.name}) is {ref.state}")
    return SnapshotRow(
        0,
        "",
        ref.name,
        0,
        "available",
        ref.root,
        ref.root_level,
        ref.size,
        ref.block_size,
        ref.created,
        0,
        ref.owner if owner is None else owner,
        ref.guid,
    )
