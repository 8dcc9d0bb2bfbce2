"""References in-process: unmanage moves a snapshot's count to a reference, the volume can
go, manage adopts it into another volume, and the refcounts stay right at every step
(fsck clean); references are published, restored and followed by read-only engines."""

import os
import tempfile

import pytest

from snapfs.errors import AlreadyExists, Busy, InvalidArgument, InvalidReference, NotFound
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 4096
SIZE = 600 * BS  # two levels: 600 blocks


async def make(store, read_only: bool = False) -> Engine:
    cache = tempfile.mkdtemp(prefix="snapfs-refs-")
    return await Engine.open(store, cache, EngineConfig(grace=0), read_only=read_only)


async def clean(engine: Engine) -> None:
    report = await engine.check(verify_data=True)
    assert report.clean, report.as_dict()
    engine.assert_invariants()


async def read_all(engine: Engine, volume: str, name: str) -> bytes:
    snap = engine.snapshot_row(volume, name)
    return await engine.read_snapshot(snap, 0, snap.size)


async def test_unmanage_delete_manage_keeps_counts_and_data():
    store = MemoryStore()
    await publish.init_store(store)
    engine = await make(store)
    try:
        await engine.create_volume("v", SIZE, BS)
        await engine.write("v", 3 * BS, os.urandom(5 * BS))
        await engine.write("v", 520 * BS, os.urandom(2 * BS))
        await engine.create_snapshot("v", "a")
        await engine.write("v", 4 * BS, os.urandom(BS))
        await engine.create_snapshot("v", "b")
        await engine.create_snapshot("v", "t", temporary=True)
        await engine.sync()
        want = {n: await read_all(engine, "v", n) for n in ("a", "b")}
        with pytest.raises(InvalidArgument):
            await engine.unmanage("v", "t")
        await engine.delete_snapshot("v", "t")
        refs = {n: await engine.unmanage("v", n) for n in ("a", "b")}
        assert {r.name for r in engine.references()} == {"a", "b"}
        await clean(engine)
        await engine.delete_volume("v")  # no snapshot left: no --recursive needed
        await engine.sync()
        await clean(engine)
        await engine.create_volume("w", SIZE, BS)
        await engine.create_volume("small", SIZE - BS, BS)
        await engine.create_volume("other", SIZE, 2 * BS)
        with pytest.raises(NotFound):
            await engine.manage("gone", refs["a"].id)
        for volume, rid in (("w", "0" * 16), ("w", "../x"), ("small", refs["a"].id)):
            with pytest.raises(InvalidReference):
                await engine.manage(volume, rid)
        with pytest.raises(InvalidReference):
            await engine.manage("other", refs["a"].id)
        snap = await engine.manage("w", refs["a"].id, "first")
        assert snap.guid == refs["a"].guid and snap.state == "available"
        with pytest.raises(AlreadyExists):
            await engine.manage("w", refs["b"].id, "first")
        await engine.manage("w", refs["b"].id)
        assert await read_all(engine, "w", "first") == want["a"]
        assert await read_all(engine, "w", "b") == want["b"]
        assert engine.references() == []
        await clean(engine)
        again = await engine.unmanage("w", "b")
        await engine.sync()
    finally:
        await engine.close()
    await restored_engines_keep(store, again.id, want["b"])


async def restored_engines_keep(store, rid: str, data: bytes) -> None:
    """A store-only restore and a read-only engine see the reference; the restore can
    adopt it, then deleting the reference frees exactly its data."""
    reader = await make(store, read_only=True)
    try:
        assert [r.id for r in reader.references()] == [rid]
    finally:
        await reader.close()
    engine = await make(store)
    try:
        assert [r.id for r in engine.references()] == [rid]
        await clean(engine)
        await engine.create_volume("x", SIZE, BS)
        await engine.manage("x", rid, "back")
        assert await read_all(engine, "x", "back") == data
        await clean(engine)
        await engine.delete_reference((await engine.unmanage("x", "back")).id)
        await engine.delete_volume("w", recursive=True)
        await engine.sync()
        await clean(engine)
        assert engine.statistics().stored_data_bytes == 0
    finally:
        await engine.close()


async def test_unmanage_refuses_what_is_not_available_or_open():
    store = MemoryStore()
    await publish.init_store(store)
    engine = await make(store)
    try:
        await engine.create_volume("v", SIZE, BS)
        await engine.write("v", 0, os.urandom(BS))
        snap = await engine.create_snapshot("v", "a")
        with pytest.raises(Busy):
            await engine.unmanage("v", "a")  # still creating
        await engine.sync()
        engine.open_snapshot(snap.id)
        with pytest.raises(Busy):
            await engine.unmanage("v", "a")
        engine.close_snapshot(snap.id)
        with pytest.raises(NotFound):
            await engine.unmanage("v", "nope")
        await engine.unmanage("v", "a")
        await clean(engine)
    finally:
        await engine.close()
