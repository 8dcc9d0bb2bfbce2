"""Issue 20's findings in the engine, each staged on purpose (a store call or a file sync is
paused, the other task runs, then the first resumes) and each failing without its fix:
a flush cycle that overtook a snapshot, a full cache that froze the event loop, rollback and
volume delete spinning once the writer lost the store, a failed fdatasync forgotten by the
next fsync, and rollback racing a new snapshot."""

import errno
import sqlite3
import tempfile
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from snapfs.errors import CacheSyncFailed, CatalogFailed, ReadOnly, SnapfsError
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig
from tests.faultstore import FaultStore
from tests.sim.files import SimFiles
from tests.volume.test_races import BS, make, no_hang


async def new_store() -> FaultStore:
    store = FaultStore(MemoryStore())
    await publish.init_store(store)
    return store


async def test_a_flush_cycle_does_not_overtake_a_snapshot_of_a_later_volume():
    """Finding 1 (simulation seeds 2, 263, 272): a cycle looked for pending snapshots once,
    then committed the volumes one after the other. A snapshot of `b` taken while `a`
    committed was not seen: `b` was committed in its new epoch, so the snapshot took a write
    made after it (block 1), and the snapshot commit then reset `b`'s tree to the save of
    block 0 that the cycle had already cleaned: after eviction `b` read its old data."""
    store = await new_store()
    engine = await make(store, cache_size=256 * BS)
    try:
        await engine.create_volume("a", 4 * BS, BS)
        await engine.create_volume("b", 4 * BS, BS)
        await engine.write("b", BS, b"x" * BS)
        await engine.sync()  # b block 1 is clean, in the store
        await engine.write("a", 0, b"a" * BS)
        await engine.write("b", 0, b"o" * BS)  # dirty when the snapshot is taken
        gate = store.pause("put", "p/")  # the cycle's first pack: volume a's
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.flush_once)
            await gate.wait_reached()
            await engine.create_snapshot("b", "s")
            await engine.write("b", 0, b"n" * BS)  # saved first: the snapshot needs "o"
            await engine.write("b", BS, b"y" * BS)  # clean at the snapshot: "x" is its
            engine.assert_invariants()
            gate.release()
        engine.assert_invariants()
        await engine.sync()
        engine.evict_all()
        assert await engine.read("b", 0, 2 * BS) == b"n" * BS + b"y" * BS
        snap = await engine.wait_available("b", "s")
        assert await engine.read_snapshot(snap, 0, 2 * BS) == b"o" * BS + b"x" * BS
        engine.assert_invariants()
        assert (await engine.check()).clean
    finally:
        await engine.close()


async def test_a_partial_write_into_a_full_cache_does_not_freeze_the_loop():
    """Finding 4: with dirty bytes at the cache size, a partial write to a block that is not
    cached fetched it, and the fetch's eviction threw it out again at once: for a hole whose
    tree nodes are cached nothing in that loop awaited, and the event loop spun for ever
    (`--cache-size 1M`, 128K blocks, one unaligned 1 MiB write)."""
    engine = await make(cache_size=8 * BS)
    try:
        await engine.create_volume("v", 32 * BS, BS)
        data = bytes(range(256)) * (8 * BS // 256)
        with no_hang(10):
            await engine.write("v", 100, data)  # 9 blocks, the last one partial
        engine.assert_invariants()
        assert await engine.read("v", 100, len(data)) == data
        await engine.sync()
        engine.evict_all()
        assert await engine.read("v", 0, 10 * BS) == bytes(100) + data + bytes(
            10 * BS - 100 - len(data)
        )
    finally:
        await engine.close()


async def snapshot_then_write(engine) -> None:
    """Volume v: "a" in snapshot s1 (available), then "b" written in block 0."""
    await engine.create_volume("v", 4 * BS, BS)
    await engine.write("v", 0, b"a" * BS)
    await engine.create_snapshot("v", "s1")
    await engine.wait_available("v", "s1")
    await engine.write("v", 0, b"b" * BS)


async def lost_while_waiting(engine, store, call, *args):
    """Run `call` while another task's flush cycle holds the commit lock (paused at its
    pack upload) and, meanwhile, a second writer takes the store over: that cycle learns it
    at its publish, and `call` then meets a writer that is lost after its own first check.
    Returns what `call` raised."""
    raised: list[Exception] = []

    async def run(what, *args):
        try:
            await what(*args)
        except Exception as exc:  # the test looks at it
            raised.append(exc)

    gate = store.pause("put", "p/")
    with no_hang(10), trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, engine.flush_once)
            await gate.wait_reached()
            nursery.start_soon(run, call, *args)
            await trio.testing.wait_all_tasks_blocked()
            other = await make(store)  # fences the store
            gate.release()
    await other.close()
    assert isinstance(raised[0], ReadOnly), raised[0]  # the cycle's publish
    return raised[1]


