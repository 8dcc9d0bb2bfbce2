"""The engine calls behind `snapfs import` and `snapfs export`: renaming an import's hidden
volume into place (dirty data, the tree and a restore from the store follow the new name),
and the mapped extents of a snapshot."""

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator

import pytest

from snapfs.errors import AlreadyExists, Busy, InvalidArgument
from snapfs.store import MemoryStore
from snapfs.units import IMPORTING
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 64 << 10
HIDDEN = IMPORTING + "db~1a2b"


@contextlib.asynccontextmanager
async def opened(store) -> AsyncIterator[Engine]:
    """An engine on `store` with a fresh cache dir, closed at the end."""
    engine = await Engine.open(store, tempfile.mkdtemp(prefix="snapfs-images-"), EngineConfig())
    try:
        yield engine
    finally:
        await engine.close()


async def new_store() -> MemoryStore:
    store = MemoryStore()
    await publish.init_store(store)
    return store


async def test_a_hidden_volume_renamed_keeps_its_data_and_the_store_follows():
    store = await new_store()
    async with opened(store) as engine:
        await engine.create_volume(HIDDEN, 8 * BS, BS)
        data = os.urandom(3 * BS)
        await engine.write(HIDDEN, BS, data)
        await engine.sync()
        await engine.write(HIDDEN, 5 * BS, data[:BS])  # dirty at the rename
        await engine.create_volume("other", 4 * BS, BS)
        with pytest.raises(AlreadyExists):
            await engine.rename_volume(HIDDEN, "other")
        engine.open_volume(HIDDEN)
        with pytest.raises(Busy):
            await engine.rename_volume(HIDDEN, "db")
        engine.close_volume(HIDDEN)
        await engine.rename_volume(HIDDEN, "db")
        assert [v.name for v in engine.volumes()] == ["db", "other"]
        assert await engine.read("db", BS, 3 * BS) == data
        assert await engine.read("db", 5 * BS, BS) == data[:BS]
        await engine.create_snapshot("db", "s")
        with pytest.raises(Busy):  # snapshots name their volume: no rename with any
            await engine.rename_volume("db", "db2")
        await engine.sync()
        engine.assert_invariants()
        assert (await engine.check()).clean
    async with opened(store) as again:  # an empty cache dir: restored from the store
        assert [v.name for v in again.volumes()] == ["db", "other"]
        snap = again.snapshot_row("db", "s")
        assert await again.read_snapshot(snap, BS, 3 * BS) == data


async def test_hidden_names_are_checked():
    async with opened(await new_store()) as engine:
        for bad in (IMPORTING + "db", IMPORTING + "../x~1", IMPORTING + "db~", ".db"):
            with pytest.raises(InvalidArgument):
                await engine.create_volume(bad, 4 * BS, BS)


async def test_snapshot_extents_are_the_mapped_blocks_merged_and_clipped():
    async with opened(await new_store()) as engine:
        size = 10 * BS + 4096  # a short tail block
        await engine.create_volume("v", size, BS)
        await engine.write("v", 0, os.urandom(2 * BS))  # blocks 0-1
        await engine.write("v", 4 * BS, bytes(BS))  # zeros: a hole
        await engine.write("v", 5 * BS + 10, b"x")  # block 5
        await engine.write("v", 6 * BS, os.urandom(BS))  # block 6: merged with 5
        await engine.write("v", 10 * BS, b"t" * 4096)  # the tail
        await engine.create_snapshot("v", "s")
        extents = await engine.snapshot_extents("v", "s")
        assert extents == [(0, 2 * BS), (5 * BS, 2 * BS), (10 * BS, 4096)]
