"""The owner rule (snapfs/access.py) and where it is applied: the engine, the commands."""

import errno

import pytest

from snapfs.access import check_owner, check_root, visible
from snapfs.control import Controller
from snapfs.errors import BeyondEnd, InvalidArgument, PermissionDenied
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

OWNER, OTHER = 1000, 1001
MiB = 1 << 20


def test_root_sees_and_uses_everything():
    assert visible(OWNER, 0) and visible(0, 0)
    check_owner(OWNER, 0, "volume 'v'")
    check_root(0, "gc")


def test_the_owner_sees_and_uses_its_own():
    assert visible(OWNER, OWNER)
    check_owner(OWNER, OWNER, "volume 'v'")


def test_another_user_is_refused_with_eacces():
    assert not visible(OWNER, OTHER)
    assert not visible(0, OWNER)  # root's objects are root's
    with pytest.raises(PermissionDenied) as info:
        check_owner(OWNER, OTHER, "volume 'v'")
    assert str(info.value) == "volume 'v' belongs to another user"
    assert info.value.errno == errno.EACCES
    for uid in (OWNER, OTHER):
        with pytest.raises(PermissionDenied, match=r"^gc is for root$"):
            check_root(uid, "gc")
    with pytest.raises(PermissionDenied, match=r"^evict is for root: it drops"):
        check_root(OWNER, "evict", "it drops every user's cached blocks")


@pytest.fixture
async def engine(tmp_path):
    store = MemoryStore()
    await publish.init_store(store)
    engine = await Engine.open(store, str(tmp_path / "cache"), EngineConfig())
    try:
        yield engine
    finally:
        await engine.close(flush=False)


async def test_engine_and_commands_apply_the_rule(engine: Engine):
    await engine.create_volume("v", 4 * MiB, 64 << 10, uid=OWNER)
    await engine.create_snapshot("v", "s", uid=OWNER)
    controller = Controller(engine, {})
    with pytest.raises(PermissionDenied, match="belongs to another user"):
        await engine.delete_volume("v", uid=OTHER)
    with pytest.raises(PermissionDenied, match="belongs to another user"):
        await controller.execute("snapshot show v@s", OTHER)
    assert await controller.execute("volume list", OTHER) == []
    assert await controller.execute("snapshot list", OTHER) == []
    assert [v["name"] for v in await controller.execute("volume list", OWNER)] == ["v"]
    assert [s["name"] for s in await controller.execute("snapshot list", 0)] == ["s"]
    for line in ("fsck", "gc", "evict"):  # every user's state: root's (EACCES, not EINVAL)
        with pytest.raises(PermissionDenied, match=f"^{line} is for root") as info:
            await controller.execute(line, OWNER)
        assert info.value.errno == errno.EACCES
    assert (await controller.execute("fsck", 0))["clean"] is True


async def test_a_write_beyond_the_end_is_enospc(engine: Engine):
    await engine.create_volume("v", MiB, 64 << 10)
    for offset in (MiB - 1, MiB, -1):
        with pytest.raises(BeyondEnd) as info:
            await engine.write("v", offset, b"xy")
        assert info.value.errno == errno.ENOSPC
        assert isinstance(info.value, InvalidArgument)
    assert await engine.write("v", MiB - 2, b"xy") == 2