@pytest.mark.parametrize("what", ["rollback", "delete_volume"])
async def test_rollback_and_delete_do_not_spin_once_the_writer_is_lost(what):
    """Finding 5: `while head.pending: await self.flush_once()` went round for ever once
    flush_once returned at once (the writer lost the store)."""
    store = await new_store()
    engine = await make(store, cache_size=64 * BS)
    try:
        await snapshot_then_write(engine)
        await engine.create_snapshot("v", "s2")  # the paused cycle commits this one
        await engine.write("v", 0, b"c" * BS)
        await engine.create_snapshot("v", "s3")  # pending: rollback must commit it first
        if what == "rollback":
            exc = await lost_while_waiting(engine, store, engine.rollback, "v", "s1")
        else:
            for snap in ("s1", "s2", "s3"):  # pending ones stay, as `deleting`
                await engine.delete_snapshot("v", snap)
            exc = await lost_while_waiting(engine, store, engine.delete_volume, "v")
        assert isinstance(exc, ReadOnly), exc
    finally:
        await engine.close()


async def test_a_failed_datasync_fails_every_later_fsync_of_the_volume():
    """The fsyncgate lesson: once an fdatasync of a cache file failed, the kernel may have
    dropped the pages it could not write, so a later fsync that succeeds would acknowledge
    data that is gone. Every later fsync (and snapshot) of that volume fails until it is
    remounted; other volumes are not affected."""
    files = SimFiles()
    failing = {"on": True}

    def hook(op, path):
        if failing["on"] and op == "datasync" and path.endswith("vol-1.cache"):
            failing["on"] = False
            raise OSError(errno.EIO, "injected writeback error")

    files.hook = hook
    store = await new_store()
    cache_dir = None
    engine = await make(store, files=files, cache_size=64 * BS)
    try:
        cache_dir = engine.cache_dir
        await engine.create_volume("v", 4 * BS, BS)
        await engine.create_volume("w", 4 * BS, BS)
        assert engine.head("v").row.id == 1
        await engine.write("v", 0, b"a" * BS)
        await engine.write("v", BS, b"b" * BS)
        for _ in range(3):  # the file syncs fine again: the pages may still be gone
            with pytest.raises(SnapfsError) as raised:
                await engine.fsync("v")
            assert raised.value.errno == errno.EIO
        with pytest.raises(SnapfsError):
            await engine.create_snapshot("v", "s")
        await engine.write("w", 0, b"w" * BS)
        await engine.fsync("w")  # another volume is fine
    finally:
        with pytest.raises(CacheSyncFailed):  # unmounted all the same, not marked clean
            await engine.close()
    engine = await make(store, files=files, cache_dir=cache_dir, cache_size=64 * BS)
    try:  # remounted: the volume works again; what w had fsynced is there
        assert await engine.read("w", 0, BS) == b"w" * BS
        await engine.write("v", 0, b"c" * BS)
        await engine.fsync("v")
        await engine.create_snapshot("v", "s")
    finally:
        await engine.close()


async def test_rollback_rechecks_pending_snapshots_after_taking_its_locks():
    """A snapshot taken while rollback waited for its locks holds the volume as it was
    before the rollback: rollback must complete it first, not roll back under it."""
    store = await new_store()
    engine = await make(store, cache_size=64 * BS)
    try:
        await snapshot_then_write(engine)
        async with trio.open_nursery() as nursery, engine.commit_lock:
            nursery.start_soon(engine.rollback, "v", "s1")
            await trio.testing.wait_all_tasks_blocked()
            await engine.create_snapshot("v", "s2")  # taken before the rollback ran
        snap = await engine.wait_available("v", "s2")
        assert await engine.read_snapshot(snap, 0, BS) == b"b" * BS
        assert await engine.read("v", 0, BS) == b"a" * BS
        engine.assert_invariants()
        assert (await engine.check()).clean
    finally:
        await engine.close()


