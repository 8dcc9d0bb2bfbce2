"""Snapshot identities (the guid send/receive matches streams by) and the block lists a
stream is made of: a guid is set at creation or given, kept by publish, restore and
read-only engines, derived for records of older versions; `allocated` and `changed_since`."""

import os
import tempfile

import pytest

from snapfs.errors import AlreadyExists, InvalidArgument
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.catalog import Catalog, legacy_guid
from snapfs.volume.engine import Engine, EngineConfig
from snapfs.volume.follow import record_guid

BS = 4096
GUID = "00112233445566778899aabbccddeeff"


async def make(store, read_only: bool = False) -> Engine:
    cache = tempfile.mkdtemp(prefix="snapfs-guid-")
    return await Engine.open(store, cache, EngineConfig(), read_only=read_only)


async def fresh() -> tuple[MemoryStore, Engine]:
    store = MemoryStore()
    await publish.init_store(store)
    return store, await make(store)


async def test_guids_are_set_given_checked_and_kept_by_a_restore():
    store, engine = await fresh()
    try:
        await engine.create_volume("v", 64 * BS, BS)
        await engine.create_volume("w", 64 * BS, BS)
        first = await engine.create_snapshot("v", "one")
        assert len(first.guid) == 32 and int(first.guid, 16)
        given = await engine.create_snapshot("v", "two", guid=GUID.upper())
        assert given.guid == GUID
        with pytest.raises(AlreadyExists):
            await engine.create_snapshot("v", "three", guid=GUID)
        with pytest.raises(InvalidArgument):
            await engine.create_snapshot("v", "three", guid="../x")
        assert (await engine.create_snapshot("w", "two", guid=GUID)).guid == GUID
        await engine.sync()
        doc = await publish.latest_catalog(store)
        assert {(s["volume"], s["name"]): s["guid"] for s in doc["snapshots"]} == {
            ("v", "one"): first.guid,
            ("v", "two"): GUID,
            ("w", "two"): GUID,
        }
    finally:
        await engine.close()
    for read_only in (True, False):
        other = await make(store, read_only=read_only)
        try:
            assert other.snapshot_row("v", "two").guid == GUID
            assert other.snapshot_row("v", "one").guid == first.guid
        finally:
            await other.close()


def test_an_older_catalog_gets_derived_guids_that_a_restore_derives_too(tmp_path):
    path = str(tmp_path / "catalog.sqlite3")
    cat = Catalog(path)
    with cat.transaction():
        cat.add_snapshot("v", "old", 3, "available", None, 0, 8192, BS, False, 0, 1234.5)
    cat.db.execute("ALTER TABLE snapshots DROP COLUMN guid")  # as an older version wrote it
    cat.close()
    cat = Catalog(path)
    try:
        row = cat.snapshot("v", "old")
        assert row is not None and row.guid == legacy_guid("v", "old", 1234.5, 3)
        published = {"volume": "v", "name": "old", "created": 1234.5, "epoch": 3}
        assert record_guid(published) == row.guid
    finally:
        cat.close()


async def test_allocated_and_changed_since_follow_the_blocks():
    _store, engine = await fresh()
    try:
        await engine.create_volume("v", 1024 * BS, BS)
        await engine.write("v", 5 * BS, os.urandom(2 * BS))
        await engine.write("v", 700 * BS, os.urandom(BS))
        await engine.create_snapshot("v", "a")
        assert await engine.allocated("v", "a") == [5, 6, 700]
        assert await engine.changed_since("v", "a") == []
        await engine.write("v", 9 * BS, os.urandom(10))
        assert await engine.changed_since("v", "a") == [9]  # dirty
        await engine.sync()
        assert await engine.changed_since("v", "a") == [9]  # in the tree now
        await engine.discard("v", 5 * BS, BS)
        await engine.create_snapshot("v", "b")
        assert await engine.diff("v", "a", "b") == [5, 9]
        assert await engine.allocated("v", "b") == [6, 9, 700]
    finally:
        await engine.close()
