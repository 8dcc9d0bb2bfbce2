"""The mount daemon: engine + flusher + FUSE, in one trio run.

`snapfs mount` starts this module in the background (`python -m snapfs.daemon ...
--ready-fd N`) and waits on the pipe for one line: "ok" once the mount is ready, or
"error: <why>". On unmount (fusermount3 -u, `snapfs umount`, SIGTERM or SIGINT) it flushes
everything, publishes the catalog and exits 0.

Unmounting always works. `snapfs umount` first sends the ctl command `umount --within T`:
the daemon syncs for at most T seconds (`prepare_umount`). When that cannot be done (the
writer lost the store, the store failed or did not answer in time), it answers what stays
behind and skips its own final flush at the unmount that follows: the cache dir keeps
everything that was not uploaded (dirty blocks, pending snapshots), and the next mount of
that cache dir uploads it (a writer that lost the store cannot: its cache is all there is).
"""

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

import pyfuse3
import trio

from snapfs.control import Controller
from snapfs.errors import Busy, InvalidArgument, ReadOnly, SnapfsError
from snapfs.fuse import kernel
from snapfs.fuse.ops import Operations
from snapfs.store import open_store
from snapfs.units import format_size, parse_seconds, parse_size, split_snapshot_ref
from snapfs.volume import lease
from snapfs.volume.engine import Engine, EngineConfig

log = logging.getLogger("snapfs.daemon")
CACHE_ROOT = "/var/cache/snapfs"
# After a `umount` command found the store out of reach, the unmount that follows skips the
# final flush if it comes within this many seconds (else the mount lived on: flush as usual).
KEEP_CACHE_WINDOW = 60.0
LEASE_RELEASE_TIMEOUT = 10.0


