"""`evict` drops every user's clean cached blocks: only root may send it."""

import errno
import json
import os

import pytest

from snapfs.control import Controller
from snapfs.errors import PermissionDenied
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig
from tests.conftest import Snapfs

MiB = 1 << 20
USER = 1000


async def test_controller_refuses_evict_for_other_uids(tmp_path):
    store = MemoryStore()
    await publish.init_store(store)
    engine = await Engine.open(store, str(tmp_path / "cache"), EngineConfig())
    try:
        await engine.create_volume("v", 4 * MiB, 64 << 10, uid=USER)
        await engine.write("v", 0, b"x" * MiB)
        await engine.sync()  # the blocks are clean and cached now
        cached = engine.statistics().cached_bytes
        assert cached >= MiB
        controller = Controller(engine, {})
        with pytest.raises(PermissionDenied) as info:
            await controller.execute("evict", USER)  # even the owner of every volume
        assert info.value.errno == errno.EACCES and "root" in str(info.value)
        assert engine.statistics().cached_bytes == cached
        assert (await controller.execute("evict", 0))["cached_bytes"] == 0
    finally:
        await engine.close(flush=False)


def ctl_as(uid: int, mnt, line: str) -> tuple[int, dict]:
    """Open the ctl file and send `line` as `uid` (a forked child: the mount point's
    parents are root's 0700 tmp dirs, so it starts in the mount point)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(rfd)
            os.chdir(mnt)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fd = os.open(".snapfs/ctl", os.O_RDWR)
            err = 0
            try:
                os.write(fd, (line + "\n").encode())
            except OSError as exc:
                err = exc.errno
            reply = os.pread(fd, 1 << 20, 0)
            os.write(wfd, json.dumps({"errno": err, "reply": reply.decode()}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    doc = json.loads(out)
    return doc["errno"], json.loads(doc["reply"])


@pytest.mark.fuse
def test_evict_through_the_ctl_file_is_for_root_only(snapfs: Snapfs):
    snapfs.cli("volume", "create", "v", "--size", "16M")
    with open(snapfs.vol("v"), "r+b") as f:
        f.write(os.urandom(4 * MiB))
    snapfs.cli("sync")
    cached = snapfs.stats()["cached_bytes"]
    assert cached >= 4 * MiB

    err, reply = ctl_as(USER, snapfs.mnt, "evict")
    assert err == errno.EACCES
    assert reply["ok"] is False and reply["errno"] == errno.EACCES
    assert "evict is for root" in reply["error"]
    assert snapfs.stats()["cached_bytes"] == cached  # nothing dropped

    err, reply = ctl_as(USER, snapfs.mnt, "stats")  # other commands still work for the user
    assert err == 0 and reply["ok"] is True

    assert snapfs.cli_json("evict")["cached_bytes"] == 0  # root may
