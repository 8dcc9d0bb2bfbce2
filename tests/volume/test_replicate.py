"""The replicator in-process, between two memory stores: a snapshot arrives as an available
reference that manage adopts exactly; a later snapshot sends only its changes; a replicate
cut after a committed batch resumes from its inbound reference without sending the
committed objects again, nor what the cut run uploaded and never committed (adopted from
its orphan packs); the target's refcounts are right at every step (fsck clean), and
a store-only restore of the target mid-way keeps what the inbound reference holds."""

import os
import tempfile

import pytest

from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.catalog import SnapshotRow
from snapfs.volume.engine import Engine, EngineConfig
from snapfs.volume.replicate import Replicator

BS = 4096
SIZE = 1100 * BS  # a two-level tree with five leaves


async def engine_on(store) -> Engine:
    cache = tempfile.mkdtemp(prefix="snapfs-repl-")
    return await Engine.open(store, cache, EngineConfig(grace=0))


async def two_stores() -> tuple[Engine, MemoryStore]:
    src, dst = MemoryStore(), MemoryStore()
    await publish.init_store(src)
    await publish.init_store(dst)
    return await engine_on(src), dst


async def clean(engine: Engine) -> None:
    report = await engine.check(verify_data=True)
    assert report.clean, report.as_dict()
    engine.assert_invariants()


async def adopted(target: Engine, rid: str, volume: str) -> bytes:
    await target.create_volume(volume, SIZE, BS)
    snap = await target.manage(volume, rid)
    return await target.read_snapshot(snap, 0, snap.size)


async def ends_exact(target: Engine, rid: str, want: bytes) -> None:
    """fsck clean, reference `rid` adopted into a new volume reads `want`, fsck clean."""
    await clean(target)
    assert await adopted(target, rid, "x") == want
    await clean(target)


class Cut(Exception):
    pass


async def test_full_then_incremental_then_resume():
    source, dst = await two_stores()
    target = await engine_on(dst)
    try:
        await source.create_volume("v", SIZE, BS)
        for blk in (0, 1, 300, 600, 1000, 1099):
            await source.write("v", blk * BS, os.urandom(BS))
        a = await source.create_snapshot("v", "a")
        await source.write("v", 601 * BS, os.urandom(BS))
        b = await source.create_snapshot("v", "b")
        await source.sync()
        a, b = source.snapshot_row("v", "a"), source.snapshot_row("v", "b")
        want_a = await source.read_snapshot(a, 0, SIZE)
        want_b = await source.read_snapshot(b, 0, SIZE)
        first = Replicator(source, a, target)
        ref_a = await first.run("a", "first", "src")
        assert ref_a.state == "available" and ref_a.guid == a.guid
        assert first.stats.sent_objects == 6 + 5 + 1  # chunks, leaves, root
        await clean(target)
        second = Replicator(source, b, target)
        ref_b = await second.run("b", "", "src")
        assert second.stats.sent_objects == 3  # the new chunk, its leaf, the root
        assert second.stats.sent_bytes < first.stats.sent_bytes / 3
        again = Replicator(source, b, target)
        assert (await again.run("b", "", "src")).id == ref_b.id
        assert again.stats.sent_objects == 0
        await clean(target)
        assert await adopted(target, ref_a.id, "x") == want_a
        assert await adopted(target, ref_b.id, "y") == want_b
        await clean(target)
    finally:
        await target.close()
        await source.close()


async def test_a_cut_replicate_resumes_and_sends_committed_objects_once():
    source, dst = await two_stores()
    target = await engine_on(dst)
    try:
        await source.create_volume("v", SIZE, BS)
        await source.write("v", 0, os.urandom(SIZE))
        snap = await source.create_snapshot("v", "full")
        await source.sync()
        snap = source.snapshot_row("v", "full")
        want = await source.read_snapshot(snap, 0, SIZE)
        sent = []

        def cut_after_two_batches(n: int) -> None:
            sent.append(n)
            if len(sent) > 600:  # mid-way through the third leaf: two batches are in
                raise Cut()

        cut = Replicator(source, snap, target, batch_bytes=200 * BS, on_bytes=cut_after_two_batches)
        with pytest.raises(Cut):
            await cut.run("full", "", "src")
        assert cut.stats.batches == 2
        target.chunks.discard_staged()
        [inbound] = target.references()
        assert inbound.state == "inbound" and len(inbound.held()) == 2
        await clean(target)
        await target.sync()
    finally:
        await target.close()
    target = await engine_on(dst)  # a store-only restore keeps what the reference holds
    try:
        await clean(target)
        rest = Replicator(source, snap, target, batch_bytes=200 * BS)
        ref = await rest.run("full", "", "src")
        assert ref.id == inbound.id and ref.state == "available"
        assert rest.stats.sent_objects == 1100 + 5 + 1 - 2 * 257  # two leaves were in
        await ends_exact(target, ref.id, want)
    finally:
        await target.close()
        await source.close()


async def one_then_two(source: Engine, changed: int) -> tuple[SnapshotRow, SnapshotRow, bytes]:
    """Snapshots v@one (all random) and v@two (block `changed` rewritten), synced; and
    what v@two reads."""
    await source.create_volume("v", SIZE, BS)
    await source.write("v", 0, os.urandom(SIZE))
    await source.create_snapshot("v", "one")
    await source.write("v", changed * BS, os.urandom(BS))
    await source.create_snapshot("v", "two")
    await source.sync()
    one, two = source.snapshot_row("v", "one"), source.snapshot_row("v", "two")
    return one, two, await source.read_snapshot(two, 0, SIZE)


