"""The commit planner on its own (snapfs/volume/commit.py): a plan built from a staged change
over a MemoryStore, with no engine, and its refcount deltas checked. Planning reads tree
nodes from the store and writes nothing to it."""

import inspect
from types import SimpleNamespace

import pytest

from snapfs.chunks import CHUNK, NODE, ChunkStore, digest
from snapfs.store.memory import MemoryStore
from snapfs.tree import TreeReader, decode_node
from snapfs.volume import commit
from snapfs.volume.cache import Dirty
from snapfs.volume.catalog import Catalog, SnapshotRow, VolumeRow
from snapfs.volume.check import K_CHUNK, K_NODE
from snapfs.volume.flusher import Committer
from snapfs.volume.refcounts import Refcounts

BS = 4096


def chunk(name: str) -> bytes:
    return digest(name.encode())


class World:
    """A store, a catalog, the chunk and tree layers and the refcounts: no engine."""

    def __init__(self, tmp_path) -> None:
        self.store = MemoryStore()
        self.catalog = Catalog(str(tmp_path / "catalog.sqlite3"))
        self.chunks = ChunkStore(self.store, self.catalog.db)
        self.refs = Refcounts(self.catalog, TreeReader(self.chunks))

    def fresh_tree(self) -> TreeReader:
        """A tree reader with no node in memory: a plan must read the store."""
        self.refs.tree = TreeReader(self.chunks)
        return self.refs.tree

    async def plan(self, row, changes, snap=None, gens=None) -> commit.CommitPlan:
        """Plan `changes` (blk → chunk name or None) on `row` (uploads: the new chunks)."""
        ids = {blk: None if name is None else chunk(name) for blk, name in changes.items()}
        uploads = tuple(
            dict.fromkeys(
                c for c in ids.values() if c is not None and not self.refs.has(K_CHUNK + c)
            )
        )
        epoch = row.epoch if snap is None else snap.epoch
        cached = tuple((blk, (gens or {}).get(blk, 1)) for blk in changes)
        selection = commit.Selection(snap, epoch, cached, ())
        return await commit.plan(
            self.fresh_tree(), self.refs, row, selection, commit.Staged(ids, uploads)
        )

    async def commit(self, row, changes, snap=None) -> commit.CommitPlan:
        """What the flusher does with a plan, without the engine: store its nodes (and the
        chunks, so that the store holds the whole tree), then apply its refs and root."""
        plan = await self.plan(row, changes, snap)
        for name in changes.values():
            if name is not None:
                self.chunks.stage(CHUNK, chunk(name), name.encode())
        for oid, data in plan.nodes.items():
            self.chunks.stage(NODE, oid, data)
        await self.chunks.flush()
        with self.catalog.transaction():
            self.chunks.record()
            self.refs.apply(plan.deltas, plan.sizes)
        row.root, row.root_level = plan.root, plan.level
        return plan

    def count(self, key: bytes) -> int:
        return self.refs.count(key)


def volume(size_blocks: int) -> VolumeRow:
    return VolumeRow(1, "v", size_blocks * BS, BS, None, 0, 1, 0, 0.0, None)


def snapshot(epoch: int, state: str = "creating") -> SnapshotRow:
    return SnapshotRow(7, "v", "s", epoch, state, None, 0, 0, BS, 0.0, 0, 0, "0" * 32)


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def written(world: World) -> tuple:
    return dict(world.store.objects), world.refs.all(), world.catalog.garbage()


def nothing_written(world: World, before: tuple) -> None:
    assert written(world) == before, "planning wrote to the store or the catalog"
    assert world.chunks.staged_blobs == 0, "planning staged blobs"


async def test_a_new_block_counts_its_chunk_and_a_new_leaf(world):
    row = volume(16)
    before = written(world)
    plan = await world.plan(row, {5: "a"})
    nothing_written(world, before)
    leaf = plan.root
    assert leaf is not None and plan.level == 0 and set(plan.nodes) == {leaf}
    assert decode_node(plan.nodes[leaf], leaf) == (0, {5: chunk("a")})
    assert plan.deltas == {K_CHUNK + chunk("a"): 1, K_NODE + leaf: 1}
    assert plan.sizes == {K_CHUNK + chunk("a"): BS + 1, K_NODE + leaf: len(plan.nodes[leaf]) + 1}
    assert plan.mapped_delta == 1 and plan.bump and plan.old_root is None
    assert plan.candidates == ((5, 1),) and plan.changes == {5: chunk("a")}


async def test_an_overwritten_block_drops_its_old_chunk_to_zero(world):
    row = volume(16)
    first = await world.commit(row, {0: "a", 1: "b"})
    before = written(world)
    plan = await world.plan(row, {0: "c"})
    nothing_written(world, before)
    old_leaf = first.root
    assert old_leaf is not None and plan.root not in (None, old_leaf)
    assert plan.deltas == {
        K_CHUNK + chunk("c"): 1,
        K_NODE + plan.root: 1,
        K_NODE + old_leaf: -1,  # the old root, which nothing else holds: queued
        K_CHUNK + chunk("b"): 1,  # the new leaf holds b too
    }
    assert plan.mapped_delta == 0
    with world.catalog.transaction():
        world.refs.apply(plan.deltas, plan.sizes)
    # The old leaf is queued with a count of 0: its chunks keep their counts until the
    # queue is expanded, and then a goes (b: the new leaf holds it).
    assert world.refs.queued() == [K_NODE + old_leaf] and world.count(K_NODE + old_leaf) == 0
    assert world.count(K_CHUNK + chunk("a")) == 1 and world.count(K_CHUNK + chunk("b")) == 2
    world.refs.assert_invariants()
    keys, deltas = await world.refs.plan_expand(10)
    assert keys == [K_NODE + old_leaf]
    assert deltas == {K_CHUNK + chunk("a"): -1, K_CHUNK + chunk("b"): -1}
    with world.catalog.transaction():
        world.refs.apply_expand(keys, deltas)
    assert not world.refs.queued() and world.count(K_CHUNK + chunk("b")) == 1
    assert K_CHUNK + chunk("a") in world.catalog.garbage()
    assert K_NODE + old_leaf in world.catalog.garbage()
    world.refs.assert_invariants()


