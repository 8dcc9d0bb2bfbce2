"""Every FUSE handler answers an errno, whatever goes wrong inside it, and logs the
traceback; FUSEError and cancellation pass through. The handlers are called directly (no
mount) on a real Engine over a MemoryStore whose methods are made to fail."""

import errno
import inspect
import logging
import os
import sqlite3
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from snapfs.control import Controller
from snapfs.fuse import ops as fuse_ops
from snapfs.fuse.kernel import Stale
from snapfs.fuse.ops import (
    CTL,
    FALLOC_KEEP_SIZE,
    FALLOC_PUNCH_HOLE,
    VOLUMES,
    XATTR_INFO,
    XATTR_SNAPSHOT,
    Operations,
)
from snapfs.store import MemoryStore
from snapfs.volume import publish
from snapfs.volume.engine import Engine, EngineConfig

BS = 64 << 10
CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)

FAULTS = [
    pytest.param(lambda: OSError(errno.ENOSPC, "No space left"), errno.ENOSPC, id="ENOSPC"),
    pytest.param(lambda: OSError(errno.EIO, "Input/output error"), errno.EIO, id="EIO"),
    pytest.param(lambda: sqlite3.OperationalError("disk is full"), errno.EIO, id="sqlite"),
    pytest.param(lambda: AssertionError("an invariant broke"), errno.EIO, id="assert"),
    pytest.param(lambda: KeyError(42), errno.EIO, id="KeyError"),
]


@pytest.fixture
async def mounted(tmp_path):
    """(engine, ops, volume inode, open volume fh) without a kernel."""
    store = MemoryStore()
    await publish.init_store(store)
    engine = await Engine.open(store, str(tmp_path / "cache"), EngineConfig(cache_size=64 * BS))
    await engine.create_volume("v", 16 * BS, BS)
    ops = Operations(engine, Controller(engine, {}))
    ino = (await ops.lookup(VOLUMES, b"v", CTX)).st_ino
    fh = (await ops.open(ino, os.O_RDWR, CTX)).fh
    await ops.write(fh, 0, b"data" * 1024)
    try:
        yield engine, ops, ino, fh
    finally:
        await engine.close(flush=False)


def _fail(engine: Engine, monkeypatch, method: str, exc: BaseException) -> None:
    original = getattr(engine, method)

    if inspect.iscoroutinefunction(original):

        async def failing(*_args, **_kwargs):
            await trio.lowlevel.checkpoint()
            raise exc

    else:

        def failing(*_args, **_kwargs):
            raise exc

    monkeypatch.setattr(engine, method, failing)


def _requests(ino: int, fh: int):
    """(engine method made to fail, handler call) for every kind of request."""
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 32 * BS
    size_only = SimpleNamespace(
        update_size=True, update_mode=False, update_uid=False, update_gid=False
    )
    return [
        ("volumes", lambda ops: ops.lookup(VOLUMES, b"v", CTX)),
        ("allocated_bytes", lambda ops: ops.getattr(ino, CTX)),
        ("resize_volume", lambda ops: ops.setattr(ino, attr, size_only, None, CTX)),
        ("open_volume", lambda ops: ops.open(ino, os.O_RDWR, CTX)),
        ("read_ref", lambda ops: ops.read(fh, 0, 4096)),
        ("write", lambda ops: ops.write(fh, 0, b"x" * 4096)),
        ("fsync", lambda ops: ops.fsync(fh, True)),
        ("discard", lambda ops: ops.fallocate(fh, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 0, BS)),
        ("volume_by_id", lambda ops: ops.listxattr(ino, CTX)),
        ("volume_info", lambda ops: ops.getxattr(ino, XATTR_INFO, CTX)),
        ("create_snapshot", lambda ops: ops.setxattr(ino, XATTR_SNAPSHOT, b"s", CTX)),
        ("statistics", lambda ops: ops.statfs(CTX)),
        ("close_volume", lambda ops: ops.release(fh)),
    ]


REQUESTS = [name for name, _call in _requests(0, 0)]


