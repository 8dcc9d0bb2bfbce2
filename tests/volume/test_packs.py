"""Packs and GC at the engine level: deleting snapshots makes packs partly dead, gc brings
the store back within the threshold of the live bytes, and a crash in the middle of a gc
loses nothing."""

import os
import tempfile

import pytest

from snapfs.errors import StoreError
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 16 << 10
SIZE = 64 * BS


class FailingDeletes(MemoryStore):
    """A store whose deletes fail while armed: a crash in the middle of gc."""

    armed = False

    async def delete(self, key: str) -> None:
        if self.armed and key.startswith("p/"):
            raise StoreError("injected failure")
        await super().delete(key)


async def make(store, cache_dir=None):
    return await Engine.open(
        store,
        cache_dir or tempfile.mkdtemp(prefix="snapfs-packs-"),
        EngineConfig(pack_size=8 * BS, gc_threshold=0.5, grace=0),
    )


async def fill_snapshots(engine):
    """Ten snapshots, each overwriting 6 blocks at the start: each has unique data,
    and the rest is shared."""
    contents = {}
    await engine.create_volume("v", SIZE, BS)
    await engine.write("v", 0, os.urandom(SIZE))
    for i in range(10):
        await engine.write("v", (i % 2) * BS, os.urandom(6 * BS))
        await engine.create_snapshot("v", f"s{i}")
        await engine.sync()
        contents[f"s{i}"] = await engine.read("v", 0, SIZE)
    return contents


async def check_exact(engine, contents):
    engine.evict_all()
    for name, data in contents.items():
        snap = engine.snapshot_row("v", name)
        assert await engine.read_snapshot(snap, 0, SIZE) == data
    report = await engine.check()
    assert report.clean, report.as_dict()


async def test_gc_brings_the_store_within_the_threshold():
    store = MemoryStore()
    await publish.init_store(store)
    engine = await make(store)
    try:
        contents = await fill_snapshots(engine)
        for i in range(1, 9, 2):
            await engine.delete_snapshot("v", f"s{i}")
            del contents[f"s{i}"]
        stats = engine.statistics()
        assert stats.pack_bytes > stats.live_bytes  # deleting left dead bytes in packs
        result = await engine.gc(threshold=0.5)
        assert result["rewritten_packs"] > 0
        stats = engine.statistics()
        stored = sum(len(v) for k, v in store.objects.items() if k.startswith("p/"))
        assert stored == stats.pack_bytes
        # Every pack is at least half live, so the store holds at most twice the live data
        # (plus each pack's small trailer).
        assert stored <= stats.live_bytes / 0.5 + stats.packs * 4096
        assert stats.live_bytes == stats.stored_bytes
        await check_exact(engine, contents)
    finally:
        await engine.close(flush=False)


@pytest.mark.parametrize("fresh_cache", [False, True])
async def test_crash_in_the_middle_of_gc_loses_nothing(fresh_cache):
    store = FailingDeletes()
    await publish.init_store(store)
    cache_dir = tempfile.mkdtemp(prefix="snapfs-packs-")
    engine = await make(store, cache_dir)
    contents = await fill_snapshots(engine)
    for i in range(0, 10, 3):
        await engine.delete_snapshot("v", f"s{i}")
        del contents[f"s{i}"]
    store.armed = True
    with pytest.raises(StoreError):
        await engine.gc(threshold=0.9)
    await engine.close(flush=False)  # the daemon goes away mid-gc
    store.armed = False
    engine = await make(store, None if fresh_cache else cache_dir)
    try:
        await check_exact(engine, contents)
        await engine.gc(threshold=0.9)
        await check_exact(engine, contents)
        if not fresh_cache:
            report = await engine.check()
            assert report.orphan_packs == 0
    finally:
        await engine.close(flush=False)


class FailingFragments(MemoryStore):
    """A store that refuses index fragments while armed: a flush fails after its packs
    went up, which leaves them orphaned."""

    armed = False

    async def put(self, key: str, data: bytes) -> None:
        if self.armed and key.startswith("i/"):
            raise StoreError("injected failure")
        await super().put(key, data)


async def test_a_failed_flush_leaves_orphans_that_the_sweep_removes():
    store = FailingFragments()
    await publish.init_store(store)
    engine = await make(store)
    try:
        contents = await fill_snapshots(engine)
        for i in range(0, 4):  # garbage too: gc will want to rewrite and delete packs
            await engine.delete_snapshot("v", f"s{i}")
            del contents[f"s{i}"]
        store.armed = True
        await engine.write("v", 0, os.urandom(SIZE))
        with pytest.raises(StoreError):
            await engine.sync()
        assert engine.sweep_needed
        report = await engine.check()
        assert report.orphan_packs > 0
        store.armed = False
        removed = await engine.sweep_orphans()
        assert removed >= report.orphan_packs and not engine.sweep_needed
        assert (await engine.check()).orphan_packs == 0
        await engine.sync()
        contents["head"] = await engine.read("v", 0, SIZE)
        await engine.create_snapshot("v", "head")
        await engine.sync()
        await check_exact(engine, contents)
        # The store alone still restores everything.
        fresh = await make(store)
        try:
            await check_exact(fresh, contents)
        finally:
            await fresh.close(flush=False)
    finally:
        await engine.close(flush=False)


async def test_the_index_is_rebuilt_from_pack_trailers_when_fragments_are_lost():
    store = MemoryStore()
    await publish.init_store(store)
    engine = await make(store)
    try:
        contents = await fill_snapshots(engine)
    finally:
        await engine.close()
    for key in [k for k in store.objects if k.startswith("i/")]:
        del store.objects[key]
    fresh = await make(store)  # an empty cache dir: restore from the store alone
    try:
        await check_exact(fresh, contents)
    finally:
        await fresh.close(flush=False)
