"""Read-ahead: a sequential cold read keeps several store GETs in flight, a random one
fetches only what it reads; the bytes are exact either way."""

import os
import tempfile

import pytest
import trio

from snapfs.chunks import CHUNK, digest
from snapfs.errors import IntegrityError
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 64 << 10
N = 64


class SlowStore(MemoryStore):
    """A store with a round trip, which counts the GETs in flight."""

    in_flight = 0
    most = 0
    gets = 0

    async def get(self, key, offset=0, length=None):
        self.in_flight += 1
        self.gets += 1
        self.most = max(self.most, self.in_flight)
        try:
            await trio.sleep(0.002)
            return await super().get(key, offset, length)
        finally:
            self.in_flight -= 1


async def test_sequential_reads_fetch_ahead_random_reads_do_not():
    store = SlowStore()
    await publish.init_store(store)
    cache = tempfile.mkdtemp(prefix="snapfs-ra-")
    config = EngineConfig(readahead_bytes=16 * BS, pack_size=2 * BS)  # a pack per 2 blocks
    engine = await Engine.open(store, cache, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.readahead.run)
        try:
            data = os.urandom(N * BS)
            await engine.create_volume("v", N * BS, BS)
            await engine.write("v", 0, data)
            await engine.create_snapshot("v", "s")
            await engine.sync()
            snap = await engine.wait_available("v", "s")

            # Random reads of the head: nothing ahead.
            engine.evict_all()
            store.most = store.gets = engine.readahead.issued = 0
            for blk in (40, 3, 25, 10, 55, 17, 33, 60, 6, 48):
                assert await engine.read("v", blk * BS, BS) == data[blk * BS : (blk + 1) * BS]
            assert engine.readahead.issued == 0 and store.gets <= 10 + 2  # + tree nodes

            # Sequential reads of the head, in 16 KiB requests: several GETs at once.
            engine.evict_all()
            store.most = 0
            got = bytearray()
            for off in range(0, N * BS, 16 << 10):
                got += await engine.read("v", off, 16 << 10)
            assert got == data
            assert store.most >= 4 and engine.readahead.issued >= N // 2

            # The same through the snapshot: blocks of one pack come in one GET.
            store.most = store.gets = 0
            got = bytearray()
            for off in range(0, N * BS, BS):
                got += await engine.read_snapshot(snap, off, BS)
            assert got == data and store.most >= 4
            assert store.gets < N * 3 // 4  # 64 without it; batches may split a pack
        finally:
            nursery.cancel_scope.cancel()
            await engine.close(flush=False)


async def test_get_many_coalesces_and_verifies():
    store = SlowStore()
    await publish.init_store(store)
    engine = await Engine.open(
        store, tempfile.mkdtemp(prefix="snapfs-ra-"), EngineConfig(pack_size=8 * BS)
    )
    try:
        blocks = [os.urandom(BS) for _ in range(16)]
        await engine.create_volume("v", 16 * BS, BS)
        await engine.write("v", 0, b"".join(blocks))
        await engine.sync()
        oids = [digest(b) for b in blocks]
        store.gets = 0
        got = await engine.chunks.get_many(CHUNK, oids)
        assert got == dict(zip(oids, blocks, strict=True))
        assert store.gets <= 3  # two packs of 8 blocks (tree nodes may share the second)

        pack = next(k for k in store.objects if k.startswith("p/"))
        body = bytearray(store.objects[pack])
        body[100] ^= 1
        store.objects[pack] = bytes(body)
        with pytest.raises(IntegrityError, match="does not match its digest"):
            await engine.chunks.get_many(CHUNK, oids)
    finally:
        await engine.close(flush=False)