@pytest.mark.parametrize("make_exc, expected", FAULTS)
@pytest.mark.parametrize("method", REQUESTS)
async def test_unexpected_errors_become_an_errno_and_a_traceback(
    mounted, monkeypatch, caplog, method, make_exc, expected
):
    engine, ops, ino, fh = mounted
    call = dict(_requests(ino, fh))[method]
    exc = make_exc()
    _fail(engine, monkeypatch, method, exc)
    caplog.set_level(logging.INFO, logger="snapfs.fuse")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call(ops)
    assert info.value.errno == expected
    records = [r for r in caplog.records if r.name == "snapfs.fuse" and r.exc_info]
    assert len(records) == 1, caplog.text
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info[1] is exc  # the traceback of what failed is in the log
    # ... and the next request is served as usual.
    monkeypatch.undo()
    assert (await ops.getattr(ino, CTX)).st_size == 16 * BS
    fh = (await ops.open(ino, os.O_RDWR, CTX)).fh  # (a failed release still released fh)
    await ops.read(fh, 0, 8)  # bytes, or a ReplyFromFd with the patched pyfuse3
    assert await engine.read("v", 0, 8) == b"datadata"


async def test_readdir_and_opendir_answer_an_errno(mounted, monkeypatch, caplog):
    engine, ops, _ino, _fh = mounted
    dfh = await ops.opendir(VOLUMES, CTX)
    _fail(engine, monkeypatch, "volumes", OSError(errno.ENOSPC, "full"))
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.readdir(dfh, 0, None)  # fails before any reply goes to the token
    assert info.value.errno == errno.ENOSPC
    assert any(r.exc_info for r in caplog.records if r.name == "snapfs.fuse")


@pytest.mark.parametrize("make_exc, expected", FAULTS)
async def test_ctl_command_errors_keep_their_errno_and_reply(
    mounted, monkeypatch, caplog, make_exc, expected
):
    engine, ops, _ino, _fh = mounted
    fh = (await ops.open(CTL, os.O_RDWR, CTX)).fh
    _fail(engine, monkeypatch, "statistics", make_exc())
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.write(fh, 0, b"stats\n")
    assert info.value.errno == expected
    reply = await ops.read(fh, 0, 1 << 16)
    assert b'"ok": false' in reply and f'"errno": {expected}'.encode() in reply
    assert any(r.exc_info for r in caplog.records if r.name == "snapfs.fuse")


async def test_expected_errors_give_their_errno_without_a_traceback(mounted, caplog):
    _engine, ops, ino, _fh = mounted
    caplog.set_level(logging.DEBUG, logger="snapfs.fuse")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(VOLUMES, b"nope", CTX)  # a FUSEError passes through untouched
    assert info.value.errno == errno.ENOENT
    await ops.setxattr(ino, XATTR_SNAPSHOT, b"s", CTX)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.setxattr(ino, XATTR_SNAPSHOT, b"s", CTX)  # SnapfsError: AlreadyExists
    assert info.value.errno == errno.EEXIST
    assert not [r for r in caplog.records if r.exc_info]


async def test_cancellation_passes_through(mounted, monkeypatch, caplog):
    engine, ops, _ino, fh = mounted

    async def slow_read(*_args):
        await trio.sleep_forever()

    monkeypatch.setattr(engine, "read_ref", slow_read)
    with trio.move_on_after(0.05) as scope:
        await ops.read(fh, 0, 4096)
    assert scope.cancelled_caught  # Cancelled reached the scope: not turned into EIO
    assert not [r for r in caplog.records if r.name == "snapfs.fuse"]


def test_every_request_handler_is_guarded():
    defined = [n for n in fuse_ops.FUSE_HANDLERS if n in vars(Operations)]
    assert {"lookup", "read", "write", "fsync", "fallocate", "readdir", "setxattr"} <= set(defined)
    for name in defined:
        assert getattr(getattr(Operations, name), "answers_errno", False), name


