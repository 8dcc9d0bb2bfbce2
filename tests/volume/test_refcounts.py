"""Refcounts on their own (snapfs/volume/refcounts.py): planning a change as deltas, the
queue of dropped nodes expanded a batch at a time, garbage rows, and the invariants. No store:
the tree is a dict."""

import pytest

from snapfs.volume.catalog import Catalog
from snapfs.volume.check import K_CHUNK, K_NODE
from snapfs.volume.refcounts import Refcounts


class Tree:
    """node id → (level, {slot: child id})"""

    def __init__(self, nodes):
        self.nodes = nodes

    async def node(self, oid):
        return self.nodes[oid]


def refcounts(tmp_path, nodes) -> Refcounts:
    return Refcounts(Catalog(str(tmp_path / "catalog.sqlite3")), Tree(nodes))


async def test_dropping_a_root_queues_it_and_expanding_frees_only_what_nothing_else_holds(
    tmp_path,
):
    # Two roots share leaf L1: dropping root A queues A (count 0); expanding the queue
    # frees A and L0 (and chunk a), not L1.
    nodes = {
        b"A": (1, {0: b"L0", 1: b"L1"}),
        b"B": (1, {1: b"L1"}),
        b"L0": (0, {0: b"a"}),
        b"L1": (0, {0: b"b"}),
    }
    refs = refcounts(tmp_path, nodes)
    add: dict[bytes, int] = {}
    for root in (b"A", b"B"):
        refs.plan_add(add, K_NODE + root)
    for level, entries in nodes.values():
        for child in entries.values():
            refs.plan_add(add, (K_NODE if level else K_CHUNK) + child)
    with refs.catalog.transaction():
        refs.apply(add, {key: 1 for key in add})
    assert refs.count(K_NODE + b"L1") == 2
    drop: dict[bytes, int] = {}
    refs.plan_drop(drop, K_NODE + b"A")
    assert drop == {K_NODE + b"A": -1}  # the root's own decrement only
    with refs.catalog.transaction():
        refs.apply(drop)
    assert refs.queued() == [K_NODE + b"A"] and refs.count(K_NODE + b"A") == 0
    assert refs.has(K_NODE + b"A") and refs.catalog.garbage() == []
    refs.assert_invariants()
    keys, deltas = await refs.plan_expand(1)
    assert keys == [K_NODE + b"A"] and deltas == {K_NODE + b"L0": -1, K_NODE + b"L1": -1}
    with refs.catalog.transaction():
        refs.apply_expand(keys, deltas)
    assert refs.queued() == [K_NODE + b"L0"] and refs.catalog.garbage() == [K_NODE + b"A"]
    refs.assert_invariants()
    keys, deltas = await refs.plan_expand(1)
    with refs.catalog.transaction():
        refs.apply_expand(keys, deltas)
    assert refs.queued() == [] and await refs.plan_expand(1) == ([], {})
    assert not refs.has(K_NODE + b"A") and not refs.has(K_CHUNK + b"a")
    assert refs.count(K_NODE + b"L1") == 1 and refs.has(K_CHUNK + b"b")
    assert set(refs.catalog.garbage()) == {K_NODE + b"A", K_NODE + b"L0", K_CHUNK + b"a"}
    refs.assert_invariants()


async def test_a_queued_node_counted_again_leaves_the_queue_with_its_children(tmp_path):
    # Its children's counts were never taken back: counting it again only dequeues it.
    refs = refcounts(tmp_path, {b"L": (0, {0: b"a"})})
    with refs.catalog.transaction():
        refs.apply({K_NODE + b"L": 1, K_CHUNK + b"a": 1}, {K_NODE + b"L": 5, K_CHUNK + b"a": 9})
        refs.apply({K_NODE + b"L": -1})
    assert refs.queued() == [K_NODE + b"L"]
    with refs.catalog.transaction():
        refs.apply({K_NODE + b"L": 1})  # a commit whose tree holds the same leaf again
    assert refs.queued() == [] and refs.count(K_CHUNK + b"a") == 1
    assert refs.all() == {K_NODE + b"L": (1, 5), K_CHUNK + b"a": (1, 9)}
    refs.assert_invariants()


async def test_the_queue_invariants_name_the_object(tmp_path):
    refs = refcounts(tmp_path, {})
    with refs.catalog.transaction():
        refs.apply({K_NODE + b"L": 1, K_CHUNK + b"a": 1}, {K_NODE + b"L": 5, K_CHUNK + b"a": 9})
        refs.catalog.db.execute("INSERT INTO drops VALUES(?)", (K_NODE + b"L",))
        refs.catalog.db.execute("INSERT INTO drops VALUES(?)", (K_CHUNK + b"z",))
    found = refs.check()
    assert found == [
        f"n/{b'L'.hex()}: a refcount row of 1 and queued",
        f"c/{b'z'.hex()}: queued without a refcount row",
        f"c/{b'z'.hex()}: queued, not a tree node",
    ], found


async def test_a_count_below_zero_is_refused_and_nothing_changes(tmp_path):
    refs = refcounts(tmp_path, {})
    with refs.catalog.transaction():
        refs.apply({K_CHUNK + b"x": 1}, {K_CHUNK + b"x": 10})
    with pytest.raises(AssertionError, match="below zero"), refs.catalog.transaction():
        refs.apply({K_CHUNK + b"x": -2})
    assert refs.count(K_CHUNK + b"x") == 1  # rolled back
    refs.assert_invariants()


async def test_storing_an_object_again_takes_it_out_of_the_garbage(tmp_path):
    refs = refcounts(tmp_path, {})
    key = K_CHUNK + b"x"
    with refs.catalog.transaction():
        refs.apply({key: 1}, {key: 10})
        refs.apply({key: -1})
    assert refs.catalog.garbage() == [key]
    with refs.catalog.transaction():
        refs.apply({key: 1}, {key: 10})  # the same content, stored again before collect
    assert refs.catalog.garbage() == [] and refs.count(key) == 1
    refs.assert_invariants()
