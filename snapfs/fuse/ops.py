"""pyfuse3 Operations: translate the kernel's requests into engine and controller calls.

    /volumes/<vol>            read-write file, mode 0600, owned by the volume's creator
    /snapshots/<vol>/<snap>   read-only file, mode 0400
    /.snapfs/ctl              write one command line, read one JSON reply (per open handle)

This layer holds no business logic: it maps names to inodes, checks who may see what, and
turns errors into errnos. It asks the engine only through its public interface (volumes,
snapshots, opens and the operations), never its catalog or fields. After each ctl command
and read-only refresh it makes the kernel forget the names and attributes that are no
longer true (`update_kernel`, snapfs/fuse/kernel.py).

Every request handler answers with an errno, whatever goes wrong inside it (`answers_errno`,
applied to the class once): a SnapfsError gives its own errno, an OSError keeps its errno
(ENOSPC in the cache dir stays ENOSPC, EIO from fdatasync stays EIO), anything else (an
sqlite3 error, an assertion, a bug) is EIO with the traceback in the daemon log. One
request fails; the mount goes on serving everyone else.
"""

import contextlib
import errno
import functools
import inspect
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from snapfs.access import check_owner, visible
from snapfs.control import MAX_LINE, Controller
from snapfs.errors import SnapfsError, StoreError
from snapfs.fuse.kernel import Fingerprint, KernelView, Stale, fingerprint
from snapfs.units import IMPORTING
from snapfs.volume.engine import Engine

log = logging.getLogger("snapfs.fuse")

ROOT = pyfuse3.ROOT_INODE
VOLUMES, SNAPSHOTS, CTLDIR, CTL = ROOT + 1, ROOT + 2, ROOT + 3, ROOT + 4
XATTR_SNAPSHOT = b"user.snapfs.snapshot"
XATTR_SNAPSHOTS = b"user.snapfs.snapshots"
XATTR_INFO = b"user.snapfs.info"
TIMEOUT = 1.0
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
# The pyfuse3 that scripts/pyfuse3-patch.py builds splices a reply from a file descriptor
# (one copy fewer per read: no Python bytes in between); a stock pyfuse3 gets bytes.
_REPLY_FROM_FD = getattr(pyfuse3, "ReplyFromFd", None)


# How long a ctl command may run inside its write before the write returns and the command
# goes on in the background (its reply is read from the same handle).
WRITE_WAIT = 1.0


@dataclass
class Handle:
    kind: str  # "vol" | "snap" | "ctl"
    key: Any
    uid: int
    inbuf: bytearray = field(default_factory=bytearray)
    reply: bytes = b""
    done: trio.Event | None = None  # a ctl command runs on this handle until it is set
    error: int = 0  # the errno of the handle's last command, 0 when it succeeded
    detached: bool = False  # that command outlasted its write: close() reports it
    read_back: bool = False  # its reply was read (the CLI): close() reports nothing


