"""A flush commit streams its blocks through in slices: it holds about `slice_bytes` of them
in memory however much is dirty, and writes racing with a sliced snapshot commit leave the
snapshot exact."""

import os
import tempfile
import tracemalloc

import trio
import trio.lowlevel

from snapfs.store import MemoryStore
from snapfs.store.local import LocalStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 64 << 10


async def make(store=None, **config) -> Engine:
    store = store or MemoryStore()
    await publish.init_store(store)
    return await Engine.open(
        store, tempfile.mkdtemp(prefix="snapfs-flush-"), EngineConfig(**config)
    )


async def test_a_commit_holds_about_one_slice_in_memory():
    store = LocalStore(tempfile.mkdtemp(prefix="snapfs-store-"))  # keeps nothing in memory
    engine = await make(store, slice_bytes=8 * BS, pack_size=4 * BS, uploads=2)
    try:
        size = 256 * BS  # 16 MiB dirty, flushed in one commit
        await engine.create_volume("v", size, BS)
        for blk in range(0, size // BS, 16):
            await engine.write("v", blk * BS, os.urandom(16 * BS))
        tracemalloc.start()
        try:
            await engine.sync()
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < size / 4, f"peak {peak >> 20} MiB for a {size >> 20} MiB commit"
        engine.evict_all()
        report = await engine.check()
        assert report.clean, report.as_dict()
    finally:
        await engine.close()


async def test_writes_racing_a_sliced_snapshot_commit_keep_it_exact():
    engine = await make(slice_bytes=BS, pack_size=2 * BS, uploads=2)
    try:
        n = 32
        old = os.urandom(n * BS)
        await engine.create_volume("v", n * BS, BS)
        await engine.write("v", 0, old)
        await engine.create_snapshot("v", "s")
        new = os.urandom(n * BS)

        async def overwrite():
            for blk in reversed(range(n)):  # meet the commit's slices half way
                await engine.write("v", blk * BS, new[blk * BS : (blk + 1) * BS])
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.flush_once)
            nursery.start_soon(overwrite)
        await engine.sync()
        engine.evict_all()
        snap = engine.snapshot_row("v", "s")
        assert snap.state == "available"
        assert await engine.read_snapshot(snap, 0, n * BS) == old
        assert await engine.read("v", 0, n * BS) == new
        report = await engine.check()
        assert report.clean, report.as_dict()
    finally:
        await engine.close()


class SlowGets(MemoryStore):
    """Reads take a while: a commit can complete in the middle of a block fetch."""

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith("p/"):
            await trio.sleep(0.05)
        return await super().get(key, offset, length)


async def test_a_partial_write_keeps_the_block_when_a_commit_lands_during_its_fetch():
    engine = await make(SlowGets())
    try:
        old = os.urandom(2 * BS)
        await engine.create_volume("v", 2 * BS, BS)
        await engine.write("v", 0, old)
        await engine.sync()
        engine.evict_all()
        await engine.write("v", BS, bytes(range(256)) * (BS // 256))  # block 1 dirty

        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.write, "v", 10, b"new")  # block 0: read-modify-write
            nursery.start_soon(engine.flush_once)  # commits block 1 during that fetch
        expected = old[:10] + b"new" + old[13:BS]
        assert await engine.read("v", 0, BS) == expected
        await engine.sync()
        engine.evict_all()
        assert await engine.read("v", 0, BS) == expected
    finally:
        await engine.close()


async def test_a_block_rewritten_all_the_time_still_reaches_the_store():
    """Write-back waits for a block to settle (flush_delay), but not forever: a block that
    is rewritten more often than that is uploaded flush_max_age after it became dirty."""
    engine = await make(flush_delay=30.0, flush_max_age=0.3)
    try:
        await engine.create_volume("v", 4 * BS, BS)
        head = engine.head("v")
        await engine.write("v", 0, b"cold" * (BS // 4))  # written once
        version = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run_flusher)
            with trio.fail_after(20):
                while await engine.tree.lookup(head.row.root, head.row.root_level, 1) is None:
                    version += 1  # the hot block: rewritten every 10 ms, never settles
                    await engine.write("v", BS, version.to_bytes(8, "big") * (BS // 8))
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert 0 not in head.dirty  # the cold block went too
        assert version > 1
        await engine.sync()
        engine.evict_all()
        assert await engine.read("v", 0, BS) == b"cold" * (BS // 4)
        assert await engine.read("v", BS, BS) == version.to_bytes(8, "big") * (BS // 8)
    finally:
        await engine.close()