async def test_owner_rule_and_writes_beyond_the_end_answer_their_errno(mounted, caplog):
    engine, ops, ino, fh = mounted
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.write(fh, 16 * BS - 1, b"xy")  # BeyondEnd: a full device
    assert info.value.errno == errno.ENOSPC
    other = SimpleNamespace(uid=1000, gid=1000, pid=os.getpid(), umask=0o022)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.open(ino, os.O_RDWR, other)  # root's volume
    assert info.value.errno == errno.EACCES
    with pytest.raises(pyfuse3.FUSEError):
        await ops.lookup(VOLUMES, b"v", other)  # and invisible to other users
    assert not [r for r in caplog.records if r.exc_info]
    assert ops.inode_of("v") == ino
    assert ops.inode_of("nope") is None
    await engine.create_volume("w", 16 * BS, BS)
    assert ops.inode_of("w") is None  # the kernel was never told an inode for it


async def test_ctl_commands_make_the_kernel_forget_what_they_changed(mounted):
    """Without a kernel: what a ctl command changed in the namespace is handed to `notify`
    before the command is answered; an unchanged namespace sends nothing."""
    engine, _ops, _ino, _fh = mounted
    told: list[Stale] = []
    ops = Operations(engine, Controller(engine, {}), notify=told.append)

    async def command(line: str) -> None:
        fh = (await ops.open(CTL, os.O_RDWR, CTX)).fh
        await ops.write(fh, 0, line.encode() + b"\n")
        await ops.release(fh)

    await command("volume create w --size 1M --block-size 64K")
    w = (await ops.lookup(VOLUMES, b"w", CTX)).st_ino
    await command("volume list")
    assert told == []
    await command("volume resize w --size 2M")
    assert told.pop() == Stale([], [w])  # its size
    await ops.getattr(w, CTX)
    await command("volume delete w")
    assert told.pop() == Stale([(VOLUMES, b"w")], [w])
    await command("volume create w --size 1M --block-size 64K")
    assert told == []  # the kernel was told nothing of the new w yet
    assert (await ops.lookup(VOLUMES, b"w", CTX)).st_ino != w


async def test_a_ctl_command_that_outlasts_its_write(mounted, monkeypatch, autojump_clock):
    """The kernel holds the ctl file's inode lock for a whole write, so a command runs in
    the write for at most WRITE_WAIT: a longer one goes on in the background. Its reply
    is read from the handle (the read waits for it); unread, close() (flush) waits for it
    and answers its errno; read, close() answers nothing. A quick failure stays the
    write's errno. Meanwhile another handle's command is answered at once."""
    engine, ops, _ino, _fh = mounted
    slow = trio.Event()

    async def sync() -> None:  # a sync that fails once let go
        await slow.wait()
        raise fuse_ops.StoreError("the store refused")

    monkeypatch.setattr(engine, "sync", sync)
    async with trio.open_nursery() as nursery:
        ops.commands = nursery
        started = trio.current_time()
        fh = (await ops.open(CTL, os.O_RDWR, CTX)).fh
        assert await ops.write(fh, 0, b"sync\n") == 5  # returns: the sync goes on
        assert trio.current_time() - started >= fuse_ops.WRITE_WAIT
        other = (await ops.open(CTL, os.O_RDWR, CTX)).fh
        await ops.write(other, 0, b"status\n")  # not held by the sync
        assert b'"ok": true' in await ops.read(other, 0, 4096)
        await ops.flush(other)
        got = []

        async def read_back() -> None:
            got.append(await ops.read(fh, 0, 4096))

        nursery.start_soon(read_back)
        await trio.sleep(5)
        assert got == []  # the read waits for the reply
        slow.set()
        await trio.sleep(0.1)
        assert b"the store refused" in got[0]
        await ops.flush(fh)  # the reply was read: close() says nothing
        # Unread: close() answers the command's errno, once.
        slow = trio.Event()
        fh2 = (await ops.open(CTL, os.O_RDWR, CTX)).fh
        await ops.write(fh2, 0, b"sync\n")
        with trio.move_on_after(3) as waiting:
            await ops.flush(fh2)
        assert waiting.cancelled_caught  # close() waits for the command
        slow.set()
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await ops.flush(fh2)
        assert failed.value.errno == errno.EIO
        await ops.flush(fh2)
        # A quick failure is the write's own errno.
        fh3 = (await ops.open(CTL, os.O_RDWR, CTX)).fh
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.write(fh3, 0, b"volume delete nope\n")
        assert refused.value.errno == errno.ENOENT
        await ops.flush(fh3)