class FailingCommits:
    """The catalog's connection, failing its next COMMIT as a full or failing disk does."""

    def __init__(self, db) -> None:
        self.db, self.fail = db, 0

    def __getattr__(self, name):
        return getattr(self.db, name)

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)


async def test_a_catalog_commit_that_fails_stops_the_writer_until_remounted():
    """A failed SQLite commit (ENOSPC, EIO) escaped as sqlite3.OperationalError, and the
    engine went on with memory that the catalog on disk no longer matched. Now it is EIO
    with one line, the change is rolled back, every later change fails the same way (as
    ext4's errors=remount-ro), unmount works, and a remount recovers what was fsynced."""
    store = await new_store()
    engine = await make(store, cache_size=64 * BS)
    cache_dir = engine.cache_dir
    await engine.create_volume("v", 4 * BS, BS)
    await engine.write("v", 0, b"a" * BS)
    await engine.fsync("v")
    engine.catalog.db = failing = FailingCommits(engine.catalog.db)
    failing.fail = 1
    await engine.write("v", BS, b"b" * BS)
    with pytest.raises(CatalogFailed) as raised:
        await engine.fsync("v")
    assert raised.value.errno == errno.EIO
    for call in (
        engine.write("v", 0, b"c" * BS),
        engine.fsync("v"),
        engine.create_snapshot("v", "s"),
        engine.sync(),
    ):
        with pytest.raises(CatalogFailed):
            await call
    assert not await engine.flush_once()
    assert await engine.read("v", 0, BS) == b"a" * BS  # reads go on
    await engine.close()
    engine = await make(store, cache_dir=cache_dir, cache_size=64 * BS)
    try:
        assert await engine.read("v", 0, BS) == b"a" * BS
        await engine.write("v", BS, b"d" * BS)
        await engine.fsync("v")
        engine.assert_invariants()
    finally:
        await engine.close()


async def test_a_write_after_a_resize_across_a_tree_level_keeps_the_refcounts():
    """Found by the simulation once it resized volumes: growing the tree wrapped the old
    root in a new node, which the update then replaced; both counted the old root as a
    child, so it was counted twice (fsck: 'counted 2, referenced 1') and never freed."""
    engine = await make(cache_size=64 * BS)
    try:
        await engine.create_volume("v", 6 * BS, BS)
        await engine.write("v", 0, b"a" * BS)
        await engine.sync()
        await engine.resize_volume("v", 305 * BS)  # a tree of two levels now
        await engine.write("v", 300 * BS, b"b" * BS)
        await engine.sync()
        report = await engine.check()
        assert report.clean, report.as_dict()
        engine.evict_all()
        assert await engine.read("v", 0, BS) == b"a" * BS
        assert await engine.read("v", 300 * BS, BS) == b"b" * BS
    finally:
        await engine.close()


async def test_a_listing_that_lags_neither_hides_objects_from_a_reader_nor_from_fsck():
    """Found by the simulation with store listings that lag (Swift's container listings
    do): a catalog found by probing named objects in packs and fragments the listing did
    not show yet. A new reader's index dropped their blobs ('not in the index'), and fsck
    reported fresh packs 'missing from the store'. The catalog now names its index
    fragments, and a pack that a fragment names but the listing leaves out is asked for."""
    store = await new_store()
    writer = await make(store, cache_size=64 * BS)
    reader = None
    try:
        store.lag = 1e9  # every listing shows the store as it was before what follows
        await writer.create_volume("v", 8 * BS, BS)
        await writer.write("v", 0, b"a" * 8 * BS)
        await writer.create_snapshot("v", "s")
        await writer.sync()
        report = await writer.check()
        assert report.clean, report.as_dict()
        reader = await Engine.open(
            store, tempfile.mkdtemp(prefix="snapfs-reader-"), EngineConfig(), read_only=True
        )
        snap = reader.snapshot_row("v", "s")
        assert await reader.read_snapshot(snap, 0, 8 * BS) == b"a" * 8 * BS
    finally:
        store.lag = 0.0
        if reader is not None:
            await reader.close()
        await writer.close()