class CutBeforeThirdCommit(Replicator):
    """Killed as the third batch commits: its packs (and index fragment) are in the store,
    its transaction never happens."""

    async def _commit(self, stale: list[bytes]) -> None:
        if self.stats.batches == 2:
            await self.target.chunks.flush()
            raise Cut()
        await super()._commit(stale)


async def stored_blobs(engine: Engine) -> list[bytes]:
    """The key of every blob every pack in the engine's store holds (a repeat: twice)."""
    keys = []
    for name in await engine.store.list("p/"):
        table, _size = await engine.chunks.read_trailer(bytes.fromhex(name.rsplit("/", 1)[1]))
        keys += [key for key, _offset, _length in table]
    return keys


@pytest.mark.parametrize("shared", [False, True])
async def test_a_rerun_adopts_what_the_cut_run_uploaded_and_sends_nothing_twice(shared):
    """Cut after its third batch's packs were uploaded and before their commit, then run
    again on the same cache dir (as after kill -9): the rerun finds those packs (no index
    lists them), adopts their blobs instead of sending them, and every blob ends up stored
    exactly once; fsck clean, the copy exact. Shared: as a restore into a mount does."""
    source, dst = await two_stores()
    target = await engine_on(dst)
    cache = target.cache_dir
    try:
        await source.create_volume("v", SIZE, BS)
        await source.write("v", 0, os.urandom(SIZE))
        await source.create_snapshot("v", "full")
        await source.sync()
        snap = source.snapshot_row("v", "full")
        want = await source.read_snapshot(snap, 0, SIZE)
        cut = CutBeforeThirdCommit(source, snap, target, batch_bytes=200 * BS)
        with pytest.raises(Cut):
            await cut.run("full", "", "src")
        assert cut.stats.sent_objects == 3 * 257
        uploaded = await stored_blobs(target)
        assert len(uploaded) == len(set(uploaded)) == 3 * 257
        await clean(target)  # the third batch's packs are orphans, known to no index
        await target.close()
        target = await Engine.open(dst, cache, EngineConfig(grace=0))
        rest = Replicator(source, snap, target, batch_bytes=200 * BS, shared=shared)
        ref = await rest.run("full", "", "src")
        print(f"cut: {cut.stats}\nrerun: {rest.stats}")
        assert ref.state == "available"
        assert rest.stats.sent_objects == 1106 - 3 * 257  # without adoption: 1106 - 2 * 257
        stored = await stored_blobs(target)
        assert len(stored) == len(set(stored)) == 1106  # nothing sent twice
        assert rest.stats.adopted_objects == 257
        await ends_exact(target, ref.id, want)
    finally:
        await target.close()
        await source.close()


async def test_a_pack_partly_adopted_is_dead_bytes_for_gc():
    """A backup cut before its third commit, taken over by a backup of a snapshot that
    changed one block of that third leaf: the rerun adopts the 255 chunks it shares with
    the orphan pack, not the old chunk and leaf, which stay unindexed in a pack that is
    partly live; fsck clean, and gc rewrites it (its live blobs move, it goes)."""
    source, dst = await two_stores()
    target = await engine_on(dst)
    try:
        one, two, want = await one_then_two(source, 600)  # block 600: leaf 3
        with pytest.raises(Cut):
            await CutBeforeThirdCommit(source, one, target, batch_bytes=200 * BS).run(
                "mon", "", "src", unique=True
            )
        rest = Replicator(source, two, target, batch_bytes=200 * BS, shared=True)
        ref = await rest.run("mon", "", "src", unique=True)
        assert rest.stats.adopted_objects == 255
        assert rest.stats.sent_objects == 1106 - 2 * 257 - 255
        await clean(target)
        _pid, size, live = target.chunks.sparse_packs(1.0)[0]  # the least live first
        assert live == rest.stats.adopted_bytes
        assert (await target.gc(threshold=live / size + 0.001))["rewritten_packs"] == 1
        await clean(target)
        stored = await stored_blobs(target)
        assert len(stored) == len(set(stored)) == 1106
        assert await adopted(target, ref.id, "x") == want
        await clean(target)
    finally:
        await target.close()
        await source.close()


async def test_a_backup_takes_over_the_inbound_reference_of_its_name():
    """A backup (unique name) cut after two batches whose snapshot is gone: the next
    backup of that name, of another snapshot, takes the inbound reference over and does
    not send the committed leaves again; then the name is taken (AlreadyExists). The run
    after the cut holds the target's commit lock per batch (shared, as a restore does)."""
    from snapfs.errors import AlreadyExists

    source, dst = await two_stores()
    target = await engine_on(dst)
    try:
        one, two, want = await one_then_two(source, 1000)  # block 1000: leaf 4
        sent = []

        def cut_after_two_batches(n: int) -> None:
            sent.append(n)
            if len(sent) > 600:
                raise Cut()

        cut = Replicator(source, one, target, batch_bytes=200 * BS, on_bytes=cut_after_two_batches)
        with pytest.raises(Cut):
            await cut.run("mon", "", "src", unique=True)
        [inbound] = target.references()
        rest = Replicator(source, two, target, batch_bytes=200 * BS, shared=True)
        ref = await rest.run("mon", "", "src", unique=True)
        assert (ref.id, ref.state, ref.guid) == (inbound.id, "available", two.guid)
        assert rest.stats.sent_objects == 1100 + 5 + 1 - 2 * 257
        assert not target.commit_lock.locked()
        await clean(target)
        with pytest.raises(AlreadyExists):
            await Replicator(source, one, target).run("mon", "", "src", unique=True)
        assert await adopted(target, ref.id, "x") == want
        await clean(target)
    finally:
        await target.close()
        await source.close()
