"""Fencing: two writers on one store, lost replies, crashes between a publish and its
record, and read-only engines beside a writer that deletes and collects. Real
interleavings: a store call is paused (FaultStore) while the other side runs."""

import contextlib
import os
import tempfile

import pytest
import trio

from snapfs import codec
from snapfs.errors import Busy, ReadOnly, StoreError
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.check import expected_refs
from snapfs.volume.engine import Engine, EngineConfig
from tests.faultstore import FaultStore
from tests.sim.world import walk_catalog

BS = 16 << 10
SIZE = 32 * BS


class Clock:
    """This host's clock, advanced by the test (grace periods)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def config(**kw) -> EngineConfig:
    kw.setdefault("grace", 0)
    return EngineConfig(pack_size=8 * BS, **kw)


async def new_store() -> FaultStore:
    store = FaultStore(MemoryStore())
    await publish.init_store(store)
    return store


async def open_engine(store, cache_dir=None, read_only=False, **kw) -> Engine:
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="snapfs-fence-")
    return await Engine.open(store, cache_dir, config(**kw), read_only=read_only)


def crash(engine: Engine) -> None:
    """kill -9: nothing is flushed, persisted or marked clean; files are just closed."""
    for head in engine.heads.values():
        head.close()
    engine.catalog.close()


def drop_snapshot_cache(engine: Engine) -> None:
    engine.snap_cache.clear()


async def read_snap(engine: Engine, name: str) -> bytes:
    drop_snapshot_cache(engine)
    return await engine.read_snapshot(engine.snapshot_row("v", name), 0, SIZE)


async def missing_from_store(store, doc: dict) -> list[str]:
    """Keys that catalog `doc` references but whose blob is in no pack of the store."""
    reader = await open_engine(store, read_only=True)
    try:
        roots = [(v["root"], v["block_size"]) for v in doc["volumes"]]
        roots += [(s["root"], s["block_size"]) for s in doc["snapshots"]]
        drop_snapshot_cache(reader)
        refs = await expected_refs(reader.tree, roots)  # reads every node from the store
        listed = set(await store.list("p/"))
        out = []
        for key in refs:
            loc = reader.chunks.location(key)
            if loc is None or f"p/{loc[0].hex()[:2]}/{loc[0].hex()}" not in listed:
                out.append(key.hex())
        return out
    finally:
        await reader.close(flush=False)


async def restore_exact(store, contents: dict[str, bytes]) -> None:
    """A third, empty cache dir restores every snapshot exactly, and fsck is clean."""
    fresh = await open_engine(store, read_only=True)
    try:
        assert {s.name for s in fresh.catalog.snapshots("v")} == set(contents)
        for name, data in contents.items():
            assert await read_snap(fresh, name) == data, name
        report = await fresh.check()
        assert report.clean, report.as_dict()
    finally:
        await fresh.close(flush=False)


async def note_outcome(outcome: dict, name: str, call) -> None:
    """Run `call()` and note under `name` None, or the ReadOnly or StoreError it raised."""
    try:
        await call()
        outcome[name] = None
    except (ReadOnly, StoreError) as exc:
        outcome[name] = exc


async def test_a_takeover_never_deletes_what_a_paused_writer_is_about_to_publish():
    store = await new_store()
    a = await open_engine(store)
    await a.create_volume("v", SIZE, BS)
    one = os.urandom(SIZE)
    await a.write("v", 0, one)
    await a.create_snapshot("v", "one")
    await a.sync()
    a_published = await publish.latest_catalog(store)

    # A uploads the packs of its next commit, then stops before publishing it.
    await a.write("v", 0, os.urandom(SIZE))
    await a.create_snapshot("v", "two")
    packs_before = set(await store.list("p/"))
    gate = store.pause("put_new", "catalog/")
    outcome: dict[str, BaseException | None] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(note_outcome, outcome, "a", a.sync)
        with trio.fail_after(10):
            await gate.wait_reached()
        a_packs = set(await store.list("p/")) - packs_before
        assert a_packs  # uploaded, in no catalog yet
        # B takes over: restores, fences, sweeps orphans, collects (A's packs), gc.
        b = await open_engine(store)
        await b.sweep_orphans()
        await b.gc(threshold=0.99)
        assert a_packs <= set(store.deleted)  # garbage to B: nothing it knows needs them
        gate.release()
    # The store restores exactly: A's publish, which would reference the packs B deleted,
    # was refused, and A lost the store.
    await restore_exact(store, {"one": one})
    assert await missing_from_store(store, await publish.latest_catalog(store)) == []
    assert isinstance(outcome["a"], ReadOnly), outcome
    assert a.lease_lost and "another writer" in a.lease_lost
    # B goes on.
    await b.write("v", 0, os.urandom(BS))
    await b.create_snapshot("v", "from-b")
    await b.sync()
    b_contents = {n: await read_snap(b, n) for n in ("one", "from-b")}
    b_published = await publish.latest_catalog(store)
    assert b_published["writer"] == b.fence.writer
    await restore_exact(store, b_contents)
    assert await missing_from_store(store, a_published) == []
    assert await missing_from_store(store, b_published) == []
    assert b_contents["one"] == one
    with pytest.raises(ReadOnly):  # A publishes nothing, ever
        await a.sync()
    a.fence.assert_invariants()
    b.fence.assert_invariants()
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    "fault", [("put_new", "catalog/", True), ("list", "catalog/", False)], ids=["reply", "list"]
)
async def test_a_store_error_after_the_publish_landed_does_not_fence_the_writer(fault):
    store = await new_store()
    engine = await open_engine(store)
    await engine.create_volume("v", SIZE, BS)
    data = os.urandom(SIZE)
    await engine.write("v", 0, data)
    op, prefix, after = fault
    store.fail(op, prefix, after=after)
    with contextlib.suppress(StoreError):
        await engine.sync()  # the catalog PUT lands; then the reply or the LIST fails
    await engine.sync()  # the retry recognises its own catalog
    assert not engine.lease_lost
    store.clear()
    await engine.create_snapshot("v", "s")
    await engine.sync()
    assert not engine.lease_lost
    newest = await publish.latest_catalog(store)
    assert newest["writer"] == engine.fence.writer
    assert newest["changes"] == engine.statistics().catalog_seq
    await restore_exact(store, {"s": data})
    # Sequences in the store have no gaps.
    seqs = await publish.listed_seqs(store)
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    engine.fence.assert_invariants()
    await engine.close()


async def test_a_crash_after_the_catalog_landed_keeps_the_cache_dir_and_its_dirty_data():
    store = await new_store()
    cache_dir = tempfile.mkdtemp(prefix="snapfs-fence-")
    engine = await open_engine(store, cache_dir)
    await engine.create_volume("v", SIZE, BS)
    first = os.urandom(SIZE)
    await engine.write("v", 0, first)
    await engine.sync()
    second = os.urandom(4 * BS)
    await engine.write("v", 0, second)
    store.fail("put_new", "catalog/", after=True)
    with pytest.raises(StoreError):
        await engine.sync()  # catalog N+1 is in the store; the cache dir never learnt it
    third = os.urandom(4 * BS)
    await engine.write("v", 8 * BS, third)
    await engine.fsync("v")  # durable, not uploaded
    crash(engine)

    expected = second + first[4 * BS : 8 * BS] + third + first[12 * BS :]
    engine = await open_engine(store, cache_dir)  # its own catalog, not another writer's
    try:
        assert not engine.lease_lost
        assert engine.head("v").dirty  # the fsynced write survived, still to upload
        assert await engine.read("v", 0, SIZE) == expected
        await engine.create_snapshot("v", "after")
        await engine.sync()
        engine.evict_all()
        assert await engine.read("v", 0, SIZE) == expected
        engine.fence.assert_invariants()
    finally:
        await engine.close()
    await restore_exact(store, {"after": expected})


async def test_a_displaced_writers_cache_dir_is_refused_with_what_it_did_not_upload():
    store = await new_store()
    cache_dir = tempfile.mkdtemp(prefix="snapfs-fence-")
    a = await open_engine(store, cache_dir)
    await a.create_volume("v", SIZE, BS)
    await a.write("v", 0, os.urandom(SIZE))
    await a.sync()
    await a.write("v", 4 * BS, os.urandom(2 * BS))  # in its cache, never uploaded
    await a.fsync("v")
    b = await open_engine(store)  # takes over
    await a.close(flush=False)  # the displaced daemon goes away
    with pytest.raises(Busy) as err:
        await open_engine(store, cache_dir)
    message = str(err.value)
    assert "older than the store" in message and "--cache-dir" in message
    assert "32K written but not uploaded (volumes v)" in message
    await b.close()


async def test_a_writer_that_publishes_during_a_restore_is_followed_not_overwritten():
    store = await new_store()
    a = await open_engine(store)
    await a.create_volume("v", SIZE, BS)
    await a.write("v", 0, os.urandom(SIZE))
    await a.sync()
    gate = store.pause("put_new", "catalog/")  # B's fence publish
    opened: dict[str, Engine] = {}

    async def open_b() -> None:
        opened["b"] = await open_engine(store)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_b)
        with trio.fail_after(10):
            await gate.wait_reached()
        late = os.urandom(SIZE)
        await a.write("v", 0, late)
        await a.create_snapshot("v", "late")
        await a.sync()  # A's last publish, at the seq B wanted for its fence
        gate.release()
    b = opened["b"]
    assert b.snapshot_row("v", "late").state == "available"  # restored again from it
    assert await read_snap(b, "late") == late
    await a.write("v", 0, b"x")
    with pytest.raises(ReadOnly):  # A's next publish finds B's catalog
        await a.sync()
    await b.close()
    await a.close()


async def test_garbage_and_orphans_wait_for_the_grace_period():
    clock = Clock()
    store = await new_store()
    engine = await open_engine(store, grace=60, clock=clock, gc_threshold=0.99)
    await engine.create_volume("v", SIZE, BS)
    for i in range(3):
        await engine.write("v", 0, os.urandom(SIZE // 2))
        await engine.create_snapshot("v", f"s{i}")
        await engine.sync()
    await engine.delete_snapshot("v", "s0")
    await engine.delete_snapshot("v", "s1")
    await engine.gc()
    store.fail("put", "i/")  # a flush fails after its packs went up: orphans
    await engine.write("v", 0, os.urandom(SIZE))
    with pytest.raises(StoreError):
        await engine.sync()
    assert await engine.sweep_orphans() == 0  # seen, remembered, not yet deleted
    assert not [k for k in store.deleted if k.startswith(("p/", "i/"))]
    clock.now += 30
    await engine.sync()
    assert await engine.sweep_orphans() == 0
    assert not [k for k in store.deleted if k.startswith(("p/", "i/"))]
    clock.now += 31
    assert await engine.sweep_orphans() > 0
    await engine.sync()  # collect: the rewritten packs' grace is over
    assert [k for k in store.deleted if k.startswith("p/")]
    assert not engine.sweep_needed
    report = await engine.check()
    assert report.clean and report.orphan_packs == 0, report.as_dict()
    engine.fence.assert_invariants()
    await engine.close()


async def test_a_read_only_engine_reads_on_while_the_writer_deletes_and_collects():
    clock = Clock()
    store = await new_store()
    w = await open_engine(store, grace=60, clock=clock, gc_threshold=0.99)
    await w.create_volume("v", SIZE, BS)
    await w.write("v", 0, os.urandom(SIZE))
    await w.create_snapshot("v", "a")
    await w.sync()  # a's blocks go up in order, then b overwrites every other one
    for blk in range(0, SIZE // BS, 2):  # every pack of a: half of it is b's
        await w.write("v", blk * BS, os.urandom(BS))
    await w.create_snapshot("v", "b")
    await w.sync()
    b = await read_snap(w, "b")
    ro = await open_engine(store, read_only=True, grace=60, clock=clock)
    assert await read_snap(ro, "b") == b

    await w.delete_snapshot("v", "a")
    result = await w.gc()  # the blobs of b move to new packs
    assert result["rewritten_packs"] > 0
    assert await read_snap(ro, "b") == b
    assert not [k for k in store.deleted if k.startswith("p/")]  # inside the grace period

    clock.now += 61
    await w.sync()  # collect: the old packs go now
    assert [k for k in store.deleted if k.startswith("p/")]
    assert await read_snap(ro, "b") == b  # not refreshed: a miss reloads the index
    await w.create_snapshot("v", "c")
    await w.sync()
    assert await ro.refresh()
    assert {s.name for s in ro.catalog.snapshots("v")} == {"b", "c"}
    assert await read_snap(ro, "b") == b
    assert await read_snap(ro, "c") == await read_snap(w, "c")
    ro.fence.assert_invariants()
    await ro.close()
    await w.close()


async def test_a_read_only_cache_dir_reused_shows_what_was_published_since():
    store = await new_store()
    w = await open_engine(store)
    await w.create_volume("v", SIZE, BS)
    await w.write("v", 0, os.urandom(SIZE))
    await w.create_snapshot("v", "one")
    await w.sync()
    ro_dir = tempfile.mkdtemp(prefix="snapfs-fence-ro-")
    ro = await open_engine(store, ro_dir, read_only=True)
    assert [s.name for s in ro.catalog.snapshots("v")] == ["one"]
    await ro.close()
    two = os.urandom(SIZE)
    await w.write("v", 0, two)
    await w.create_snapshot("v", "two")
    await w.delete_snapshot("v", "one")
    await w.sync()
    ro = await open_engine(store, ro_dir, read_only=True)
    try:
        assert [s.name for s in ro.catalog.snapshots("v")] == ["two"]
        assert await read_snap(ro, "two") == two
    finally:
        await ro.close()
    await w.close()


async def test_uploads_are_counted_when_their_put_succeeds():
    store = await new_store()
    engine = await open_engine(store)
    await engine.create_volume("v", SIZE, BS)
    await engine.write("v", 0, os.urandom(SIZE))
    before = engine.statistics()
    store.fail("put", "p/", times=None)  # an outage
    for _ in range(3):
        with pytest.raises(StoreError):
            await engine.sync()
    stats = engine.statistics()
    assert (stats.uploaded_bytes, stats.uploaded_objects) == (
        before.uploaded_bytes,
        before.uploaded_objects,
    )
    store.clear()
    await engine.sync()
    stats = engine.statistics()
    assert stats.uploaded_bytes - before.uploaded_bytes >= SIZE
    assert stats.uploaded_objects - before.uploaded_objects >= SIZE // BS
    await engine.close()


class NewestFirstListing(FaultStore):
    """Lists the index fragments newest first. Fragments are named by their digest, so an
    older fragment comes after a newer one about half the time; here it always does."""

    async def list(self, prefix: str = "") -> list[str]:
        keys = await super().list(prefix)
        if prefix == "i/":
            written = {key: i for i, (op, key) in enumerate(self.calls) if op == "put"}
            keys.sort(key=lambda k: written.get(k, -1), reverse=True)
        return keys


def drop_fragment_seqs(store: FaultStore) -> None:
    """Make the fragments in the store those of a version without `seq`."""
    for key, body in store.inner.objects.items():
        if key.startswith("i/"):
            doc = codec.unpack(body, key)
            doc.pop("seq", None)
            store.inner.objects[key] = codec.pack(doc)


@pytest.mark.parametrize("old_fragments", [False, True], ids=["seq", "old-fragments"])
async def test_a_takeover_restore_maps_blobs_to_the_pack_gc_moved_them_to(old_fragments):
    """Issue 20, finding 2: a blob that gc moved from P1 to P2 is in two fragments. The
    restore kept the placement of the fragment that came last in listing order, P1, which
    the old writer deletes when its grace ends: synced data gone for good. (Fragments
    written before they had a seq count as the oldest.)"""
    clock = Clock()
    store = NewestFirstListing(MemoryStore())
    await publish.init_store(store)
    a = await open_engine(store, grace=60, clock=clock, gc_threshold=0.99)
    await a.create_volume("v", SIZE, BS)
    await a.write("v", 0, os.urandom(SIZE))
    await a.create_snapshot("v", "a")
    await a.sync()
    for blk in range(0, SIZE // BS, 2):  # every pack of a: half of it is b's
        await a.write("v", blk * BS, os.urandom(BS))
    await a.create_snapshot("v", "b")
    await a.sync()
    await a.delete_snapshot("v", "a")
    if old_fragments:
        drop_fragment_seqs(store)
    assert (await a.gc())["rewritten_packs"] > 0  # the old packs wait for the grace
    b_data = await read_snap(a, "b")

    # A's grace ends: its collect checks its fence, then its deletes of the old packs are
    # on their way while B takes over and restores.
    clock.now += 61
    deleting, go = trio.Event(), trio.Event()

    async def hold_pack_deletes(op: str, key: str, after: bool) -> None:
        if op == "delete" and key.startswith("p/") and not after:
            deleting.set()
            await go.wait()

    store.hook = hold_pack_deletes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.sync)
        with trio.fail_after(10):
            await deleting.wait()
        store.hook = None
        b = await open_engine(store, grace=60, clock=clock)
        go.set()
    assert [k for k in store.deleted if k.startswith("p/")]
    b.evict_all()
    assert await read_snap(b, "b") == b_data
    assert await b.read("v", 0, SIZE) == b_data
    clock.now += 61
    await b.gc(threshold=0.99)
    await b.sync()
    assert await missing_from_store(store, await publish.latest_catalog(store)) == []
    await restore_exact(store, {"b": b_data})
    b.fence.assert_invariants()
    await a.close()
    await b.close()


async def synced_then_written(store, clock):
    """Writer A with a synced volume written again, and a gate that stops its next
    publish."""
    a = await open_engine(store, grace=60, clock=clock)
    await a.create_volume("v", SIZE, BS)
    await a.write("v", 0, os.urandom(SIZE))
    await a.sync()
    await a.write("v", 0, os.urandom(SIZE))
    return a, store.pause("put_new", "catalog/")


async def test_a_writer_paused_longer_than_the_grace_learns_it_lost_and_deletes_nothing():
    """Issue 20, finding 3: B's fence is catalog N+1, deleted once three newer ones are out
    and the grace has passed. A, paused before its publish of N+1 (SIGSTOP, a frozen VM)
    for longer than that, wakes up: its conditional put of N+1 succeeded, and its sweep
    deleted B's packs as orphans."""
    clock = Clock()
    store = await new_store()
    a, gate = await synced_then_written(store, clock)
    outcome: dict[str, BaseException | None] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(note_outcome, outcome, "a", a.sync)
        with trio.fail_after(10):
            await gate.wait_reached()  # A stops before it publishes N+1
        b = await open_engine(store, grace=60, clock=clock)  # its fence: N+1
        fence = b.fence.store_seq
        for i in range(4):
            await b.write("v", i * BS, os.urandom(BS))
            await b.create_snapshot("v", f"s{i}")
            await b.sync()
        clock.now += 61
        await b.sync()  # B deletes its old catalogs, its fence among them
        assert await store.head(publish.catalog_key(fence)) is None
        b_contents = {f"s{i}": await read_snap(b, f"s{i}") for i in range(4)}
        deleted = len(store.deleted)
        gate.release()  # A wakes up
    for _ in range(2):  # A's sweep, a grace period apart
        with contextlib.suppress(ReadOnly, StoreError):
            await a.sweep_orphans()
        clock.now += 61
    with contextlib.suppress(ReadOnly, StoreError):
        await a.sync()
    assert store.deleted[deleted:] == []  # A deleted nothing
    await restore_exact(store, b_contents)
    assert isinstance(outcome["a"], ReadOnly), outcome
    assert a.lease_lost and "another writer" in a.lease_lost
    a.fence.assert_invariants()
    await b.sync()
    assert not b.lease_lost
    await restore_exact(store, b_contents)
    await a.close()
    await b.close()


