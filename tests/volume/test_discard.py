"""Discard at the engine level: dirty data that is discarded is never uploaded, a pending
snapshot keeps what it froze, and huge ranges cost what is mapped, not their length."""

import os
import tempfile

from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 64 << 10
TiB = 1 << 40


async def open_engine() -> Engine:
    store = MemoryStore()
    await publish.init_store(store)
    return await Engine.open(store, tempfile.mkdtemp(prefix="snapfs-discard-"), EngineConfig())


async def test_discarded_dirty_data_is_not_uploaded():
    engine = await open_engine()
    try:
        await engine.create_volume("v", 64 * BS, BS)
        await engine.sync()
        uploaded = engine.statistics().uploaded_bytes
        await engine.write("v", 0, os.urandom(32 * BS))
        assert engine.allocated_bytes("v") == 32 * BS
        await engine.discard("v", 0, 64 * BS)
        assert engine.allocated_bytes("v") == 0
        assert await engine.read("v", 0, 32 * BS) == bytes(32 * BS)
        await engine.sync()
        stats = engine.statistics()
        assert stats.uploaded_bytes - uploaded < BS  # metadata at most, no block
        assert stats.stored_data_bytes == 0
        assert stats.discarded_bytes == 64 * BS
    finally:
        await engine.close(flush=False)


async def test_a_pending_snapshot_keeps_the_discarded_data():
    engine = await open_engine()
    try:
        await engine.create_volume("v", 16 * BS, BS)
        old = os.urandom(15 * BS) + bytes(BS)
        await engine.write("v", 0, old)
        await engine.sync()
        # Dirty when the snapshot is taken: a partial edge, a whole mapped block and a whole
        # block the tree does not map yet.
        await engine.write("v", 0, b"x" * BS)
        await engine.write("v", 5 * BS, b"y" * BS)
        await engine.write("v", 15 * BS, b"z" * BS)
        old = b"x" * BS + old[BS : 5 * BS] + b"y" * BS + old[6 * BS : 15 * BS] + b"z" * BS
        await engine.create_snapshot("v", "s")  # pending until the flusher commits it
        await engine.discard("v", 100, 14 * BS)
        await engine.discard("v", 15 * BS, BS)
        new = old[:100] + bytes(14 * BS) + old[14 * BS + 100 : 15 * BS] + bytes(BS)
        assert await engine.read("v", 0, 16 * BS) == new
        assert engine.allocated_bytes("v") == 2 * BS  # the partial blocks at the edges
        snap = await engine.wait_available("v", "s")
        # The snapshot's commit mapped the frozen block 15: here it is still a hole.
        assert engine.allocated_bytes("v") == 2 * BS
        assert await engine.read_snapshot(snap, 0, 16 * BS) == old
        await engine.sync()
        engine.evict_all()
        assert await engine.read("v", 0, 16 * BS) == new
        assert engine.allocated_bytes("v") == 2 * BS  # the partial blocks at the edges
        assert (await engine.check()).clean
    finally:
        await engine.close(flush=False)


async def test_discarding_a_whole_huge_volume_costs_what_is_mapped():
    engine = await open_engine()
    try:
        await engine.create_volume("big", TiB, BS)
        await engine.write("big", TiB // 2, os.urandom(3 * BS))
        await engine.sync()
        await engine.discard("big", 0, TiB)  # mkfs discards the whole device like this
        head = engine.head("big")
        assert len(head.dirty) == 3 and engine.allocated_bytes("big") == 0
        await engine.sync()
        assert engine.statistics().stored_data_bytes == 0
    finally:
        await engine.close(flush=False)


async def test_a_partial_discard_of_a_discarded_block_across_a_snapshot_allocates_nothing():
    """Found by the model test: a block discarded, then a snapshot, then part of it
    discarded again. It reads as zeros already, so nothing is written (it used to become
    an all-zero dirty block and count as allocated)."""
    engine = await open_engine()
    try:
        await engine.create_volume("v", 8 * BS, BS)
        await engine.write("v", 0, b"x")
        await engine.discard("v", 0, BS)
        assert engine.allocated_bytes("v") == 0
        await engine.create_snapshot("v", "s")
        await engine.discard("v", 0, 1)
        assert engine.allocated_bytes("v") == 0
        await engine.sync()
        assert engine.allocated_bytes("v") == 0
        assert await engine.read("v", 0, BS) == bytes(BS)
        snap = engine.catalog.snapshot("v", "s")
        assert await engine.read_snapshot(snap, 0, BS) == bytes(BS)
    finally:
        await engine.close(flush=False)