def default_cache_dir(store_url: str) -> str:
    return os.path.join(CACHE_ROOT, hashlib.sha256(store_url.encode()).hexdigest()[:16])


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapfs mount", description="mount a snapfs store")
    p.add_argument("store", help="store URL: file:///path or swift://host:port/container")
    p.add_argument("mountpoint")
    p.add_argument("--cache-dir", help="local cache (default /var/cache/snapfs/<store hash>)")
    p.add_argument("--cache-size", default="2G", help="bound of the local cache (default 2G)")
    p.add_argument(
        "--flush-delay",
        default="5",
        help="upload a dirty block once left alone this many seconds (default 5)",
    )
    p.add_argument(
        "--flush-max-age",
        default="30",
        help="upload a dirty block at the latest this many seconds after it became dirty, "
        "however often it is rewritten (default 30)",
    )
    p.add_argument(
        "--grace",
        default="600",
        help="delete what the store no longer needs this many seconds after the catalog that "
        "stopped needing it was published, so that read-only mounts and reads in flight "
        "finish (default 600)",
    )
    p.add_argument(
        "--refresh",
        default="30",
        help="with --read-only: follow the writer's catalog this often, in seconds; keep it "
        "well under the writer's --grace (default 30)",
    )
    p.add_argument("--foreground", action="store_true", help="do not go to the background")
    p.add_argument("--read-only", action="store_true", help="show the published snapshots only")
    p.add_argument("--snapshot", help="with --read-only: show just this VOL@SNAP")
    p.add_argument(
        "--takeover",
        action="store_true",
        help="take the store's lease even if another writer holds it",
    )
    p.add_argument("--log-file", help="log here (default <cache-dir>/daemon.log)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return p


def check_mountpoint(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise InvalidArgument(f"mount point {path} does not exist or is not a directory")
    if os.path.ismount(path):
        raise Busy(f"{path} is already a mount point")
    return path


def lock_cache_dir(cache_dir: str) -> int:
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(cache_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise Busy(f"cache dir {cache_dir} is in use by snapfs daemon pid {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_cache_room(cache_dir: str, cache_size: int) -> None:
    """Refuse a cache dir that cannot hold `cache_size`: its free space plus what its cache
    files already occupy (they are reused) must reach it. Otherwise writes would meet
    ENOSPC long before the cache is full, instead of waiting for the flusher."""
    st = os.statvfs(cache_dir)
    free = st.f_bavail * st.f_frsize
    used = 0
    with os.scandir(cache_dir) as entries:
        for entry in entries:
            if entry.name.startswith("vol-") and entry.name.endswith((".cache", ".frozen")):
                with contextlib.suppress(OSError):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512
    if free + used < cache_size:
        raise InvalidArgument(
            f"cache dir {cache_dir} has room for {format_size(free + used)} "
            f"({format_size(free)} free), less than --cache-size {format_size(cache_size)}: "
            "free some space, use another --cache-dir or a smaller --cache-size"
        )


class Daemon:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.mountpoint = check_mountpoint(opts.mountpoint)
        self.cache_size = parse_size(opts.cache_size, "cache size")
        self.flush_delay = parse_seconds(opts.flush_delay, "flush delay", 3600)
        self.flush_max_age = parse_seconds(opts.flush_max_age, "flush max age", 86400)
        self.grace = parse_seconds(opts.grace, "grace period", 7 * 86400, zero=True)
        self.refresh = parse_seconds(opts.refresh, "refresh interval", 86400)
        if self.flush_max_age < self.flush_delay:
            raise InvalidArgument("--flush-max-age must not be shorter than --flush-delay")
        self.only = split_snapshot_ref(opts.snapshot) if opts.snapshot else None
        if self.only and not opts.read_only:
            raise InvalidArgument("--snapshot goes with --read-only")
        self.temp_cache = None
        if opts.cache_dir:
            self.cache_dir = os.path.abspath(opts.cache_dir)
        elif opts.read_only:
            self.temp_cache = self.cache_dir = tempfile.mkdtemp(prefix="snapfs-ro-")
        else:
            self.cache_dir = default_cache_dir(opts.store)
        self.store = open_store(opts.store)
        self.lock_fd = lock_cache_dir(self.cache_dir)
        self.keep_cache_until = float("-inf")  # trio time; see prepare_umount
        if not opts.read_only:  # a read-only mount caches nothing on disk
            check_cache_room(self.cache_dir, self.cache_size)

    async def run(self, ready) -> None:
        config = EngineConfig(
            cache_size=self.cache_size,
            flush_delay=self.flush_delay,
            flush_max_age=self.flush_max_age,
            grace=self.grace,
            refresh=self.refresh,
        )
        read_only = self.opts.read_only
        held = None
        if not read_only:
            held = await lease.acquire(self.store, self.cache_dir, takeover=self.opts.takeover)
        try:
            engine = await Engine.open(self.store, self.cache_dir, config, read_only=read_only)
        except BaseException:
            if held is not None:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await lease.release(self.store, held)
            raise
        engine.fence.hold_lease(held)  # the fence owns it from here on
        try:
            await self._serve(engine, ready)
        finally:
            with trio.CancelScope(shield=True):
                if not self._keep_cache():
                    with trio.move_on_after(LEASE_RELEASE_TIMEOUT), contextlib.suppress(Exception):
                        await engine.fence.release_lease()
                await self.store.aclose()

    def _status(self, engine: Engine) -> dict:
        """What `snapfs status` shows of this mount (the ctl controller's record)."""
        return {
            "pid": os.getpid(),
            "store": self.store.url,
            "store_url": self.opts.store,  # as given: what `snapfs replicate` opens again
            "mountpoint": self.mountpoint,
            "cache_dir": self.cache_dir,
            "read_only": self.opts.read_only,
            "cache_size": engine.config.cache_size,
            "flush_delay": engine.config.flush_delay,
            "flush_max_age": engine.config.flush_max_age,
            "started": time.time(),
        }

    async def _serve(self, engine: Engine, ready) -> None:
        status = self._status(engine)
        controller = Controller(engine, status)
        ops = Operations(
            engine, controller, read_only=self.opts.read_only, only=self.only, notify=kernel.notify
        )
        if not getattr(pyfuse3, "SNAPFS_FALLOCATE", False):
            log.warning(
                "discard (fstrim, fallocate) is unavailable: this pyfuse3 has no "
                "fallocate handler; scripts/setup builds one"
            )

        async def prepare_umount(within: float) -> dict:
            return await self.prepare_umount(engine, within)

        status["prepare_umount"] = prepare_umount
        options = {"fsname=snapfs", "subtype=snapfs", "allow_other", "default_permissions"}
        try:
            pyfuse3.init(ops, self.mountpoint, options)
        except Exception as exc:
            await engine.close(flush=False)
            raise SnapfsError(f"cannot mount {self.mountpoint}: {exc}") from None
        try:
            async with trio.open_nursery() as nursery:
                ops.commands = nursery  # ctl commands that outlast their write
                if not self.opts.read_only:
                    await nursery.start(engine.run_flusher)
                    await nursery.start(engine.fence.keep_lease, engine.lost)
                else:  # follow the writer: new snapshots appear, deleted ones go
                    await nursery.start(engine.run_refresher, ops.update_kernel)
                await nursery.start(engine.readahead.run)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._kernel_readahead, engine.config.readahead_bytes)
                log.info(
                    "mounted %s on %s (cache %s)", self.store.url, self.mountpoint, self.cache_dir
                )
                ready("ok")
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            keep = self._keep_cache()
            log.info(
                "unmounted %s: %s", self.mountpoint, "keeping the cache" if keep else "flushing"
            )
            try:
                await engine.close(flush=not self.opts.read_only and not keep)
            except SnapfsError as exc:  # the cache is persisted: the next mount uploads it
                log.error(
                    "final upload failed: %s; what was not uploaded stays in %s",
                    exc,
                    self.cache_dir,
                )
            if self.temp_cache:
                shutil.rmtree(self.temp_cache, ignore_errors=True)
            log.info("clean shutdown")

    def _keep_cache(self) -> bool:
        return trio.current_time() < self.keep_cache_until

    async def prepare_umount(self, engine: Engine, within: float) -> dict:
        """Sync for at most `within` seconds before an unmount. If that fails (lost store,
        store errors, no answer in time), the unmount that follows skips the final flush:
        the cache dir keeps what was not uploaded. Says which it was."""
        info: dict = {
            "mountpoint": self.mountpoint,
            "cache_dir": self.cache_dir,
            "uploaded": True,
            "lost": None,
            "reason": None,
        }
        if self.opts.read_only:
            return info
        reason = None
        if not engine.statistics().lease_lost:
            try:
                with trio.move_on_after(within) as scope:
                    await engine.sync()
                if scope.cancelled_caught:
                    reason = f"the store did not answer within {within:g}s"
            except ReadOnly as exc:
                reason = str(exc)
            except SnapfsError as exc:
                reason = str(exc)
            except Exception as exc:
                log.exception("sync before unmount failed")
                reason = f"{exc.__class__.__name__}: {exc}"
        stats = engine.statistics()
        if stats.lease_lost or reason:
            self.keep_cache_until = trio.current_time() + KEEP_CACHE_WINDOW
            info.update(
                uploaded=False,
                lost=stats.lease_lost,
                reason=reason,
                dirty_bytes=stats.dirty_bytes + stats.frozen_bytes,
                pending_snapshots=sum(
                    1 for s in engine.snapshots() if s.state == "creating" and not s.temporary
                ),
            )
            log.warning(
                "unmount without uploading (%s): %d bytes stay in %s",
                stats.lease_lost or reason,
                info["dirty_bytes"],
                self.cache_dir,
            )
        return info

    async def _kernel_readahead(self, nbytes: int) -> None:
        """Let the kernel read ahead `nbytes` for buffered readers of snapshot files (cp, dd,
        exports): FUSE caps its read-ahead at 128 KiB, one request in flight, at INIT. The
        stat waits for INIT to complete (the main loop answers it); a mount that is not ours
        to tune (no root, no sysfs) keeps the kernel's default."""
        if nbytes <= 0:
            return

        def tune() -> None:
            st = os.stat(self.mountpoint)
            bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
            with open(bdi, "w") as f:
                f.write(f"{max(128, nbytes >> 10)}\n")

        try:
            await trio.to_thread.run_sync(tune)
        except OSError as exc:
            log.info("kernel read-ahead left at its default: %s", exc)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("signal %d: unmounting", signum)
                pyfuse3.terminate()


def setup_logging(path: str | None, debug: bool) -> None:
    handler: logging.Handler = (
        logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


_M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Give glibc's malloc few arenas. Worker threads (block reads, pack building, store
    I/O) allocate 128 KiB-4 MiB buffers; with an arena per thread each arena keeps the
    freed ones, which cost ~100 MiB of RSS in the memory benchmark. Python allocates with
    the GIL held, so the arenas are hardly contended. Call before any thread starts."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)


def serve(opts: argparse.Namespace) -> int:
    """Run the daemon in this process; report readiness on opts.ready_fd if given."""
    limit_malloc_arenas()
    ready_fd = opts.ready_fd

    def ready(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, (message.replace("\n", " ") + "\n").encode())
                os.close(ready_fd)
            ready_fd = None
        elif message != "ok":
            print(f"snapfs: {message}", file=sys.stderr)

    try:
        daemon = Daemon(opts)
        setup_logging(
            opts.log_file or os.path.join(daemon.cache_dir, "daemon.log")
            if not opts.foreground or opts.log_file
            else None,
            opts.debug,
        )
        trio.run(daemon.run, ready)
    except SnapfsError as exc:
        log.error("%s", exc)
        ready(f"error: {exc}")
        return 1
    except Exception as exc:
        log.exception("daemon failed")
        ready(f"error: {exc.__class__.__name__}: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    opts = arg_parser().parse_args(argv)
    return serve(opts)


if __name__ == "__main__":
    sys.exit(main())
