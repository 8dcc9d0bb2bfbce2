"""Streaming decrements (docs/design.md, "Streaming decrements"): dropping a tree puts its
root on the `drops` queue in the transaction that drops it, and the queue is expanded in
batches of bounded size, each one transaction. fsck is clean at every step, the final
counts are the old in-memory cascade's, and a crash between batches only continues the
work. (The peak memory of a snapshot delete, before and after: bench/drop_rss.py.)"""

import os
import tempfile

from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.check import K_CHUNK, K_NODE
from snapfs.volume.engine import Engine, EngineConfig

BS = 4096
LEAVES = 40  # written leaves, one block at the start of each (blocks 256 apart)


async def open_engine(store, cache_dir: str, **config) -> Engine:
    return await Engine.open(store, cache_dir, EngineConfig(grace=0, **config))


def crash(engine: Engine) -> None:
    """Drop the engine as kill -9 does: no flush, no clean mark."""
    for head in engine.heads.values():
        head.close()
    engine.catalog.close()


async def old_cascade(engine: Engine, key: bytes) -> dict[bytes, int]:
    """The deltas of dropping `key` as plan_drop computed them before the queue: down the
    tree through every node whose count reaches zero, all in memory."""
    deltas: dict[bytes, int] = {}

    async def drop(key: bytes) -> None:
        deltas[key] = deltas.get(key, 0) - 1
        if key[:1] == K_NODE and engine.refs.count(key) + deltas[key] == 0:
            level, entries = await engine.tree.node(key[1:])
            for child in entries.values():
                await drop((K_NODE if level else K_CHUNK) + child)

    await drop(key)
    return deltas


def after(refs: dict[bytes, tuple[int, int]], deltas: dict[bytes, int]) -> dict[bytes, int]:
    counts = {k: c for k, (c, _s) in refs.items()}
    for key, delta in deltas.items():
        counts[key] = counts.get(key, 0) + delta
    return {k: c for k, c in counts.items() if c}


def node_rows(engine: Engine) -> int:
    return sum(1 for key in engine.refs.all() if key[:1] == K_NODE)


async def clean(engine: Engine) -> None:
    engine.assert_invariants()
    report = await engine.check()
    assert report.clean, report.as_dict()


async def a_snapshot_of_many_nodes(engine: Engine) -> bytes:
    """Volume v (3 levels), snapshot s, then every written block rewritten: s's tree is
    its own but for the chunks of block 1 of each leaf. Returns s's root."""
    await engine.create_volume("v", 256 * 256 * 2 * BS, BS)
    for leaf in range(LEAVES):
        await engine.write("v", leaf * 256 * BS, os.urandom(2 * BS))
    await engine.create_snapshot("v", "s")
    for leaf in range(LEAVES):
        await engine.write("v", leaf * 256 * BS, os.urandom(BS))
    await engine.sync()
    assert await engine.expand_drops(None) == 0  # the head commits' old roots
    return engine.snapshot_row("v", "s").root


async def test_a_snapshot_delete_queues_its_root_and_batches_expand_it():
    store = MemoryStore()
    await publish.init_store(store)
    cache_dir = tempfile.mkdtemp(prefix="snapfs-drops-")
    engine = await open_engine(store, cache_dir, drop_batch=4, drop_batches=0)
    root = await a_snapshot_of_many_nodes(engine)
    await clean(engine)
    before = engine.refs.all()
    expected = after(before, await old_cascade(engine, K_NODE + root))
    await engine.delete_snapshot("v", "s")
    # The delete's transaction touched the root's own count only: it is queued.
    changed = {k for k in before if engine.refs.all().get(k) != before[k]}
    assert changed == {K_NODE + root} and engine.refs.count(K_NODE + root) == 0
    assert engine.refs.queued() == [K_NODE + root]
    await clean(engine)
    left, steps = 1, 0
    while left:
        nodes = node_rows(engine)
        left = await engine.expand_drops(1)  # one batch: at most 4 nodes
        assert 0 < nodes - node_rows(engine) <= 4  # expanded: their rows went
        steps += 1
        await clean(engine)
        if steps == 3:  # the daemon dies between two batches; the queue goes on after
            crash(engine)
            engine = await open_engine(store, cache_dir, drop_batch=4, drop_batches=0)
            await clean(engine)
    assert steps > LEAVES // 4  # 1 + 40 leaves (and the middle node) in batches of 4
    counts = {k: c for k, (c, _s) in engine.refs.all().items()}
    assert counts == expected
    assert K_NODE + root not in counts and not engine.refs.queued()
    await engine.close()


async def test_the_flusher_expands_the_queue_in_the_background():
    # collect expands drop_batches batches and kicks the flusher for the rest; sync all.
    store = MemoryStore()
    await publish.init_store(store)
    engine = await open_engine(store, tempfile.mkdtemp(), drop_batch=2, drop_batches=1)
    root = await a_snapshot_of_many_nodes(engine)
    expected = after(engine.refs.all(), await old_cascade(engine, K_NODE + root))
    await engine.delete_snapshot("v", "s")
    assert engine.refs.queued()  # left for the flusher (it was kicked)
    await clean(engine)
    await engine.sync()
    assert not engine.refs.queued()
    assert {k: c for k, (c, _s) in engine.refs.all().items()} == expected
    await clean(engine)
    await engine.close()