async def test_a_takeover_wins_against_a_writer_that_keeps_publishing():
    """Issue 20, finding 6: the open restored the whole store before it fenced; a writer
    that kept publishing meanwhile always won, and the open gave up (Busy) after four
    tries: exactly the case --takeover is for. The open fences first now."""
    store = await new_store()

    async def slow(op: str, key: str, after: bool) -> None:
        if not after:  # a restore lists the packs slowly (a large store)
            await trio.sleep(0.5 if op == "list" and key == "p/" else 0.002)

    a = await open_engine(store, grace=60)
    await a.create_volume("v", SIZE, BS)
    for i in range(4):
        await a.write("v", i * BS, os.urandom(4 * BS))
        await a.sync()
    store.hook = slow
    outcome: dict[str, BaseException | None] = {}
    stopped = trio.Event()

    async def keep_publishing() -> None:
        blk = 0
        try:
            while True:
                await a.write("v", blk * BS, os.urandom(BS))
                await a.sync()
                blk = (blk + 1) % (SIZE // BS)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(note_outcome, outcome, "a", keep_publishing)
        await trio.sleep(0.1)  # A is in full swing
        b = await open_engine(store, grace=60)
        fence = b.fence.store_seq
        with trio.fail_after(60):
            await stopped.wait()  # A's next publish finds B's fence
    store.hook = None
    assert isinstance(outcome["a"], ReadOnly), outcome
    assert a.lease_lost and "another writer" in a.lease_lost
    with pytest.raises(ReadOnly):  # EROFS
        await a.write("v", 0, b"x" * BS)
    for seq in await publish.listed_seqs(store):  # A published nothing after B's fence
        if seq >= fence:
            assert (await publish.read_catalog(store, seq))["writer"] == b.fence.writer, seq
    b.evict_all()
    data = await b.read("v", 0, SIZE)
    assert (await b.check()).clean
    await b.create_snapshot("v", "after")
    await b.sync()
    await restore_exact(store, {"after": data})
    b.fence.assert_invariants()
    await a.close()
    await b.close()


async def test_fsck_of_a_displaced_writer_says_it_lost_instead_of_calling_objects_missing():
    """Found by the simulation (a displaced writer's fsck, seeds 27 and 35 with
    takeovers=2,pause=True): A committed blocks locally but was stopped before it published
    them; B took the store over from A's last catalog and, a grace period later, swept
    A's packs as orphans, as it should. A's fsck then called them missing: damage to
    repair, where the truth is that A lost the store. It now says so (ReadOnly)."""
    clock = Clock()
    store = await new_store()
    a, gate = await synced_then_written(store, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(note_outcome, {}, "a", a.sync)
        with trio.fail_after(10):
            await gate.wait_reached()  # A committed its blocks, stops before it publishes
        b = await open_engine(store, grace=60, clock=clock)
        for _ in range(2):  # B's sweep, a grace period apart: A's new packs go
            await b.sweep_orphans()
            clock.now += 61
        nursery.cancel_scope.cancel()  # A never publishes: it does not know it lost
    assert a.lease_lost is None
    with pytest.raises(ReadOnly, match="another writer"):
        await a.check()
    assert (await b.check()).clean
    await a.close()
    await b.close()


async def test_what_gc_retires_stays_a_grace_period_after_the_catalog_without_it_is_out():
    """Found by the simulation's audit of every catalog younger than the grace (seeds 46,
    51, 57 among 12 of the 60): gc queued the packs it emptied and the fragments it folded
    with their grace starting at its local commit, and published no catalog (it changed
    only the index). A reader that took the catalog from before the gc, which names the
    old fragments and so the old packs, found them gone less than a grace period after any
    catalog without them was out. Now gc's change is published like any other, and the
    grace of what it retires starts when that catalog is out."""
    clock = Clock()
    store = await new_store()
    a = await open_engine(store, grace=60, clock=clock)
    await a.create_volume("v", SIZE, BS)
    await a.write("v", 0, os.urandom(SIZE))
    await a.sync()
    await a.write("v", 0, os.urandom(SIZE // 2))  # half the first packs' blobs die
    await a.sync()
    before = await publish.read_catalog(store, a.fence.store_seq)

    async def no_catalogs(op: str, key: str, after: bool) -> None:
        if op == "put_new" and key.startswith("catalog/"):
            raise StoreError("injected: the store is out of reach for a while")

    store.hook = no_catalogs
    with contextlib.suppress(StoreError):
        await a.gc(threshold=1.0)  # moves the live half into new packs, cannot publish
    assert a.fence.changes() > a.fence.covers, "gc's change waits for a catalog"
    store.hook = None
    clock.now += 50  # the store comes back
    await a.sync()  # the catalog without the old packs is out now
    clock.now += 20  # 70 s after gc, 20 s after that catalog
    await a.sync()
    assert await walk_catalog(store.inner, before) == []
    clock.now += 41  # a grace period after the catalog without them: they go
    await a.sync()
    assert await walk_catalog(store.inner, before) != []
    await restore_exact_volume(store, a)
    await a.close()


async def restore_exact_volume(store, engine: Engine) -> None:
    fresh = await open_engine(store, read_only=True)
    try:
        assert await fresh.read("v", 0, SIZE) == await engine.read("v", 0, SIZE)
        assert (await fresh.check()).clean
    finally:
        await fresh.close(flush=False)
