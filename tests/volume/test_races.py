"""Interleavings that once lost data, each staged on purpose: a store call or a file sync
is paused, the other task runs, then the first resumes. Every test ends with the engine's
invariants and the data read back after eviction (from the store)."""

import tempfile

import pytest
import trio

from snapfs.errors import NotFound, ReadOnly
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig
from tests.faultstore import FaultStore
from tests.sim.files import SimFiles
from tests.sim.watchdog import wall_alarm

BS = 4096


async def make(store=None, files=None, cache_dir=None, **config) -> Engine:
    if store is None:
        store = FaultStore(MemoryStore())
        await publish.init_store(store)
    return await Engine.open(
        store,
        cache_dir or tempfile.mkdtemp(prefix="snapfs-race-"),
        EngineConfig(**config),
        files=files or SimFiles(),
    )


def no_hang(seconds: int = 20):
    """Fail (instead of hanging the suite) when the event loop stops turning: trio's own
    timeouts cannot fire while a task spins without a checkpoint (the simulation's
    SIGALRM guard, raising `Stuck`)."""
    return wall_alarm(seconds)


async def test_a_save_overtaken_by_the_snapshot_commit_keeps_the_write():
    """Bug 1: the write's copy-on-write save awaits its fdatasync; meanwhile the snapshot
    commit completes and caches the block as clean; the write then made it dirty too, so
    eviction punched it (reads gave zeros), and the save's row leaked for good."""
    files = SimFiles()
    engine = await make(files=files, cache_size=64 * BS)
    try:
        await engine.create_volume("v", 8 * BS, BS)
        old, new = b"o" * BS, b"n" * BS
        await engine.write("v", 0, old)
        await engine.create_snapshot("v", "s")
        gate = files.pause("datasync", ".frozen")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.write, "v", 0, new)
            await gate.wait_reached()  # the save is written, its sync is under way
            assert await engine.flush_once()  # the snapshot commit lands meanwhile
            gate.release()
        engine.assert_invariants()
        engine.evict_all()
        assert await engine.read("v", 0, BS) == new
        await engine.sync()
        engine.evict_all()
        assert await engine.read("v", 0, BS) == new
        snap = await engine.wait_available("v", "s")
        assert await engine.read_snapshot(snap, 0, BS) == old
        assert engine.statistics().frozen_bytes == 0
        assert engine.catalog.frozen(engine.head("v").row.id) == []
        engine.assert_invariants()
        assert (await engine.check()).clean
    finally:
        await engine.close()


async def lose_the_store(engine: Engine, store) -> Engine:
    """A second writer takes the store over and publishes: `engine`'s next publish finds
    its sequence taken. Returns the new writer."""
    other = await make(store)
    await other.create_volume("taken", 4 * BS, BS)
    await engine.create_volume("late", 4 * BS, BS)  # its publish is refused: lost
    assert engine.lease_lost
    return other


async def test_a_writer_that_lost_the_store_refuses_writes_and_does_not_hang():
    """Bug 4: after losing the store, writes and fsync still succeeded into a cache that
    could never be published; writers past the dirty limit waited for ever; and reading a
    `creating` snapshot spun without a checkpoint, freezing the event loop."""
    store = FaultStore(MemoryStore())
    await publish.init_store(store)
    engine = await make(store, cache_size=16 * BS)
    other = None
    try:
        await engine.create_volume("v", 16 * BS, BS)
        await engine.write("v", 0, b"a" * 6 * BS)  # below the dirty limit (8 blocks)
        await engine.fsync("v")
        await engine.create_snapshot("v", "s")  # stays creating: nothing flushes it
        with pytest.raises(ReadOnly):
            other = await lose_the_store(engine, store)
        other = await make(store) if other is None else other
        with no_hang():
            with pytest.raises(ReadOnly):
                await engine.write("v", 0, b"b" * BS)
            with pytest.raises(ReadOnly):
                await engine.fsync("v")
            with pytest.raises(ReadOnly):
                await engine.discard("v", 0, BS)
            with pytest.raises(ReadOnly):
                await engine.wait_available("v", "s")
        # What it had fsynced stays in its cache (for recovery), unchanged.
        assert await engine.read("v", 0, 6 * BS) == b"a" * 6 * BS
        engine.assert_invariants()
    finally:
        await engine.close()
        if other is not None:
            await other.close()