async def test_a_writer_displaced_before_its_commit_keeps_its_blocks_dirty():
    """A displaced writer's sync committed its fsynced blocks locally (clean, the dirty
    rows gone) before its publish found the other writer's catalog: unmount then said
    nothing was left to upload, and an eviction could drop the only copy the cache dir
    had (tests/fuse/test_umount.py saw '(0)' instead of '2M'). A commit now asks first
    whether another writer fenced (one HEAD): the blocks stay dirty."""
    async with synced_volume() as (store, engine, others):
        await engine.write("v", 0, b"a" * 4 * BS)
        await engine.fsync("v")
        others.append(await make(store))  # fences the store: --takeover
        with pytest.raises(ReadOnly):
            await engine.sync()
        assert engine.lease_lost
        assert engine.statistics().dirty_bytes == 4 * BS
        assert sorted(engine.catalog.dirty(engine.head("v").row.id)) == [0, 1, 2, 3]


@asynccontextmanager
async def synced_volume():
    """A writer with volume v (8 blocks) in the store; engines the test appends to the
    list (another writer) are closed too."""
    store = await new_store()
    engine = await make(store, cache_size=64 * BS)
    others: list = []
    try:
        await engine.create_volume("v", 8 * BS, BS)
        await engine.sync()
        yield store, engine, others
    finally:
        for other in others:
            await other.close()
        await engine.close()


async def test_sync_fails_when_another_task_learns_meanwhile_that_the_writer_lost():
    """Found by the simulation (soak seed 1057): a background cycle learned that the
    writer lost the store while sync waited for the commit lock; sync's own cycles then
    returned at once, its publish had nothing new to publish, and sync returned as if its
    writes were in the store. A takeover then read zeros for them."""
    async with synced_volume() as (store, engine, others):
        await engine.write("v", 0, b"a" * BS)
        gate = store.pause("put", "p/")  # the background cycle's pack
        raised: list[Exception] = []

        async def run(call):
            try:
                await call()
            except Exception as exc:  # the test looks at it
                raised.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, engine.flush_once)
            await gate.wait_reached()
            await engine.write("v", BS, b"b" * BS)
            nursery.start_soon(run, engine.sync)
            await trio.testing.wait_all_tasks_blocked()
            others.append(await make(store))  # fences the store
            gate.release()
        assert len(raised) == 2 and all(isinstance(e, ReadOnly) for e in raised), raised
        assert engine.statistics().dirty_bytes == 2 * BS


async def test_a_read_that_outlives_its_volume_does_not_touch_its_closed_files():
    """Found by the simulation (soak seed 1133): a read fetching a block from the store
    while its volume went away (deleted; on a read-only mount, gone at a refresh) then
    cached the block into the closed cache file: EBADF, and a clean block of a volume the
    cache no longer knows."""
    store = await new_store()
    engine = await make(store, cache_size=64 * BS)
    try:
        await engine.create_volume("v", 8 * BS, BS)
        await engine.write("v", 0, b"a" * BS)
        await engine.sync()
        engine.evict_all()
        gate = store.pause("get", "p/")
        got: list[bytes] = []

        async def read():
            got.append(await engine.read("v", 0, BS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await gate.wait_reached()
            await engine.delete_volume("v")
            gate.release()
        assert got == [b"a" * BS]  # it began before the delete
        engine.assert_invariants()
    finally:
        await engine.close()


async def test_sync_uploads_a_block_written_again_while_it_runs():
    """Found by the simulation (seed 3287): sync uploaded only the blocks written before
    it began and not written since (by write generation), so a block written again during
    its fsync phase was skipped: sync returned, and the store had neither the version from
    before the call nor the new one (a takeover read zeros). It is uploaded now, with what
    it holds when read."""
    store = await new_store()
    files = SimFiles()
    engine = await make(store, files=files, grace=0)
    try:
        await engine.create_volume("v", 8 * BS, BS)
        await engine.write("v", 0, b"a" * BS)  # acknowledged before the sync begins
        gate = files.pause("datasync", ".cache")  # the sync's fsync phase waits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.sync)
            await gate.wait_reached()
            await engine.write("v", 0, b"b" * BS)  # written again while the sync runs
            gate.release()
        reader = await Engine.open(
            store, tempfile.mkdtemp(prefix="snapfs-reader-"), EngineConfig(), read_only=True
        )
        try:
            assert await reader.read("v", 0, BS) in (b"a" * BS, b"b" * BS)
        finally:
            await reader.close()
    finally:
        await engine.close()
