"""The snapshot chunk cache (snapfs/volume/chunkcache.py): limit, LRU order, clear."""

import pytest

from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.chunkcache import ChunkCache
from snapfs.volume.engine import Engine, EngineConfig


def filled(limit: int, *oids: bytes, size: int = 10) -> ChunkCache:
    cache = ChunkCache(limit)
    for oid in oids:
        cache.put(oid, oid * size)
        cache.assert_invariants()
    return cache


def test_bytes_stay_within_the_limit():
    cache = filled(30, b"a", b"b", b"c")
    assert cache.bytes == 30 and len(cache) == 3
    cache.put(b"d", b"d" * 10)  # the least recently used goes
    cache.assert_invariants()
    assert cache.bytes == 30 and b"a" not in cache and b"d" in cache
    cache.put(b"e", b"e" * 25)  # as many as it takes
    cache.assert_invariants()
    assert b"b" not in cache and b"c" not in cache and cache.bytes == 35 - 10
    cache.put(b"f", b"f" * 100)  # one chunk larger than the limit stays alone
    cache.assert_invariants()
    assert len(cache) == 1 and cache.get(b"f") == b"f" * 100 and cache.bytes == 100


def test_get_and_put_make_a_chunk_the_most_recently_used():
    cache = filled(30, b"a", b"b", b"c")
    assert cache.get(b"a") == b"a" * 10
    assert cache.get(b"x") is None
    cache.put(b"d", b"d" * 10)
    assert b"a" in cache and b"b" not in cache
    cache.put(b"c", b"c" * 10)  # again: counted once, now the newest
    cache.assert_invariants()
    assert cache.bytes == 30
    cache.put(b"e", b"e" * 10)
    assert b"a" not in cache and b"c" in cache and b"d" in cache and b"e" in cache


def test_clear_empties_it():
    cache = filled(30, b"a", b"b")
    cache.clear()
    cache.assert_invariants()
    assert cache.bytes == 0 and len(cache) == 0 and b"a" not in cache
    assert cache.get(b"a") is None
    cache.put(b"a", b"a")
    assert cache.bytes == 1


async def test_snapshot_reads_fill_it_and_the_engine_checks_it(tmp_path):
    store = MemoryStore()
    await publish.init_store(store)
    engine = await Engine.open(store, str(tmp_path / "cache"), EngineConfig(readahead_bytes=0))
    try:
        await engine.create_volume("v", 1 << 20, 64 << 10)
        await engine.write("v", 0, b"x" * (128 << 10))
        await engine.create_snapshot("v", "s")
        await engine.sync()
        snap = engine.snapshot_row("v", "s")
        assert await engine.read_snapshot(snap, 0, 128 << 10) == b"x" * (128 << 10)
        assert engine.snap_cache.bytes == 64 << 10  # two blocks, one chunk (deduplicated)
        engine.assert_invariants()
        engine.snap_cache.bytes += 1
        with pytest.raises(AssertionError, match="chunk cache"):
            engine.assert_invariants()
    finally:
        await engine.close(flush=False)
