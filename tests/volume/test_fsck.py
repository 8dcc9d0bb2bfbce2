"""fsck in-process: each component's own `check()` finds one corruption as exactly one
finding naming the object; `Engine.check` (the online fsck) reports them with the store's
findings, each stored object named with the root that needs it; a tree node missing from
the store is a finding and the walk goes on with the other roots."""

import os
import re
import tempfile

import pytest

from snapfs.chunks import pack_key
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.check import K_CHUNK, K_NODE, key_to_store_key
from snapfs.volume.engine import Engine, EngineConfig

BS = 4096
SIZE = 600 * BS  # two levels


async def open_engine(store, read_only: bool = False, checking: bool = False) -> Engine:
    cache = tempfile.mkdtemp(prefix="snapfs-fsck-")
    return await Engine.open(
        store, cache, EngineConfig(grace=0), read_only=read_only, checking=checking
    )


@pytest.fixture
async def engine():
    """Volume db with a snapshot db@nightly; half the blocks rewritten since (those are
    the snapshot's alone); and volume other, written apart (packs of its own)."""
    store = MemoryStore()
    await publish.init_store(store)
    engine = await open_engine(store)
    await engine.create_volume("db", SIZE, BS)
    await engine.write("db", 0, os.urandom(SIZE))
    await engine.create_snapshot("db", "nightly")
    await engine.write("db", 0, os.urandom(SIZE // 2))
    await engine.create_volume("other", SIZE, BS)
    await engine.sync()
    await engine.write("other", 0, os.urandom(SIZE))
    await engine.sync()
    report = await engine.check(verify_data=True)
    assert report.clean and not report.not_checked, report.as_dict()
    yield engine
    await engine.close()


def one(found: list[str], *words: str) -> str:
    assert len(found) == 1, found
    assert all(w in found[0] for w in words), found
    return found[0]


async def state_finding(engine: Engine, *words: str) -> None:
    """Exactly one finding, in the component check and in fsck's report (not clean)."""
    one(engine.check_state(), *words)
    report = await engine.check()
    one(report.state, *words)
    assert not report.clean and report.findings() == 1, report.as_dict()
    with pytest.raises(AssertionError, match=re.escape(words[0])):
        engine.assert_invariants()


async def test_cache_space_totals(engine):
    engine.space.clean_bytes += BS  # only a test writes a total from outside
    one(engine.space.check(), "cache: clean bytes")
    await state_finding(engine, "cache: clean bytes")


async def test_volume_cache_dirty_row_of_a_clean_block(engine):
    head = engine.heads["db"]
    with engine.catalog.transaction():
        engine.catalog.set_dirty(head.row.id, [(7, head.row.epoch)])
    one(head.blocks.check(engine.catalog.dirty(head.row.id)), "volume db block 7")
    await state_finding(engine, "volume db block 7", "dirty row", "clean")


async def test_leaked_save(engine):
    head = engine.heads["db"]
    with engine.catalog.transaction():
        engine.catalog.add_frozen(head.row.id, 99, 3, 0)  # epoch 99: no pending snapshot
    one(head.saves.check([], head.nblocks, "db"), "block 3, epoch 99", "leaked")
    await state_finding(engine, "volume db: save of block 3, epoch 99", "leaked")


async def test_refcount_row_both_counted_and_garbage(engine):
    key = K_NODE + engine.heads["db"].row.root
    with engine.catalog.transaction():
        engine.catalog.add_garbage([key])
    one(engine.refs.check(), key_to_store_key(key), "garbage")
    report = await engine.check()
    one(report.state, key_to_store_key(key))
    assert not report.clean


async def test_reference_holding_pins_while_available(engine):
    ref = await engine.unmanage("db", "nightly")
    assert (await engine.check()).clean
    with engine.catalog.transaction():
        engine.catalog.update_reference(ref.id, pins=bytes(32))
    await state_finding(engine, f"reference {ref.id} (nightly)", "pins")


async def test_fence_covers_more_than_was_changed(engine):
    with engine.catalog.transaction():
        engine.catalog.set_meta("published", engine.fence.changes() + 1)
    one(engine.fence.check(), "fence: the published catalog covers change")
    await state_finding(engine, "fence: the published catalog covers change")


async def test_a_blob_queued_with_a_time(engine):
    key = K_CHUNK + bytes(32)
    with engine.catalog.transaction():
        engine.catalog.add_garbage([key], since=1.0)
    await state_finding(engine, key_to_store_key(key), "queued as garbage with a time")


async def test_chunk_cache_bytes(engine):
    engine.snap_cache.bytes += 1
    await state_finding(engine, "chunk cache")


async def test_refcount_off_by_one_names_the_object_and_its_root(engine):
    row = engine.snapshot_row("db", "nightly")
    snap_only = await engine.tree.lookup(row.root, row.root_level, 0)  # overwritten in db
    key = K_CHUNK + snap_only
    engine.catalog.db.execute("UPDATE refs SET count=count+1 WHERE key=?", (key,))
    assert engine.check_state() == []  # the count is positive: only the walk can tell
    report = await engine.check()
    one(
        report.wrong_counts,
        f"{key_to_store_key(key)}: counted 2, referenced 1, needed by snapshot db@nightly",
    )
    assert report.findings() == 1
    repaired = await engine.check(repair=True)
    assert repaired.repaired and (await engine.check()).clean


async def test_a_deleted_pack_names_each_object_and_its_root(engine):
    head = engine.heads["other"]
    pid = engine.chunks.location(K_NODE + head.row.root)[0]
    del engine.store.objects[pack_key(pid)]
    report = await engine.check()
    assert report.missing and not report.state, report.as_dict()
    root = f"{key_to_store_key(K_NODE + head.row.root)}: missing from the store (its pack "
    assert any(m.startswith(root) for m in report.missing), report.missing
    assert all(f"(its pack {pack_key(pid)}), needed by volume other" in m for m in report.missing)


async def test_a_missing_node_is_a_finding_and_the_walk_goes_on(engine):
    """A fresh read-only engine (the offline fsck) walks the trees from the store: the
    missing root node of `other` is a finding, the trees of db are still walked."""
    other = engine.heads["other"].row.root
    pid = engine.chunks.location(K_NODE + other)[0]
    del engine.store.objects[pack_key(pid)]
    offline = await open_engine(engine.store, read_only=True, checking=True)
    try:
        report = await offline.check(verify_data=True)
    finally:
        await offline.close()
    assert not report.corrupt and not report.state and not report.wrong_counts
    node = [m for m in report.missing if m.startswith(key_to_store_key(K_NODE + other))]
    one(node, f"(its pack {pack_key(pid)}), needed by volume other")
    assert all("needed by volume other" in m for m in report.missing), report.missing
    assert len(report.not_checked) == 1 and "refcounts" in report.not_checked[0]
    assert report.objects > 600  # db's head and snapshot: every leaf and chunk


async def test_a_flipped_byte_names_the_chunk_and_its_root(engine):
    row = engine.snapshot_row("db", "nightly")
    oid = await engine.tree.lookup(row.root, row.root_level, 0)
    pid, offset, _length = engine.chunks.location(K_CHUNK + oid)
    body = bytearray(engine.store.objects[pack_key(pid)])
    body[offset + 1] ^= 0xFF
    engine.store.objects[pack_key(pid)] = bytes(body)
    assert (await engine.check()).clean  # the bytes are read with verify_data only
    report = await engine.check(verify_data=True)
    line = one(report.corrupt, key_to_store_key(K_CHUNK + oid), "needed by snapshot db@nightly")
    assert "digest" in line