async def test_a_node_a_snapshot_keeps_is_shared_not_dropped(world):
    # Two levels: blocks 0 and 280 in two leaves. A snapshot commit makes the tree the
    # snapshot's and the head's (the root counts 2); the head's next commit drops one.
    row = volume(300)
    snap = snapshot(epoch=1)
    first = await world.commit(row, {0: "a", 280: "b"}, snap=snap)
    assert first.keep_snapshot and first.deltas[K_NODE + first.root] == 2
    old_root = first.root
    _, entries = decode_node(first.nodes[old_root], old_root)
    leaf0, leaf1 = entries[0], entries[1]
    row.epoch = 2
    before = written(world)
    plan = await world.plan(row, {0: "c"})
    nothing_written(world, before)
    new_leaf0 = decode_node(plan.nodes[plan.root], plan.root)[1][0]
    assert set(plan.nodes) == {plan.root, new_leaf0}
    assert plan.deltas == {
        K_CHUNK + chunk("c"): 1,
        K_NODE + new_leaf0: 1,
        K_NODE + leaf1: 1,  # shared by both roots now
        K_NODE + plan.root: 1,
        K_NODE + old_root: -1,  # 2 → 1: the snapshot keeps it, nothing below drops
    }
    assert world.count(K_NODE + old_root) == 2 and world.count(K_NODE + leaf0) == 1
    assert not plan.keep_snapshot and plan.snap is None


async def test_a_snapshot_deleted_while_pending_keeps_no_count(world):
    row = volume(16)
    plan = await world.plan(row, {3: "a"}, snap=snapshot(epoch=1, state="deleting"))
    assert not plan.keep_snapshot and plan.deltas[K_NODE + plan.root] == 1


async def test_a_resize_across_a_tree_level_keeps_the_old_root_as_a_child(world):
    row = volume(256)  # one leaf: level 0
    first = await world.commit(row, {0: "a"})
    old_leaf = first.root
    assert first.level == 0
    row.size = 300 * BS  # grown: two levels
    before = written(world)
    plan = await world.plan(row, {299: "b"})
    nothing_written(world, before)
    assert plan.level == 1
    level, entries = decode_node(plan.nodes[plan.root], plan.root)
    assert level == 1 and entries[0] == old_leaf
    new_leaf = entries[1]
    assert set(plan.nodes) == {plan.root, new_leaf}
    assert plan.deltas == {
        K_CHUNK + chunk("b"): 1,
        K_NODE + new_leaf: 1,
        K_NODE + old_leaf: 0,  # a child of the new root (+1), no longer a root (-1)
        K_NODE + plan.root: 1,
    }
    assert plan.mapped_delta == 1


async def test_zeros_unmap_a_block_and_a_plan_is_applied_once(world):
    row = volume(16)
    first = await world.commit(row, {0: "a", 1: "b"})
    plan = await world.plan(row, {0: None, 1: "b"}, gens={0: 4, 1: 5})
    assert plan.mapped_delta == -1 and plan.deltas[K_NODE + first.root] == -1
    assert K_CHUNK + chunk("a") not in plan.deltas  # the old leaf's, when it is expanded
    assert plan.changes == {0: None, 1: chunk("b")}
    # Only blocks not written again since they were read (same generation), nor in a
    # later epoch, turn clean.
    again, later, same = Dirty(1, 9), Dirty(2, 5), Dirty(1, 4)
    assert plan.cleaned({0: same, 1: again}) == [0]
    assert plan.cleaned({0: same, 1: later}) == [0]
    assert plan.cleaned({1: Dirty(1, 5)}) == [1]
    plan.take()
    with pytest.raises(AssertionError, match="applied once"):
        plan.take()


def test_select_takes_a_snapshots_blocks_up_to_its_epoch_and_its_saves():
    dirty = {0: Dirty(1, 3), 1: Dirty(2, 4), 2: Dirty(1, 5), 3: Dirty(1, 6)}
    saves = SimpleNamespace(slots=lambda epoch: {2: 0, 5: 1} if epoch == 1 else {})
    row = SimpleNamespace(name="v", epoch=2)
    snap = snapshot(epoch=1)
    head = SimpleNamespace(row=row, dirty=dirty, saves=saves, pending=[snap])
    selection = commit.select(head, snap)
    assert selection.epoch == 1 and selection.snap is snap
    assert selection.cached == ((0, 3), (3, 6))  # block 1 is later, block 2 was saved
    assert selection.saved == ((2, 0), (5, 1))
    with pytest.raises(AssertionError, match="under a cut"):
        commit.select(head, None, [1])
    head.pending = []
    selection = commit.select(head, None, [1, 3])
    assert selection.epoch == 2 and selection.cached == ((1, 4), (3, 6)) and not selection.saved


def test_select_and_apply_cannot_await():
    # "No await from the fence check to the change" is a structure: apply is a plain def.
    assert not inspect.iscoroutinefunction(commit.select)
    assert not inspect.iscoroutinefunction(Committer._apply)
    assert not inspect.iscoroutinefunction(commit.CommitPlan.cleaned)
