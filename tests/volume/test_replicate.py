"""The replicator in-process, between two memory stores: a snapshot arrives as an available
reference that manage adopts exactly; a later snapshot sends only its changes; a replicate
cut after a committed batch resumes from its inbound reference without sending the
committed objects again; the target's refcounts are right at every step (fsck clean), and
a store-only restore of the target mid-way keeps what the inbound reference holds."""

import os
import tempfile

import pytest

from snapfs.store import MemoryStore
from snapfs.volume import publish
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
        await clean(target)
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
        await source.create_volume("v", SIZE, BS)
        await source.write("v", 0, os.urandom(SIZE))
        await source.create_snapshot("v", "one")
        await source.write("v", 1000 * BS, os.urandom(BS))  # in the fourth leaf
        await source.create_snapshot("v", "two")
        await source.sync()
        one, two = source.snapshot_row("v", "one"), source.snapshot_row("v", "two")
        want = await source.read_snapshot(two, 0, SIZE)
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
