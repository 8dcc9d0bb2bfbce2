"""A restore cancelled mid-copy (the CLI's Ctrl-C sends `cancel restore VOL`): the copy stops
at once with Cancelled and makes no volume; what it copied stays as an inbound reference;
the next restore of the same backup goes on from there (sends less than the whole) and
ends exact with fsck clean. Only the restore's starter or root may cancel it; a volume with
no restore under way is NotFound."""

import os

import pytest
import trio

from snapfs.control import Controller
from snapfs.errors import Cancelled, NotFound, PermissionDenied
from snapfs.store import open_store
from snapfs.volume import publish
from snapfs.volume.bank import restore_backup
from snapfs.volume.engine import Engine, EngineConfig
from snapfs.volume.replicate import Replicator

BS = 4096
SIZE = 2048 * BS


async def local_engine(root: str) -> Engine:
    store = open_store(f"file://{root}/store")
    await publish.init_store(store)
    return await Engine.open(store, f"{root}/cache", EngineConfig(grace=0, pack_size=64 << 10))


@pytest.fixture
async def sites(tmp_path):
    """(site, bank URL, the backup's bytes): a volume backed up into a local bank as
    "b1", and a second site's engine to restore into."""
    source = await local_engine(str(tmp_path / "a"))
    bank = await local_engine(str(tmp_path / "bank"))
    site = await local_engine(str(tmp_path / "b"))
    data = os.urandom(SIZE)
    await source.create_volume("db", SIZE, BS)
    await source.write("db", 0, data)
    snap = await source.create_snapshot("db", "s")
    await source.sync()
    snap = await source.wait_available("db", "s")
    await Replicator(source, snap, bank).run("b1", "", "test", unique=True)
    await source.close()
    await bank.close()
    yield site, f"file://{tmp_path}/bank/store", data
    await site.close()


async def test_a_cancelled_restore_makes_nothing_and_the_next_goes_on(sites):
    site, bank, data = sites
    cancel = trio.CancelScope()
    seen = []

    def copied(n: int) -> None:
        seen.append(n)
        if sum(seen) >= SIZE // 2:
            cancel.cancel()  # as `cancel restore` does, mid-copy

    with pytest.raises(Cancelled, match="run it again"):
        await restore_backup(site, bank, "b1", "r", 0, copied, cancel)
    assert [v.name for v in site.volumes()] == []
    [ref] = site.references()
    assert ref.state == "inbound" and ref.name == "b1"
    assert (await site.check()).clean
    site.assert_invariants()
    report = await restore_backup(site, bank, "b1", "r", 0)
    print(report, sum(seen))
    # The packs the cut copy uploaded are adopted, not sent again.
    assert report["adopted_bytes"] > SIZE // 4 and report["sent_bytes"] < SIZE * 3 // 4, report
    assert await site.read("r", 0, SIZE) == data
    report = await site.check(verify_data=True)
    assert report.clean, report.as_dict()


async def test_cancel_through_the_controller(sites):
    site, bank, data = sites
    status: dict = {}
    controller = Controller(site, status)
    with pytest.raises(NotFound, match="no restore into 'r'"):
        await controller.execute("cancel restore r", 0)
    got = []

    async def run() -> None:
        with pytest.raises(Cancelled):
            await controller.execute(f"restore b1 --bank {bank} --as r", 0)
        got.append("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        for _ in range(60000):  # until the copy has begun (a minute at most)
            if status.get("restores", {}).get("r", {}).get("copied_bytes"):
                break
            await trio.sleep(0.001)
        with pytest.raises(PermissionDenied):
            await controller.execute("cancel restore r", 1000)
        assert await controller.execute("cancel restore r", 0) == {"cancelled": "r"}
    assert got == ["cancelled"] and status["restores"] == {}
    assert [v.name for v in site.volumes()] == []
    await controller.execute(f"restore b1 --bank {bank} --as r", 0)
    assert await site.read("r", 0, SIZE) == data