async def test_a_writer_that_lost_the_store_fails_a_write_waiting_for_dirty_room():
    store = FaultStore(MemoryStore())
    await publish.init_store(store)
    engine = await make(store, cache_size=8 * BS)  # dirty limit: 4 blocks
    other = None
    try:
        await engine.create_volume("v", 16 * BS, BS)
        store.fail("put", "p/", times=None)  # the flusher cannot make room
        await engine.write("v", 0, b"a" * 4 * BS)
        with no_hang(), trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                result = {}

                async def blocked_writer():
                    try:
                        await engine.write("v", 8 * BS, b"w" * BS)
                        result["ok"] = True
                    except ReadOnly as exc:
                        result["error"] = exc

                nursery.start_soon(blocked_writer)
                await trio.sleep(0.5)
                assert not result  # waits for room while the store fails
                with pytest.raises(ReadOnly):  # packs still fail: no room comes first
                    other = await lose_the_store(engine, store)
                store.clear()
        assert isinstance(result.get("error"), ReadOnly), result
        engine.assert_invariants()
    finally:
        await engine.close()
        if other is not None:
            await other.close()


async def test_a_creating_snapshot_of_a_lost_writer_does_not_freeze_the_event_loop():
    """Bug 4, last part: wait_available looped over a flush_once that returned at once,
    with no checkpoint: no other task (no FUSE request) ran again."""
    store = FaultStore(MemoryStore())
    await publish.init_store(store)
    engine = await make(store)
    other = None
    try:
        await engine.create_volume("v", 4 * BS, BS)
        await engine.write("v", 0, b"a" * BS)
        await engine.create_snapshot("v", "s")
        with pytest.raises(ReadOnly):
            other = await lose_the_store(engine, store)
        with no_hang(), pytest.raises(ReadOnly):
            await engine.wait_available("v", "s")
    finally:
        await engine.close()
        if other is not None:
            await other.close()


def crash(engine: Engine, files: SimFiles) -> None:
    """Drop the engine as kill -9 does: no flush, no clean mark; unsynced writes lost."""
    for head in engine.heads.values():
        head.close()
    engine.catalog.close()
    files.crash()


async def test_a_temporary_snapshot_still_creating_at_a_crash_is_gone_after_it():
    """Found by the simulation: a temporary snapshot still `creating` when the daemon died
    came back after the restart and was later committed as available."""
    store = FaultStore(MemoryStore())
    await publish.init_store(store)
    files = SimFiles()
    cache_dir = tempfile.mkdtemp(prefix="snapfs-race-")
    engine = await make(store, files, cache_dir)
    await engine.create_volume("v", 4 * BS, BS)
    await engine.write("v", 0, b"t" * BS)
    await engine.create_snapshot("v", "tmp", temporary=True)
    await engine.create_snapshot("v", "kept")
    crash(engine, files)
    engine = await make(store, files, cache_dir)
    try:
        with pytest.raises(NotFound):
            engine.snapshot_row("v", "tmp")
        await engine.sync()
        assert [s.name for s in engine.catalog.snapshots("v")] == ["kept"]
        snap = await engine.wait_available("v", "kept")
        assert await engine.read_snapshot(snap, 0, BS) == b"t" * BS
        engine.assert_invariants()
        assert (await engine.check()).clean
    finally:
        await engine.close()


async def test_sync_makes_what_came_before_it_durable_even_if_rewritten_during_it():
    """Found by the simulation: a block written (B) after its last fsync (A) and written
    again (C) while `sync` ran was skipped by the sync's upload (rightly: C is newer than
    the call), but B was never made durable either: after a crash the block read A, older
    than what sync had returned for."""
    store = FaultStore(MemoryStore())
    await publish.init_store(store)
    files = SimFiles()
    cache_dir = tempfile.mkdtemp(prefix="snapfs-race-")
    engine = await make(store, files, cache_dir)
    await engine.create_volume("v", 4 * BS, BS)
    await engine.create_volume("w", 4 * BS, BS)
    await engine.write("v", 0, b"A" * BS)
    await engine.fsync("v")
    await engine.write("v", 0, b"B" * BS)
    await engine.write("w", 0, b"w" * BS)
    await engine.create_snapshot("w", "s")  # the sync's first cycle commits it
    gate = store.pause("put", "p/")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.sync)
        await gate.wait_reached()
        await engine.write("v", 0, b"C" * BS)  # during the sync: not covered by it
        gate.release()
    crash(engine, files)
    engine = await make(store, files, cache_dir)
    try:
        assert await engine.read("v", 0, BS) in (b"B" * BS, b"C" * BS)
        engine.assert_invariants()
    finally:
        await engine.close()