def errno_of(exc: BaseException) -> int:
    """The errno a request answers for `exc`: a SnapfsError's own, an OSError's own (ENOSPC,
    EIO, ...), else EIO."""
    if isinstance(exc, SnapfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


# The requests pyfuse3 hands to Operations (fallocate: the patched pyfuse3's). Not init,
# which pyfuse3.init calls before the loop runs, nor stacktrace.
FUSE_HANDLERS = (
    frozenset(n for n in dir(pyfuse3.Operations) if not n.startswith("_")) | {"fallocate"}
) - {"init", "stacktrace", "enable_acl", "enable_writeback_cache", "supports_dot_lookup"}


def _guard(name: str, handler):
    @functools.wraps(handler)
    async def guarded(self, *args, **kwargs):
        try:
            return await handler(self, *args, **kwargs)
        except (pyfuse3.FUSEError, trio.Cancelled):
            raise
        except SnapfsError as exc:  # expected: one line, no traceback
            level = logging.ERROR if isinstance(exc, StoreError) else logging.INFO
            log.log(level, "%s: %s (%s)", name, exc, _errname(exc.errno))
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:  # unexpected: answer this request, keep serving
            err = errno_of(exc)
            log.exception("%s failed, answered %s: %r", name, _errname(err), exc)
            raise pyfuse3.FUSEError(err) from None

    guarded.answers_errno = True  # type: ignore[attr-defined]
    return guarded


def answers_errno(cls):
    """Class decorator: wrap every FUSE request handler `cls` defines so that any exception
    but FUSEError and trio.Cancelled becomes a FUSEError with `errno_of(exc)`, logged."""
    for name, value in list(vars(cls).items()):
        if name in FUSE_HANDLERS and inspect.iscoroutinefunction(value):
            setattr(cls, name, _guard(name, value))
    return cls


@answers_errno
class Operations(pyfuse3.Operations):
    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(
        self,
        engine: Engine,
        controller: Controller,
        read_only: bool = False,
        only: tuple[str, str] | None = None,
        notify: Callable[[Stale], None] | None = None,
    ) -> None:
        """`notify` (snapfs.fuse.kernel.notify when mounted; None without a kernel, in
        tests) tells the kernel what to forget; it blocks, and runs in a worker thread."""
        super().__init__()
        self.engine = engine
        self.controller = controller
        self.read_only = read_only
        self.only = only
        self.started = time.time_ns()
        self._inode: dict[tuple, int] = {}
        self._key: dict[int, tuple] = {}
        self._next = CTL + 1
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, tuple[int, int]] = {}
        self._next_fh = 1
        self._notify = notify
        self._told = KernelView()
        self._kernel_lock = trio.Lock()
        # Where a ctl command that outlasts its write goes on (the daemon's nursery; None
        # in tests without one: every command then ends inside its write).
        self.commands: trio.Nursery | None = None

    # ------------------------------------------------------------------ names and inodes

    def _ino(self, key: tuple) -> int:
        ino = self._inode.get(key)
        if ino is None:
            ino = self._inode[key] = self._next
            self._key[ino] = key
            self._next += 1
        return ino

    def inode_of(self, volume: str) -> int | None:
        """The inode of volume `volume` if the kernel was ever told one, else None."""
        try:
            vid = self.engine.volume(volume).id
        except SnapfsError:
            return None
        return self._inode.get(("vol", vid))

    def _volumes(self, uid: int) -> list:
        if self.read_only:
            return []
        return [v for v in self.engine.volumes() if visible(v.owner, uid)]

    def _snapshot_dirs(self, uid: int) -> list[str]:
        names = {s.volume for s in self._snapshots(None, uid)}
        return sorted(names)

    def _snapshots(self, volume: str | None, uid: int):
        snaps = [
            s
            for s in self.engine.snapshots(volume)
            if s.state in ("available", "creating") and visible(s.owner, uid)
        ]
        if self.only is not None:
            snaps = [s for s in snaps if (s.volume, s.name) == self.only]
        return snaps

    def _children(self, ino: int, uid: int) -> list[tuple[bytes, int]]:
        if ino == ROOT:
            return [(b"volumes", VOLUMES), (b"snapshots", SNAPSHOTS), (b".snapfs", CTLDIR)]
        if ino == VOLUMES:
            return [(v.name.encode(), self._ino(("vol", v.id))) for v in self._volumes(uid)]
        if ino == SNAPSHOTS:
            return [(n.encode(), self._ino(("snapdir", n))) for n in self._snapshot_dirs(uid)]
        if ino == CTLDIR:
            return [(b"ctl", CTL)]
        key = self._key.get(ino)
        if key and key[0] == "snapdir":
            return [
                (s.name.encode(), self._ino(("snap", s.id))) for s in self._snapshots(key[1], uid)
            ]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _resolve(self, ino: int):
        """inode → ("dir", None) | ("vol", VolumeRow) | ("snap", SnapshotRow) | ("ctl", None)."""
        if ino in (ROOT, VOLUMES, SNAPSHOTS, CTLDIR):
            return "dir", None
        if ino == CTL:
            return "ctl", None
        key = self._key.get(ino)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if key[0] == "vol":
            vol = self.engine.volume_by_id(key[1])
            if vol is not None:
                return "vol", vol
        elif key[0] == "snapdir":
            return "dir", key[1]
        elif key[0] == "snap":
            snap = self.engine.snapshot_by_id(key[1])
            if snap is not None and snap.state in ("available", "creating"):
                return "snap", snap
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        kind, obj = self._resolve(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.attr_timeout = a.entry_timeout = TIMEOUT
        a.st_blksize = 4096
        now = self.started
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
        a.st_uid = a.st_gid = 0
        if kind == "dir":
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif kind == "ctl":
            a.st_mode = stat.S_IFREG | 0o666
            a.st_nlink = 1
        elif kind == "vol":
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_uid = obj.owner
            a.st_size = obj.size
            a.st_blocks = self.engine.allocated_bytes(obj.name) // 512
            a.st_blksize = obj.block_size
            a.st_ctime_ns = int(obj.created * 1e9)
        else:
            a.st_mode = stat.S_IFREG | 0o400
            a.st_nlink = 1
            a.st_uid = obj.owner
            a.st_size = obj.size
            a.st_blksize = obj.block_size
            a.st_blocks = (obj.size + 511) // 512
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = int(obj.created * 1e9)
        return a

    # ------------------------------------------------------------------ the kernel's caches

    def _tell(self, ino: int, parent: int | None = None, name: bytes = b""):
        """The attributes of `ino` for a reply, recorded as told (with the entry `name`
        in `parent` for a lookup)."""
        attrs = self._attrs(ino)
        if parent is None:
            if ino > CTL:  # the fixed inodes never change
                self._told.told_attrs(ino, attrs)
        else:
            self._told_entry(parent, name, attrs)
        return attrs

    def _told_entry(self, parent: int, name: bytes, attrs: pyfuse3.EntryAttributes) -> None:
        if attrs.st_ino > CTL:
            self._told.told_entry(parent, name, attrs.st_ino)
            self._told.told_attrs(attrs.st_ino, attrs)

    async def update_kernel(self) -> None:
        """Make the kernel forget the names and attributes it was told that are no longer
        true: after every ctl command (volumes and snapshots created, deleted, renamed,
        rolled back, resized) and every read-only refresh. Returns once the kernel has
        dropped them, so a ctl reply comes after. Never raises: a failure is logged, and
        the entry and attribute timeouts bound how long a stale cache lives."""
        try:
            async with self._kernel_lock:  # a second caller waits until the kernel knows
                stale = self._told.stale(self._now_children, self._now_attrs)
                if stale and self._notify is not None:
                    await trio.to_thread.run_sync(self._notify, stale)
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("cannot update the kernel's caches")

    def _now_children(self, parent: int) -> dict[bytes, int]:
        """name → inode in directory `parent` as it is now, for anyone (root sees all)."""
        try:
            return dict(self._children(parent, 0))
        except pyfuse3.FUSEError:
            return {}

    def _now_attrs(self, ino: int) -> Fingerprint | None:
        try:
            return fingerprint(self._attrs(ino))
        except pyfuse3.FUSEError:
            return None

    # ------------------------------------------------------------------ namespace

    async def lookup(self, parent_inode, name, ctx=None):
        uid = ctx.uid if ctx else 0
        if name == b".":
            return self._attrs(parent_inode)
        if name == b"..":
            return self._attrs(
                ROOT
                if parent_inode in (VOLUMES, SNAPSHOTS, CTLDIR)
                else SNAPSHOTS
                if parent_inode != ROOT
                else ROOT
            )
        for child, ino in self._children(parent_inode, uid):
            if child == name:
                return self._tell(ino, parent_inode, name)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode, ctx=None):
        return self._tell(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        kind, obj = self._resolve(inode)
        if fields.update_size:
            if kind != "vol":
                raise pyfuse3.FUSEError(errno.EPERM if kind == "snap" else errno.EINVAL)
            await self.engine.resize_volume(obj.name, attr.st_size, uid=ctx.uid)
        elif fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._tell(inode)

    async def opendir(self, inode, ctx):
        kind, _ = self._resolve(inode)
        if kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (inode, ctx.uid)  # readdir is not told the caller: remember it
        return fh

    async def readdir(self, fh, start_id, token):
        inode, uid = self._dirs.get(fh, (ROOT, 0))
        entries = self._children(inode, uid)
        for i, (name, ino) in enumerate(entries[start_id:], start_id):
            if inode == VOLUMES and name.startswith(IMPORTING.encode()):
                continue  # an import in progress: opened by name, listed once it is done
            try:
                attrs = self._attrs(ino)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break
            self._told_entry(inode, name, attrs)  # readdirplus: the kernel keeps the entry

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(v.size for v in self.engine.volumes()) or 1 << 30
        used = self.engine.statistics().stored_bytes
        s.f_blocks = max(total, used) // 4096
        s.f_bfree = s.f_bavail = max(total - used, 0) // 4096
        s.f_files = len(self._inode) + 5
        s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 255
        return s

    async def _refuse(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mkdir = mknod = unlink = rmdir = rename = link = symlink = _refuse

    # ------------------------------------------------------------------ files

    async def open(self, inode, flags, ctx):
        kind, obj = self._resolve(inode)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if kind == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        if kind == "snap":
            if writing:
                raise pyfuse3.FUSEError(errno.EROFS)
            check_owner(obj.owner, ctx.uid, f"snapshot {obj.volume}@{obj.name}")
            handle = Handle("snap", obj.id, ctx.uid)
            self.engine.open_snapshot(obj.id)
            info_direct = False
        elif kind == "vol":
            check_owner(obj.owner, ctx.uid, f"volume {obj.name!r}")
            handle = Handle("vol", obj.name, ctx.uid)
            self.engine.open_volume(obj.name)
            # Direct I/O: the kernel keeps no page cache of a volume (the file system on
            # it has its own) and, unlike cached writes, a direct write does not first ask
            # us for security.capability (FUSE clears SB_NOSEC), which halves the requests
            # per random 4K write. Shared mmap of a volume is refused (ENODEV) in turn.
            info_direct = True
        else:
            handle = Handle("ctl", None, ctx.uid)
            info_direct = True
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileInfo(
            fh=fh, direct_io=info_direct, keep_cache=not info_direct, nonseekable=False
        )

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    async def read(self, fh, off, size):
        handle = self._handle(fh)
        if handle.kind == "vol":
            got = await self.engine.read_ref(handle.key, off, size)
            if isinstance(got, tuple):  # cached: spliced from the cache file, no await
                fd, pos, length = got
                if _REPLY_FROM_FD is None:
                    return os.pread(fd, length, pos)
                return _REPLY_FROM_FD(fd, pos, length)
            return got
        if handle.kind == "snap":
            snap = self.engine.snapshot_by_id(handle.key)
            if snap is None or snap.state not in ("available", "creating"):
                raise pyfuse3.FUSEError(errno.ENOENT)
            if snap.state != "available":
                snap = await self.engine.wait_available(snap.volume, snap.name)
            return await self.engine.read_snapshot(snap, off, size)
        if handle.done is not None:
            await handle.done.wait()  # a command that outlasted its write
            handle.read_back = True
        return handle.reply[off : off + size]

    async def write(self, fh, off, buf):
        handle = self._handle(fh)
        if handle.kind == "vol":  # beyond the end: BeyondEnd, ENOSPC
            return await self.engine.write(handle.key, off, buf)
        if handle.kind != "ctl":
            raise pyfuse3.FUSEError(errno.EBADF)
        handle.inbuf += buf
        if len(handle.inbuf) > MAX_LINE:
            handle.inbuf.clear()
            handle.reply = _reply(False, f"command line longer than {MAX_LINE} bytes", errno.EINVAL)
            raise pyfuse3.FUSEError(errno.EINVAL)
        while b"\n" in handle.inbuf:
            line, _, rest = bytes(handle.inbuf).partition(b"\n")
            handle.inbuf = bytearray(rest)
            await self._start_command(handle, line)
        return len(buf)

    async def _start_command(self, handle: Handle, line: bytes) -> None:
        """Run a ctl command for at most WRITE_WAIT seconds inside the write (its errno is
        the write's); one that takes longer goes on in the background and the write
        returns, and the handle's read waits for its reply. The kernel runs one write to
        a file at a time (it holds the inode's lock for the whole FUSE write), so a long
        command answered inside its write (a restore, a sync, fsck) would hold every other
        ctl command of the mount, `status` and `cancel restore` too, until it ended."""
        if handle.done is not None:
            await handle.done.wait()  # a second line on the handle: after the first
        handle.error, handle.detached, handle.read_back = 0, False, False
        if self.commands is None:
            await self._run_command(handle, line)
            return
        done = handle.done = trio.Event()

        async def run() -> None:
            try:
                await self._run_command(handle, line)
            except pyfuse3.FUSEError as exc:  # the reply says why
                handle.error = exc.errno
            finally:
                done.set()

        self.commands.start_soon(run)
        with trio.move_on_after(WRITE_WAIT):
            await done.wait()
        if not done.is_set():
            handle.detached = True  # flush (close) waits for it, and reports its errno
        elif handle.error:
            raise pyfuse3.FUSEError(handle.error)

    async def _run_command(self, handle: Handle, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            handle.reply = _reply(False, "command line is not UTF-8", errno.EINVAL)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            result = await self._execute(text, handle.uid)
        except SnapfsError as exc:
            handle.reply = _reply(False, str(exc), exc.errno)
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.Cancelled:
            raise
        except Exception as exc:  # a bug or the machine: keep the daemon up, say what happened
            err = errno_of(exc)
            log.exception("command %r failed, answered %s", text[:200], _errname(err))
            handle.reply = _reply(False, f"internal error: {exc.__class__.__name__}: {exc}", err)
            raise pyfuse3.FUSEError(err) from None
        handle.reply = _reply(True, result)

    async def _execute(self, line: str, uid: int) -> Any:
        """Run a ctl command; then the kernel forgets what it changed (also when it
        failed half way), before anyone reads the reply."""
        try:
            return await self.controller.execute(line, uid)
        finally:
            with trio.CancelScope(shield=True):
                await self.update_kernel()

    async def fallocate(self, fh, mode, off, length):
        """PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE discard (loop devices turn TRIM into these);
        plain allocation inside the size succeeds (a volume has no space to reserve); every
        other mode, and growing a volume this way, is EOPNOTSUPP."""
        handle = self._handle(fh)
        if handle.kind == "snap":
            raise pyfuse3.FUSEError(errno.EROFS)
        if handle.kind != "vol":
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if mode & ~(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) or (
            mode & FALLOC_PUNCH_HOLE and mode & FALLOC_ZERO_RANGE
        ):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if mode & FALLOC_PUNCH_HOLE and not mode & FALLOC_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        size = self.engine.volume(handle.key).size
        if not mode & FALLOC_KEEP_SIZE and off + length > size:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # `snapfs volume resize` grows
        if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE):
            await self.engine.discard(handle.key, off, length)
        else:
            self.engine.writable()  # EROFS on a read-only mount or a writer that lost

    async def flush(self, fh):
        """close(): a ctl command that outlasted its write is waited for here (the kernel
        holds no inode lock during a flush), so `echo sync > ctl` returns once the sync is
        done, as it did when every command ended inside its write; its failure is
        close()'s errno, unless its reply was read (the CLI reads it)."""
        handle = self._handles.get(fh)
        if handle is None or handle.kind != "ctl" or handle.done is None:
            return
        await handle.done.wait()
        if handle.detached and handle.error and not handle.read_back:
            handle.detached = False  # reported once
            raise pyfuse3.FUSEError(handle.error)

    async def fsync(self, fh, datasync):
        handle = self._handle(fh)
        if handle.kind == "vol":
            await self.engine.fsync(handle.key)

    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        if handle.kind == "vol":
            self.engine.close_volume(handle.key)
        elif handle.kind == "snap":
            self.engine.close_snapshot(handle.key)
        elif handle.kind == "ctl" and handle.inbuf.strip():
            with contextlib.suppress(pyfuse3.FUSEError):
                await self._start_command(handle, bytes(handle.inbuf))

    # ------------------------------------------------------------------ xattrs

    async def getxattr(self, inode, name, ctx):
        if not name.startswith(b"user.snapfs."):  # the kernel asks security.* before writes
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        kind, obj = self._resolve(inode)
        if kind != "vol":
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if name == XATTR_SNAPSHOTS:
            snaps = self.engine.snapshots(obj.name)
            return "\n".join(s.name for s in snaps if s.state != "deleting").encode()
        if name == XATTR_INFO:
            info = self.engine.volume_info(obj.name)
            return json.dumps(info, sort_keys=True).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        kind, _ = self._resolve(inode)
        return [XATTR_SNAPSHOTS, XATTR_INFO] if kind == "vol" else []

    async def setxattr(self, inode, name, value, ctx):
        kind, obj = self._resolve(inode)
        if kind != "vol" or name != XATTR_SNAPSHOT:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        try:
            snap = value.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        await self.engine.create_snapshot(obj.name, snap, uid=ctx.uid)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def access(self, inode, mode, ctx):
        return True


def _reply(ok: bool, payload: Any, err: int = 0) -> bytes:
    if ok:
        doc = {"ok": True, "result": payload}
    else:
        doc = {"ok": False, "error": str(payload), "errno": err}
    return (json.dumps(doc, default=str) + "\n").encode()
