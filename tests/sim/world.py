"""A deterministic simulation of one snapfs writer and its store (see docs/design.md,
"The simulation").

One seed is one history: trio runs on a MockClock (no wall clock: virtual time jumps when
every task waits), its scheduler's coin and every random choice come from the seed, and
work the engine sends to threads runs inline. On that clock, concurrent tasks work on the
engine: clients per volume (each writes its own share of the blocks, reads all; writes of
any size and offset, discards, reads, fsyncs), an admin (snapshots, temporary snapshots,
deletes, clones, rollbacks, resizes, volume deletes, syncs, gc, evictions, fsck, reads of
snapshots), the real background flusher, read-ahead, a read-only reader, takeovers by
other writers, and a checker that calls `assert_invariants()` at random moments. The
store delays calls, fails them (before they happen, or after: a lost reply), its listings
lag; the cache files sync slowly or fail to (EIO); the catalog fails commits. At random
moments, or at a catalog commit, the node crashes: at that instant the files, the store
and the catalog stop taking its changes, then every task is cancelled wherever it waits,
the engine is dropped without closing, every cache-file sector that was not fdatasynced is
lost or kept (torn writes), and a new engine opens the same cache dir. Sometimes it is a
clean restart instead. A watchdog (tests/sim/watchdog.py) fails a seed that hangs.

After every operation the invariants hold, every read equals a version the model allows,
every block after a crash holds a version the model allows (nothing fsynced is lost), and
every snapshot holds one instant of its volume. At the end, with faults off: everything
syncs, fsck is clean, and a store-only restore into an empty cache dir reads back every
volume and snapshot exactly.
"""

from __future__ import annotations

import ast
import contextvars
import functools
import logging
import os
import random
import sqlite3
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from snapfs import codec
from snapfs.chunks import blob_key, pack_key
from snapfs.errors import (
    CacheSyncFailed,
    CatalogFailed,
    IntegrityError,
    NotFound,
    ObjectNotFound,
    ReadOnly,
    SnapfsError,
    StoreError,
)
from snapfs.store import MemoryStore
from snapfs.tree import TreeReader
from snapfs.volume import publish
from snapfs.volume.check import expected_refs, key_to_store_key
from snapfs.volume.engine import Engine, EngineConfig
from tests.faultstore import FaultStore
from tests.sim.catalogfaults import FaultyConnection, NodeCrashed
from tests.sim.files import SimFiles
from tests.sim.model import SnapModel, VolumeModel, _show
from tests.sim.watchdog import Spin, Stuck, Watchdog

BS = 4096


@dataclass
class Knobs:
    """How hard a run pushes: drawn from the seed, so seeds differ in kind, not only in
    their coin flips."""

    volumes: int
    blocks: int
    tail: int  # bytes in the last block (0: a whole one); volume sizes are multiples of 512
    cache_blocks: int
    store_delay: float  # share of store calls that wait a little
    store_fail: float  # share of store calls that fail (half of them after the call)
    incarnations: int  # crashes or restarts, plus one
    life: float  # virtual seconds an incarnation lives, at most
    ops: int  # operations per client and incarnation, at most
    grace: float  # before the store deletes what no catalog references
    reader: bool  # a read-only engine follows the writer and reads its snapshots
    clients: int  # per volume, at once: each writes its own share of the blocks, reads all
    takeovers: int  # times another writer takes the store over while the writer runs
    resize: bool  # the admin grows volumes (not with takeovers)
    pause: bool  # the writer stops (all its store calls and syncs wait) beyond the grace
    list_lag: float  # store listings show the store as it was this long ago
    sync_fail: float  # share of cache-file fdatasyncs that fail (EIO)
    catalog_crash: float  # share of catalog commits at which the node crashes
    catalog_fail: float  # share of catalog commits that fail (EIO, ENOSPC)
    wide: bool = False  # some writes span more than the whole cache (a full cache)

    @property
    def takeover(self) -> bool:
        return self.takeovers > 0

    @classmethod
    def draw(cls, rng: random.Random) -> Knobs:
        return cls(
            volumes=rng.choice([1, 2, 3]),
            blocks=rng.choice([6, 16, 40, 40, 300, 4100]),  # 300+: trees of two levels
            tail=rng.choice([0, 0, 0, 512, 3584]),
            cache_blocks=rng.choice([10, 24, 400]),
            store_delay=rng.choice([0.0, 0.3, 0.8]),
            store_fail=rng.choice([0.0, 0.0, 0.02, 0.08]),
            incarnations=rng.choice([1, 2, 4]),
            life=rng.choice([2.0, 10.0, 40.0]),
            ops=rng.choice([20, 60]),
            grace=rng.choice([0.0, 0.5, 5.0]),
            reader=rng.random() < 0.5,
            clients=rng.choice([1, 1, 2, 3]),
            takeovers=rng.choice([1, 1, 2, 3]) if rng.random() < 0.3 else 0,
            resize=rng.random() < 0.3,
            pause=rng.random() < 0.5,
            list_lag=rng.choice([0.0] * 14 + [0.3, 2.0]),
            sync_fail=rng.choice([0.0, 0.0, 0.0, 0.03]),
            catalog_crash=rng.choice([0.0, 0.0, 0.01]),
            catalog_fail=rng.choice([0.0] * 7 + [0.003]),
            wide=rng.random() < 0.25,
        )


class BugFound(AssertionError):
    pass


class SharedLock:
    """A volume's clients hold it shared (their ops overlap); the admin's whole-volume
    calls (rollback, resize, delete) hold it alone."""

    def __init__(self) -> None:
        self.readers = 0
        self.writer = False
        self.changed = trio.Event()

    async def _wait(self) -> None:
        await self.changed.wait()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @asynccontextmanager
    async def shared(self):
        while self.writer:
            await self._wait()
        self.readers += 1
        try:
            yield
        finally:
            self.readers -= 1
            self._notify()

    @asynccontextmanager
    async def exclusive(self):
        while self.writer or self.readers:
            await self._wait()
        self.writer = True
        try:
            yield
        finally:
            self.writer = False
            self._notify()


# Set in a task (and so in the tasks it starts) that retried enough: the store no longer
# fails its calls (it still delays them). An open does dozens of calls: at 8% failures a
# call, 50 attempts in a row may all fail, a false failure of the harness.
QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet", default=False)
# Whose task it is (tasks inherit it): the writer's, or the second writer's or reader's.
WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="writer")


class _ErrorLog(logging.Handler):
    """Errors the engine logged and carried on from (the flusher survives any failure of
    a cycle): a non-snapfs exception, a missing object or bad bytes there is a bug."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bugs: list[str] = []
        self.muted = False  # between a crash instant and the restart: the node is dead

    def emit(self, record: logging.LogRecord) -> None:
        if self.muted:
            return
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (
            not isinstance(exc, SnapfsError) or isinstance(exc, ObjectNotFound | IntegrityError)
        ):
            self.bugs.append(f"{record.getMessage()}: {exc.__class__.__name__}: {exc}")
        elif "flush failed" in record.getMessage() and not any(
            ok in record.getMessage() for ok in ("injected", "another writer", "lost the store")
        ):
            self.bugs.append(record.getMessage())


class World:
    def __init__(self, seed: int, root: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.knobs = Knobs.draw(self.rng)
        for item in filter(None, os.environ.get("SNAPFS_SIM_KNOBS", "").split(",")):
            key, value = item.split("=")  # e.g. SNAPFS_SIM_KNOBS=takeovers=0,sync_fail=0
            setattr(self.knobs, key, type(getattr(self.knobs, key))(ast.literal_eval(value)))
        if self.knobs.list_lag and self.knobs.grace <= 2 * self.knobs.list_lag:
            # The grace period must outlast the store's listing lag (docs/design.md,
            # "Fencing"): a catalog is deleted only after it, so the newest one listed
            # still exists and the probe past it finds the newest.
            self.knobs.grace = 4 * self.knobs.list_lag
        self.root = root
        self.store = FaultStore(MemoryStore())
        self.store.hook = self._store_fault
        self.store.lag = self.knobs.list_lag
        self.files = SimFiles()
        self.files.hook = self._file_delay
        self.files.fail_sync = self._sync_fault
        self.sync_failed: dict[str, int] = {}  # volume → step its first fdatasync failed
        self.may_crash = False  # this incarnation may end in a crash (at a catalog commit)
        self.commit_crashes = 0
        self.crashed = False  # from the crash instant until the restart: the node is down
        self._live_scope: trio.CancelScope | None = None
        self.faults = False
        self.clock = 0  # the step counter of the model
        self.steps = 0  # operations done
        self.vols: dict[str, VolumeModel] = {}
        self.snaps: dict[tuple[str, str], SnapModel] = {}
        self.locks: dict[str, SharedLock] = {}
        self.history: list[str] = []
        self.engine: Engine | None = None
        self.cache_dir = tempfile.mkdtemp(prefix="cache-", dir=root)
        self.config = EngineConfig(
            cache_size=self.knobs.cache_blocks * BS,
            batch_bytes=6 * BS,
            slice_bytes=2 * BS,
            pack_size=3 * BS,
            uploads=3,
            flush_delay=0.5,
            flush_max_age=2.0,
            readahead_bytes=4 * BS,
            grace=self.knobs.grace,
            clock=trio.current_time,  # virtual time: grace periods pass as the run goes
        )
        self.counter = 0
        self.errors = _ErrorLog()
        self._node: trio.Nursery | None = None
        self.usurper: Engine | None = None  # the writer that took the store over
        self.usurper_dir: str | None = None
        self.usurper_made: dict[str, tuple[bytes, dict[str, bytes]]] = {}  # while it waited
        self.takeovers = 0  # done
        self.paused: trio.Event | None = None  # set: the stopped writer goes on
        self.auditor: Engine | None = None  # a read-only engine that walks the store
        self.audits = 0
        self.refresh_cut = (-1.0, -1.0)  # (from, until): the reader's refreshes fail
        self.catalog_put_at: dict[int, float] = {}  # catalog seq → when it was published
        self.deleted_at: dict[str, tuple[float, str, int]] = {}  # key → (time, by whom, step)
        self.active = 0  # clients still at work
        self.idle = trio.Event()
        self.watchdog = Watchdog()
        self.spin_most = 0

    # ------------------------------------------------------------------ faults

    async def _store_fault(self, op: str, key: str, after: bool) -> None:
        if op == "delete" and after:
            self.deleted_at[key] = (trio.current_time(), WHO.get(), self.clock)
        if op == "put_new" and after and key.startswith(publish.CATALOG_PREFIX):
            self.catalog_put_at.setdefault(publish.catalog_seq_of(key), trio.current_time())
        if os.environ.get("SNAPFS_SIM_STORELOG") and after and op in ("put", "put_new", "delete"):
            print(f"STORE t={trio.current_time():.4f} c={self.clock} {WHO.get()} {op} {key}")
        if self.crashed and WHO.get() == "writer":
            raise StoreError(f"{op} {key}: the node is down")
        if self.paused is not None and not after and WHO.get() == "writer":
            await self.paused.wait()
        if WHO.get() == "reader's refresh" and trio.current_time() < self.refresh_cut[1]:
            raise StoreError(f"injected: {op} {key}: the reader's refreshes fail for a while")
        if not self.faults:
            return
        if not after and self.rng.random() < self.knobs.store_delay:
            await trio.sleep(self.rng.expovariate(200))
        if self.rng.random() < self.knobs.store_fail / 2 and not QUIET.get():
            raise StoreError(f"injected: {op} {key} {'reply lost' if after else 'failed'}")

    def _sync_fault(self, path: str) -> bool:
        """An fdatasync of the writer's cache files fails (EIO): the engine must fail every
        later fsync, snapshot and sync of that volume until it is reopened."""
        if not self.faults or QUIET.get() or self.engine is None:
            return False
        if not path.startswith(self.cache_dir) or self.rng.random() >= self.knobs.sync_fail:
            return False
        for name, head in self.engine.heads.items():
            if path in (head.cache_path, head.frozen_path):
                self.sync_failed.setdefault(name, self.tick())
        self.note(f"fdatasync of {os.path.basename(path)} fails (EIO)")
        return True

    def hook_catalog(self, engine: Engine) -> Engine:
        """The writer's catalog fails or crashes at some commits (tests/sim/catalogfaults)."""
        engine.catalog.db = FaultyConnection(
            engine.catalog.db, self._catalog_fault, self._crash_at_commit
        )
        return engine

    def _catalog_fault(self) -> str | None:
        scope = self._live_scope
        if not self.faults or QUIET.get() or scope is None or scope.cancel_called:
            return None
        r = self.rng.random()
        if r < self.knobs.catalog_crash:
            if not self.may_crash or self.usurper is not None:
                return None
            return self.rng.choice(["crash-before", "crash-after"])
        if r < self.knobs.catalog_crash + self.knobs.catalog_fail:
            return self.rng.choice(["eio", "enospc"])
        return None

    def _crash_at_commit(self) -> None:
        self.commit_crashes += 1
        self.note("the node crashes at a catalog commit")
        self.stop(True, self._live_scope)

    async def _file_delay(self, op: str, path: str) -> None:
        if self.paused is not None and WHO.get() == "writer":
            await self.paused.wait()
        if self.faults and self.rng.random() < 0.5:
            await trio.sleep(self.rng.expovariate(500))

    # ------------------------------------------------------------------ bookkeeping

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def note(self, what: str) -> None:
        self.steps += 1
        self.history.append(f"{self.steps} c={self.clock} t={trio.current_time():.3f} {what}")
        del self.history[:-400]

    async def trace(self, where: str) -> None:
        """SNAPFS_SIM_TRACE=VOL:BLK prints that block's state in the engine at each step."""
        spec = os.environ.get("SNAPFS_SIM_TRACE")
        if not spec or self.engine is None:
            return
        vol, blk = spec.split(":")
        head = self.engine.heads.get(vol)
        if head is None:
            return
        blk = int(blk)
        mapped = await self.engine.tree.lookup(head.row.root, head.row.root_level, blk)
        row = self.engine.catalog.dirty(head.row.id).get(blk)
        data = head.cache.pread(BS, blk * BS)
        image = self.files.durable(head.cache_path, blk * BS, BS)
        print(
            f"TRACE {where} c={self.clock}: epoch={head.row.epoch} "
            f"pending={[(s.name, s.epoch, s.state) for s in head.pending]} "
            f"dirty={head.dirty.get(blk)} row={row} clean={head.blocks.cached_clean(blk)} "
            f"tree={_show(b'') if mapped is None else mapped.hex()[:8]}"
            f" cache={_show(data)} image={_show(image)}"
        )

    def check(self, where: str) -> None:
        if self.errors.bugs:
            raise BugFound(f"the engine logged a bug: {self.errors.bugs[0]}")
        try:
            self.engine.assert_invariants()
        except AssertionError as exc:
            raise BugFound(f"invariant broken after {where}: {exc}") from None

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def tag(self, n: int) -> bytes:
        """n bytes of 8-byte tags that say which write made them."""
        self.counter += 1
        unit = f"w{self.counter:<6}|".encode()[:8]
        return (unit * (n // 8 + 1))[:n]

    async def retry(
        self,
        call,
        *args,
        attempts: int = 60,
        quiet_after: int = 10,
        missing_ok: float | None = None,
    ):
        """Call until the injected faults let it through (the oracle's own reads, opens);
        after `quiet_after` failures the store stops failing this task's calls. A missing
        object is a bug, unless the call lasted `missing_ok` seconds or more (the grace:
        the store may have moved on under it)."""
        token = None
        try:
            for attempt in range(attempts):
                began = trio.current_time()
                try:
                    return await call(*args)
                except ObjectNotFound as exc:
                    if self.displaced():
                        raise  # what it alone had is the new writer's to sweep: expected
                    if missing_ok is None or trio.current_time() - began < missing_ok:
                        raise BugFound(f"{call.__name__}: {exc}") from exc
                    last = exc
                    await trio.sleep(0.01)
                except StoreError as exc:
                    last = exc
                    await trio.sleep(0.01 * min(2**attempt, 50))
                if attempt + 1 == quiet_after:
                    token = QUIET.set(True)
            raise BugFound(f"{call.__name__} kept failing, even with the store quiet: {last}")
        finally:
            if token is not None:
                QUIET.reset(token)

    # ------------------------------------------------------------------ the run

    async def run(self) -> None:
        """The history, watched: a step that takes too long in virtual time, or an event
        loop that spins while virtual time stands still, fails the seed with every task's
        stack (tests/sim/watchdog.py)."""
        spin = Spin(trio.lowlevel.current_clock(), self.watchdog.fail)
        trio.lowlevel.add_instrument(spin)
        try:
            async with trio.open_nursery() as outer:
                self.watchdog.scope = outer.cancel_scope
                outer.start_soon(self.watchdog.run)
                await self.history_()
                outer.cancel_scope.cancel()
        except BaseException as exc:
            if self.watchdog.failure is not None:
                raise Stuck(self.watchdog.failure) from exc
            raise
        finally:
            trio.lowlevel.remove_instrument(spin)
            self.spin_most = spin.most
        if self.watchdog.failure is not None:
            raise Stuck(self.watchdog.failure)

    async def history_(self) -> None:
        logging.getLogger("snapfs").addHandler(self.errors)
        try:
            await publish.init_store(self.store)
            self.engine = self.hook_catalog(
                await Engine.open(self.store, self.cache_dir, self.config, files=self.files)
            )
            size = self.knobs.blocks * BS - (BS - self.knobs.tail) % BS
            for i in range(self.knobs.volumes):
                name = f"v{i}"
                await self.engine.create_volume(name, size, BS)
                self.vols[name] = self.shared(VolumeModel.new(name, size, BS, None, self.tick()))
                self.locks[name] = SharedLock()
            for life in range(self.knobs.incarnations):
                self.faults = True
                last = life + 1 == self.knobs.incarnations
                crash = not last and self.rng.random() < 0.75
                self.may_crash = crash or (not last and self.rng.random() < 0.5)
                await self.live(self.rng.uniform(0.1, 1.0) * self.knobs.life, crash)
                self.faults = False
                if self.usurper is not None:
                    with self.watchdog.step("the takeover"):
                        await self.switch_to_usurper()
                elif not last:
                    with self.watchdog.step("a restart"):
                        await self.restart(crash=self.crashed)
            with self.watchdog.step("finish"):
                await self.finish()
        finally:
            logging.getLogger("snapfs").removeHandler(self.errors)
            if self.engine is not None:
                self.abandon()
            if self.auditor is not None:
                for head in self.auditor.heads.values():
                    head.close()
                self.auditor.catalog.close()

    async def live(self, duration: float, crash: bool) -> None:
        """One incarnation: every task works until `duration` passes or the clients are
        done; then the node crashes (`crash`) or stops for a clean restart."""
        self.idle = trio.Event()
        self.crashed = False
        try:
            await self.incarnation(duration, crash)
        except* NodeCrashed:
            pass  # the node died at a catalog commit: the crash instant was then

    async def incarnation(self, duration: float, crash: bool) -> None:
        async with trio.open_nursery() as nursery:
            self._node = nursery
            self._live_scope = nursery.cancel_scope
            nursery.start_soon(self.timer, duration, crash, nursery.cancel_scope)
            await nursery.start(self.engine.run_flusher)
            await nursery.start(self.engine.readahead.run)
            nursery.start_soon(self.checker)
            if self.knobs.reader and self.knobs.grace > 0:
                nursery.start_soon(self.reader)
            if self.takeovers < self.knobs.takeovers:
                nursery.start_soon(self.usurp, nursery.cancel_scope)
            for name in list(self.vols):
                self.start_clients(nursery, name)
            await self.admin()
            await self.idle.wait()
            self.stop(crash, nursery.cancel_scope)  # the work is done: end the flusher too

    async def timer(self, duration: float, crash: bool, scope: trio.CancelScope) -> None:
        await trio.sleep(duration)
        self.stop(crash, scope)

    def stop(self, crash: bool, scope: trio.CancelScope) -> None:
        """End the incarnation. A crash happens at this instant, before the cancellation
        runs any `finally` or `except` block of the engine: from now on the cache files,
        the store and the catalog ignore or refuse whatever the dying tasks still do."""
        if scope.cancel_called:
            return
        if self.paused is not None and not (crash and self.usurper is None):
            return  # the stopped writer must wake first: the takeover ends the incarnation
        if crash and self.usurper is None and self.engine is not None:
            self.crashed = True
            self.note("CRASH (the instant)")
            self.files.freeze(self.cache_dir)  # the store refuses its calls (_store_fault)
            self.errors.muted = True
            self.engine.catalog.db.set_authorizer(_read_only_sql)
        scope.cancel()

    async def reader(self) -> None:
        """A read-only mount on another machine: its own cache dir (kept across the
        writer's incarnations), refreshing well within the grace period; every snapshot
        it shows that the model still has reads back exactly."""
        WHO.set("reader")
        config = EngineConfig(**{**self.config.__dict__, "refresh": self.knobs.grace / 4})
        if not hasattr(self, "reader_dir"):
            self.reader_dir = tempfile.mkdtemp(prefix="reader-", dir=self.root)
        try:
            ro = await Engine.open(self.store, self.reader_dir, config, read_only=True)
        except StoreError:
            return
        try:
            async with trio.open_nursery() as nursery:
                token = WHO.set("reader's refresh")  # the refresher's store calls
                await nursery.start(ro.run_refresher)
                WHO.reset(token)
                while True:
                    await trio.sleep(self.rng.expovariate(4))
                    if self.rng.random() < 0.05 and trio.current_time() > self.refresh_cut[1]:
                        # Its refreshes fail for longer than the grace: the writer's gc
                        # deletes packs its index still names. A snapshot it shows is
                        # still read exactly (the index is read anew on a missing blob).
                        now = trio.current_time()
                        self.refresh_cut = (now, now + self.knobs.grace * self.rng.uniform(1.5, 3))
                        self.note("the reader's refreshes fail from now")
                        nursery.start_soon(self.gc_moves_blobs)
                    with self.watchdog.step("a reader op"):
                        await self.reader_op(ro)
        finally:
            for head in ro.heads.values():
                head.close()
            ro.catalog.close()

    async def gc_moves_blobs(self) -> None:
        """The writer's gc rewrites every pack with anything dead in it: the blobs it
        moves are in new packs, and the old packs go a grace period later."""
        WHO.set("writer")
        await trio.sleep(self.rng.uniform(0.0, 0.2) * self.knobs.grace)
        if self.engine is None or self.crashed or self.usurper is not None:
            return
        self.note("gc (every pack with a dead blob)")
        try:
            with self.watchdog.step("a gc during the reader's cut"):
                await self.engine.gc(threshold=1.0)
        except SnapfsError as exc:
            self.expected(exc)

    async def reader_op(self, ro: Engine) -> None:
        cut = self.refresh_cut[0] + self.knobs.grace < trio.current_time() < self.refresh_cut[1]
        if self.rng.random() < 0.5 and not cut:  # cut off past the grace: snapshots
            await self.reader_reads_a_head(ro)
            return
        known = sorted(k for k, s in self.snaps.items() if s.content is not None)
        if not known:
            return
        key = self.rng.choice(known)
        snap = self.snaps[key]
        try:
            row = ro.snapshot_row(*key)
        except NotFound:
            return  # not published yet, or not refreshed yet
        self.note(f"reader reads {key[0]}@{key[1]}")
        try:
            data = await ro.read_snapshot(row, 0, row.size)
        except SnapfsError as exc:
            if key not in self.snaps:
                return  # deleted by the writer meanwhile: its data may go
            if isinstance(exc, StoreError) and not isinstance(exc, ObjectNotFound):
                return  # an injected failure
            raise BugFound(f"the reader could not read {key}: {exc}") from exc
        if data != snap.content:
            raise BugFound(f"the reader read {key[0]}@{key[1]} wrong")

    async def audit(self, where: str) -> None:
        """The store holds every object that the newest published catalog references: a
        read-only engine of the auditor's own takes that catalog and the index, walks the
        trees of its volumes and snapshots (every node read from the store), and finds
        every chunk's pack in the store. Not with listings that lag (the index is found
        by listing) nor without grace (the writer may delete what a newer catalog no
        longer needs while the walk goes on); a walk longer than the grace proves
        nothing."""
        if self.knobs.list_lag or self.knobs.grace == 0 or self.rng.random() >= 0.25:
            return
        quiet, who = QUIET.set(True), WHO.set("auditor")
        began = trio.current_time()
        missing: list[str] = []
        try:
            if self.auditor is None:
                path = tempfile.mkdtemp(prefix="auditor-", dir=self.root)
                self.auditor = await Engine.open(self.store, path, self.config, read_only=True)
            else:
                await self.auditor.refresh()
            for attempt in range(3):
                # Again with the whole index read anew, as a reader does when a blob is
                # not where its index said (the writer's gc moved it, and its old pack went
                # while this walk went on: a fragment that still listed it may have won).
                if attempt:
                    await trio.sleep(0.01)
                    await self.auditor.follower.reload_index()
                missing = await self._audit_walk()
                if not missing:
                    break
            self.audits += 1
        finally:
            QUIET.reset(quiet)
            WHO.reset(who)
        await self.audit_older_catalogs(where)
        if missing and trio.current_time() - began < self.knobs.grace:
            seqs = [
                publish.catalog_seq_of(k)
                for k in self.store.inner.objects
                if k.startswith("catalog/")
            ]
            raise BugFound(
                f"the newest published catalog references what the store lacks ({where}): "
                f"{missing[:4]}; the auditor follows catalog {self.auditor.fence.store_seq}, "
                f"the store's newest is {max(s for s in seqs if s is not None)} "
                f"(audit began t={began:.3f})"
            )

    async def audit_older_catalogs(self, where: str) -> None:
        """The store keeps what every catalog younger than the grace references, not only
        the newest: a reader that loaded an older one a moment ago reads on. Younger: one
        replaced less than a grace period ago. Each is walked through the index fragments
        it names, read from the store as it is (no faults, no lag)."""
        store = self.store.inner
        seqs = sorted(
            publish.catalog_seq_of(k)
            for k in list(store.objects)
            if k.startswith(publish.CATALOG_PREFIX)
        )
        for seq in seqs[:-1]:
            replaced = min((t for s, t in self.catalog_put_at.items() if s > seq), default=None)
            if replaced is None or trio.current_time() >= replaced + self.knobs.grace:
                continue
            doc = await publish.read_catalog(store, seq)
            if doc is None:
                continue
            missing = await walk_catalog(store, doc)
            if missing and trio.current_time() < replaced + self.knobs.grace:
                raise BugFound(
                    f"catalog {seq}, replaced {trio.current_time() - replaced:.3f}s ago (grace "
                    f"{self.knobs.grace}s), references what the store lacks ({where}): "
                    f"{missing[:3]}"
                )

    async def _audit_walk(self) -> list[str]:
        cat = self.auditor.catalog
        named = [(f"volume {v.name}", v.root, v.block_size) for v in cat.volumes()]
        named += [
            (f"snapshot {s.volume}@{s.name}", s.root, s.block_size)
            for s in cat.snapshots()
            if s.state == "available"
        ]
        named += [
            (f"reference {r.id}", node, r.block_size) for r in cat.references() for node in r.held()
        ]
        roots = [(root, bs) for _n, root, bs in named]
        try:
            expected = await expected_refs(self.auditor.tree, roots)
        except SnapfsError as exc:
            return [f"{exc.__class__.__name__}: {exc}"]
        missing = []
        for key in expected:
            loc = self.auditor.chunks.location(key)
            if loc is None:
                missing.append(f"{key_to_store_key(key)}: not in the index")
            elif pack_key(loc[0]) not in self.store.inner.objects:
                when = self.deleted_at.get(pack_key(loc[0]))
                by = f" (deleted at t={when[0]:.3f} c={when[2]} by the {when[1]})" if when else ""
                missing.append(f"{key_to_store_key(key)}: its pack {pack_key(loc[0])} is gone{by}")
        if missing:  # whose trees hold the first one
            first = next(k for k in expected if key_to_store_key(k) == missing[0].split(":")[0])
            for name, root, bs in named:
                if first in await expected_refs(self.auditor.tree, [(root, bs)]):
                    missing[0] += f", in {name}"
        return missing

    async def reader_reads_a_head(self, ro: Engine) -> None:
        """The store keeps every object a catalog younger than the grace references: the
        reader, refreshing within grace/4, reads a published volume head (its content is
        not the model's: the published one lags) and never finds an object missing."""
        names = sorted(ro.heads)
        if not names:
            return
        name = self.rng.choice(names)
        size = ro.heads[name].row.size
        off = self.rng.randrange(0, size, 512)
        n = min(size - off, 16 * BS)
        self.note(f"reader reads {name} {off}+{n} (published)")
        try:
            await ro.read(name, off, n)
        except SnapfsError as exc:
            if isinstance(exc, StoreError) and not isinstance(exc, ObjectNotFound):
                return  # an injected failure
            if isinstance(exc, NotFound) and not isinstance(exc, ObjectNotFound):
                return  # deleted meanwhile
            if trio.current_time() < self.refresh_cut[1] + 2 * self.knobs.grace:
                return  # its catalog may be older than the grace: its head may be gone
            lag = f" (store listings lag {self.knobs.list_lag}s)" if self.knobs.list_lag else ""
            raise BugFound(f"the reader could not read the published {name}: {exc}{lag}") from exc

    async def usurp(self, scope: trio.CancelScope) -> None:
        """Another writer takes the store over (--takeover) while this one runs: this one
        must end up lost (every later write EROFS), and must never publish again."""
        await trio.sleep(self.rng.uniform(0.0, 1.0) * self.knobs.life)
        WHO.set("usurper")
        self.note("TAKEOVER begins")
        pause = None
        if self.knobs.pause:  # the writer stops: every store call and sync of it waits
            pause = self.paused = trio.Event()
            self.note("the writer stops")
        try:
            # Another machine: the end of this one's incarnation does not cut its open.
            with trio.CancelScope(shield=True), self.watchdog.step("the takeover's open"):
                self.usurper_dir = tempfile.mkdtemp(prefix="usurper-", dir=self.root)
                # The running writer deletes what its newer catalogs no longer need a
                # grace period later: a restore that took longer starts again.
                self.usurper = await self.retry(
                    Engine.open,
                    self.store,
                    self.usurper_dir,
                    self.config,
                    False,
                    self.files,
                    missing_ok=self.knobs.grace,
                )
            self.takeovers += 1
            self.note("TAKEOVER: the second writer has fenced the store")
            if pause is not None:  # it stays stopped beyond the grace period
                with trio.CancelScope(shield=True), self.watchdog.step("the second writer's work"):
                    await self.usurper_works()
                await trio.sleep(self.knobs.grace * self.rng.uniform(0.0, 1.0))
        finally:
            if pause is not None:
                self.note("the writer goes on")
                pause.set()
                self.paused = None
        if self.rng.random() < 0.5 or pause is not None:
            probed = trio.Event()
            self._node.start_soon(self.lost_probe, probed, pause is not None)
            with trio.move_on_after(10.0 + 3 * self.knobs.grace):
                await probed.wait()
        await trio.sleep(self.rng.uniform(0.0, 2.0))  # the first one goes on for a while
        scope.cancel()

    async def usurper_works(self) -> None:
        """While the first writer is stopped, the second works on a volume of its own: a
        write, a snapshot and a sync, again and again, then, the grace past, once more: it
        deletes its oldest catalogs, its fence among them, which frees that seq for the
        stopped writer's conditional put when it wakes (finding 3). The volume and its
        snapshots join the model at the switch (`usurper_made`)."""
        u = self.usurper
        name, blocks = f"u{self.takeovers}", 8

        async def create(snap: str | None = None) -> None:  # it publishes: may fail after
            if snap is None and name not in u.heads:
                await u.create_volume(name, blocks * BS, BS)
            elif snap is not None and snap not in {s.name for s in u.catalog.snapshots(name)}:
                await u.create_snapshot(name, snap)

        await self.retry(create)
        content = bytearray(blocks * BS)
        snaps: dict[str, bytes] = {}
        for i in range(publish.KEEP_CATALOGS + 3):
            if i == publish.KEEP_CATALOGS + 2:
                await trio.sleep(self.knobs.grace + 0.05)
            blk = self.rng.randrange(blocks)
            data = self.tag(BS)
            await u.write(name, blk * BS, data)
            content[blk * BS : (blk + 1) * BS] = data
            await self.retry(create, f"s{i}")
            snaps[f"s{i}"] = bytes(content)
            await self.retry(u.sync)
        self.note(f"the second writer published {name} and catalog {u.fence.store_seq}")
        self.usurper_made[name] = (bytes(content), snaps)

    def adopt_usurper_made(self) -> None:
        """At the switch: what the second writer made while the first was stopped, synced
        and published, joins the model."""
        for name, (content, snaps) in self.usurper_made.items():
            step = self.tick()
            self.vols[name] = self.shared(VolumeModel.new(name, len(content), BS, content, step))
            self.locks[name] = SharedLock()
            for sname, data in snaps.items():
                self.snaps[(name, sname)] = SnapModel(
                    name, sname, step, step, published=True, content=data
                )
        self.usurper_made.clear()

    async def lost_probe(self, done: trio.Event, woken: bool = False) -> None:
        """The displaced writer, not knowing yet, takes a snapshot; once its flusher has
        learned that it lost, it rolls that volume back and deletes it (finding 5: both
        waited in a loop with no checkpoint for a snapshot that can never commit now).
        Every call must fail fast or do its job, never wait."""
        WHO.set("writer")
        vol = self.probe_volume()
        await self.probe_op(self.op_snapshot, vol)
        target = self.pick_snapshot(vol.name, available=True)
        if target is not None:  # read first: the rollback's call must come at once
            await self.probe_op(self.op_read_snapshot, target)
        async with trio.open_nursery() as nursery:
            # A sync learns the loss while it holds the commit lock; the rollback and the
            # delete, waiting for that lock, must not then wait for the pending snapshot.
            nursery.start_soon(self.probe_op, self.op_sync)
            if target is not None and target.content is not None and vol.name in self.vols:
                delay = self.rng.uniform(0.0, 0.01)
                nursery.start_soon(
                    functools.partial(self.probe_op, self.op_rollback, vol, target, delay=delay)
                )
            delay = self.rng.uniform(0.0, 0.01)
            nursery.start_soon(
                functools.partial(self.probe_op, self.op_delete_volume, vol, delay=delay)
            )
        for _ in range(2 if woken else 0):
            # Woken from a stop, it sweeps the store for what no catalog of its own
            # knows, twice a grace period apart (an orphan goes on the second): the
            # second writer's packs, unless it learns first that it lost.
            try:
                with self.watchdog.step("a displaced writer's sweep"):
                    await self.engine.sweep_orphans()
            except SnapfsError as exc:
                self.expected(exc)
            await trio.sleep(self.knobs.grace + 0.05)
        done.set()

    async def probe_op(self, op, *args, delay: float = 0.0) -> None:
        WHO.set("writer")
        await trio.sleep(delay)
        name = getattr(op, "__name__", None) or op.func.__name__
        try:
            with self.watchdog.step(f"a displaced writer's {name}"):
                await op(*args)
        except SnapfsError as exc:
            self.note(f"the displaced writer's {name}: {exc.__class__.__name__}: {exc}")
            self.expected(exc)

    def probe_volume(self) -> VolumeModel:
        """A volume with a committed snapshot to roll back to, a clone if one has one."""
        names = sorted(self.vols)
        names = [n for n in names if self.pick_snapshot(n, available=True)] or names
        names = [n for n in names if n.startswith("c")] or names
        return self.vols[self.rng.choice(names)]

    async def checker(self) -> None:
        while True:
            await trio.sleep(self.rng.expovariate(20))
            self.check("a random moment")

    # ------------------------------------------------------------------ clients

    def start_clients(self, nursery: trio.Nursery, name: str) -> None:
        for i in range(self.knobs.clients):
            nursery.start_soon(self.client, name, i)

    async def client(self, name: str, i: int = 0) -> None:
        """Client i of a volume: its ops overlap the other clients' (no lock between them);
        it writes only its own share of the volume's blocks (the model needs one writer per
        block: a partial write's content depends on the block before it), and reads all."""
        vol = self.vols[name]
        self.active += 1
        try:
            for _ in range(self.knobs.ops):
                await trio.sleep(self.rng.expovariate(10))
                async with self.locks[name].shared():
                    if self.vols.get(name) is not vol or vol.deleting:
                        return  # deleted
                    with self.watchdog.step(f"client op on {name}: {self.history[-1:]}"):
                        try:
                            await self.client_op(vol, i)
                        except ObjectNotFound:
                            if self.displaced():
                                return
                            raise
                await self.trace(self.history[-1])
                self.check(f"a client op on {name}")
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()

    async def client_op(self, vol: VolumeModel, i: int = 0) -> None:
        r = self.rng.random()
        engine = self.engine
        if r < 0.55 or r >= 0.95:
            off, n = self.extent(vol, discard=r >= 0.95, share=i)
            data = bytes(n) if r >= 0.95 else self.tag(n)
            versions = vol.begin(off, data, self.tick())
            kind = "discard" if r >= 0.95 else "write"
            self.note(f"{kind} {vol.name} {off}+{n}")
            lost = engine.lease_lost
            try:
                if kind == "discard":
                    await engine.discard(vol.name, off, n)
                else:
                    await engine.write(vol.name, off, data)
            except SnapfsError as exc:
                self.expected(exc)
                for _blk, version in versions:
                    version.whole = False
                if off < vol.shared * BS:  # other clients' calls may overlap: no settling
                    for _blk, version in versions:
                        version.end, version.sure = self.tick(), False
                    return
                await self.settle(vol, {b for b, _v in versions}, f"a failed {kind}")
                return
            self.no_yes_once_lost(lost, f"a {kind} of {vol.name}")
            end = self.tick()
            for _blk, version in versions:
                version.end = end
        elif r < 0.7:
            start = self.tick()
            self.note(f"fsync {vol.name}")
            lost = engine.lease_lost
            try:
                await engine.fsync(vol.name)
            except SnapfsError as exc:
                self.expected(exc)
                return
            self.no_yes_once_lost(lost, f"an fsync of {vol.name}")
            self.no_sync_after_failure([vol.name], start, "fsync")
            vol.durable = max(vol.durable, start)
        else:
            off, n = self.extent(vol)
            start = self.tick()
            self.note(f"read {vol.name} {off}+{n}")
            try:
                got = await engine.read(vol.name, off, n)
            except SnapfsError as exc:
                self.expected(exc)
                return
            self.check_read(vol, off, got, start, self.tick())

    def check_read(self, vol: VolumeModel, off: int, got: bytes, start: int, end: int) -> None:
        """Each block reads as the version current when the read began, or one whose call
        overlapped the read (another client's write in flight); with one client, exactly
        the model's current version."""
        for blk in range(off // BS, -(-(off + len(got)) // BS)):
            lo, hi = max(off, blk * BS), min(off + len(got), (blk + 1) * BS)
            part = got[lo - off : hi - off]
            options = [
                v.data[lo - blk * BS : hi - blk * BS]
                for v in vol.snapshot_candidates(blk, start, end)
            ]
            if part not in options:
                first = next(i for i in range(len(part)) if part[i] != options[-1][i])
                raise BugFound(
                    f"read {vol.name} {off}+{len(got)} differs from the model in block {blk} "
                    f"at byte {lo + first}: {_show(part)} instead of one of "
                    f"{[_show(o) for o in options]}"
                )

    def extent(
        self, vol: VolumeModel, discard: bool = False, share: int | None = None
    ) -> tuple[int, int]:
        """A range of the volume, or one client `share` may write: whole blocks of the
        shared ones, or any range of its own share of the others."""
        nblocks, clients = len(vol.blocks), self.knobs.clients
        first, last = 0, nblocks
        if share is not None and vol.shared and self.rng.random() < 0.3:
            blk = self.rng.randrange(vol.shared)
            return blk * BS, self.rng.randint(1, min(2, vol.shared - blk)) * BS
        if share is not None and clients > 1:
            own = nblocks - vol.shared
            first = vol.shared + share * own // clients
            last = vol.shared + (share + 1) * own // clients
            if first == last:  # more clients than blocks
                return 0, 0
        lo, hi = first * BS, min(last * BS, vol.size)
        kind = self.rng.random()
        if kind < 0.4:  # whole blocks
            blk = self.rng.randrange(first, last)
            count = self.rng.randint(1, min(4, last - blk))
            return blk * BS, min(count * BS, hi - blk * BS)
        off = self.rng.randrange(lo, hi)
        most = 3 * BS if not discard else 8 * BS
        if self.knobs.wide and not discard and self.rng.random() < 0.15:
            most = (self.knobs.cache_blocks + 2) * BS  # unaligned, beyond the whole cache
        n = self.rng.randint(1, min(hi - off, most))
        return off, n

    def displaced(self) -> bool:
        """This task is the displaced writer's: what it committed after the catalog the
        new writer restored was never published, and the new writer sweeps it (after the
        grace), so its reads may find objects missing."""
        return self.usurper is not None and WHO.get() == "writer"

    def expected(self, exc: SnapfsError) -> None:
        """An error a call may give in this world: the store failed (injected), or this
        writer lost the store to another one (EROFS from then on)."""
        if isinstance(exc, ReadOnly) and self.engine is not None and self.engine.lease_lost:
            return
        if isinstance(exc, ObjectNotFound) and self.displaced():
            return
        if isinstance(exc, CacheSyncFailed) and self.sync_failed:
            return  # an fdatasync failed (injected): the volume fails its syncs from then on
        if (
            isinstance(exc, CatalogFailed)
            and self.engine is not None
            and self.engine.catalog.failed
        ):
            return  # a catalog commit failed (injected): the writer stops until remounted
        if isinstance(exc, ObjectNotFound | IntegrityError) or not isinstance(exc, StoreError):
            raise BugFound(f"unexpected error: {exc.__class__.__name__}: {exc}") from exc

    async def settle(self, vol: VolumeModel, blocks, why: str) -> None:
        for blk in sorted(blocks):
            data = await self.retry(self.engine.read, vol.name, blk * BS, vol.blen(blk))
            if blk < vol.shared:
                vol.settle_shared(blk, data, why, self.tick())
            else:
                vol.settle(blk, data, why, self.tick())

    def shared(self, vol: VolumeModel) -> VolumeModel:
        """With several clients, the first blocks are everyone's (whole-block writes whose
        calls overlap: the engine may apply them in either order)."""
        if self.knobs.clients > 1:
            vol.shared = min(4, len(vol.blocks) // 4)
        return vol

    # ------------------------------------------------------------------ admin

    async def admin(self) -> None:
        ops = [
            (self.op_snapshot, 6),
            (self.op_delete_snapshot, 2),
            (self.op_read_snapshot, 4),
            (self.op_clone, 1),
            (self.op_rollback, 1),
            (self.op_sync, 2),
            (self.op_gc, 1),
            (self.op_evict, 2),
            (self.op_fsck, 1),
            (self.op_resize, 1 if self.knobs.resize and not self.knobs.takeover else 0),
            (self.op_delete_volume, 1),
        ]
        funcs, weights = zip(*ops, strict=True)
        for _ in range(self.knobs.ops):
            await trio.sleep(self.rng.expovariate(5))
            op = self.rng.choices(funcs, weights)[0]
            try:
                with self.watchdog.step(f"admin {op.__name__}"):
                    await op()
            except SnapfsError as exc:
                self.expected(exc)
            await self.trace(f"admin {op.__name__}")
            self.check(op.__name__)
            await self.audit(f"after {op.__name__}")
            self.prune()

    def no_yes_once_lost(self, lost: str | None, what: str) -> None:
        """A writer that knew, when a call began, that it lost the store must refuse it
        (EROFS): what it would acknowledge can never reach the store."""
        if lost is not None:
            raise BugFound(f"{what} succeeded after the writer knew it lost the store ({lost})")

    def no_sync_after_failure(self, names: list[str], start: int, what: str) -> None:
        """fsyncgate: once an fdatasync of a volume failed, no later fsync, snapshot or sync
        of it may succeed until it is reopened (the kernel may have dropped the pages)."""
        for name in names:
            failed = self.sync_failed.get(name)
            if failed is not None and failed < start:
                raise BugFound(
                    f"{what} of {name} succeeded after an fdatasync of it failed "
                    f"(step {failed}): the data it claims durable may be gone"
                )

    def pick_volume(self) -> VolumeModel:
        return self.vols[self.rng.choice(sorted(self.vols))]

    def pick_snapshot(self, volume: str | None = None, available=False) -> SnapModel | None:
        keys = sorted(k for k, s in self.snaps.items() if s.end is not None)
        if volume is not None:
            keys = [k for k in keys if k[0] == volume]
        if available:  # committed: a rollback to one does not wait for a commit
            keys = [k for k in keys if self.state(*k) == "available"]
        return self.snaps[self.rng.choice(keys)] if keys else None

    async def op_snapshot(self, vol: VolumeModel | None = None) -> None:
        vol = vol or self.pick_volume()
        snap = SnapModel(vol.name, self.name("s"), self.tick(), temporary=self.rng.random() < 0.2)
        self.snaps[(vol.name, snap.name)] = snap
        self.note(f"snapshot {vol.name}@{snap.name}{' (temporary)' if snap.temporary else ''}")
        lost = self.engine.lease_lost
        try:
            await self.engine.create_snapshot(vol.name, snap.name, temporary=snap.temporary)
        except SnapfsError as exc:
            self.expected(exc)
            if not self.exists(vol.name, snap.name):
                del self.snaps[(vol.name, snap.name)]
                return
        else:
            self.no_yes_once_lost(lost, f"a snapshot of {vol.name}")
        snap.end = self.tick()
        snap.fix_candidates(vol)
        self.no_sync_after_failure([vol.name], snap.start, "snapshot")
        vol.durable = max(vol.durable, snap.start)

    async def op_snapshot_soon(self, vol: VolumeModel) -> None:
        await trio.sleep(self.rng.choice([0.0, 0.001, 0.01]))
        if self.vols.get(vol.name) is not vol or vol.deleting:
            return
        try:
            with self.watchdog.step("a snapshot during a rollback"):
                await self.op_snapshot(vol)
        except SnapfsError as exc:
            self.expected(exc)

    async def op_delete_snapshot(self) -> None:
        snap = self.pick_snapshot()
        if snap is None:
            return
        self.note(f"delete {snap.volume}@{snap.name}")
        snap.deleting = True
        try:
            await self.engine.delete_snapshot(snap.volume, snap.name)
        except SnapfsError as exc:
            self.expected(exc)
            if self.exists(snap.volume, snap.name):
                snap.deleting = False
                return  # failed before it was deleted
        del self.snaps[(snap.volume, snap.name)]

    def state(self, volume: str, name: str) -> str | None:
        try:
            return self.engine.snapshot_row(volume, name).state
        except NotFound:
            return None

    def exists(self, volume: str, name: str) -> bool:
        try:
            self.engine.snapshot_row(volume, name)
            return True
        except NotFound:
            return False

    async def op_read_snapshot(self, snap: SnapModel | None = None) -> SnapModel | None:
        snap = snap or self.pick_snapshot()
        if snap is None:
            return None
        self.note(f"read {snap.volume}@{snap.name}")
        row = await self.engine.wait_available(snap.volume, snap.name)
        data = await self.engine.read_snapshot(row, 0, row.size)
        snap.resolve(data, BS)
        return snap

    async def op_clone(self) -> None:
        snap = await self.op_read_snapshot()
        if snap is None or len(self.vols) >= 5:
            return
        name = self.name("c")
        grow = self.rng.choice([0, 0, 2 * BS])
        size = len(snap.content) + grow
        self.note(f"clone {snap.volume}@{snap.name} -> {name}")
        model = self.shared(VolumeModel.new(name, size, BS, snap.content, self.tick()))
        model.acked = False
        self.vols[name] = model
        self.locks[name] = SharedLock()
        try:
            await self.engine.create_volume(name, size, source=(snap.volume, snap.name))
        except SnapfsError as exc:
            self.expected(exc)
            if name not in self.engine.heads:
                del self.vols[name]
                return
            if self.engine.lease_lost:  # only in this writer's cache: never published
                return
        model.acked = True
        model.durable = model.published = self.tick()
        self.start_clients(self._node, name)

    async def op_rollback(self, vol: VolumeModel | None = None, snap=None) -> None:
        vol = vol or self.pick_volume()
        snap = snap or self.pick_snapshot(vol.name, available=True)
        if snap is None or self.state(vol.name, snap.name) is None:
            return  # none, or deleted meanwhile
        if self.engine.snapshot_row(vol.name, snap.name).size != vol.size:
            return
        if snap.content is None:
            snap = await self.op_read_snapshot(snap)
        if self.rng.random() < 0.3:
            # A snapshot taken while the rollback waits for its locks holds the volume
            # from before it, whole: the rollback must commit it first (finding 12).
            self._node.start_soon(self.op_snapshot_soon, vol)
        async with self.locks[vol.name].exclusive():
            self.note(f"rollback {vol.name} to @{snap.name}")
            versions = vol.replace_all(snap.content, self.tick())
            try:
                await self.engine.rollback(vol.name, snap.name)
            except SnapfsError as exc:
                self.expected(exc)
                for _blk, version in versions:
                    version.whole = False
                await self.settle(vol, range(len(vol.blocks)), "a failed rollback")
                return
            end = self.tick()
            for _blk, version in versions:
                version.end = end
            vol.durable = vol.published = end + 1

    async def op_resize(self) -> None:
        """Grow a volume (by a block or more, or by sectors: the tail block grows too)."""
        vol = self.pick_volume()
        size = vol.size + self.rng.choice([512, 3 * 512, BS, 300 * BS])
        async with self.locks[vol.name].exclusive():
            if vol.deleting or self.vols.get(vol.name) is not vol:
                return
            self.note(f"resize {vol.name} to {size}")
            vol.resizing = size
            try:
                await self.engine.resize_volume(vol.name, size)
            except SnapfsError as exc:
                self.expected(exc)
            self.resized(vol)

    def resized(self, vol: VolumeModel) -> None:
        """A resize call ended (or was cut off): the engine's size says whether it did."""
        head = self.engine.heads.get(vol.name)
        if vol.resizing is not None and head is not None and head.row.size == vol.resizing:
            vol.grow(vol.resizing, self.tick())
        vol.resizing = None

    async def op_delete_volume(self, vol: VolumeModel | None = None) -> None:
        """Delete a clone with its snapshots (the first volumes stay)."""
        clones = sorted(n for n in self.vols if n.startswith("c"))
        if vol is None and clones:
            vol = self.vols[self.rng.choice(clones)]
        if vol is None or vol.name not in clones:
            return
        async with self.locks[vol.name].exclusive():
            if vol.deleting or self.vols.get(vol.name) is not vol:
                return
            self.note(f"delete volume {vol.name}")
            vol.deleting = True
            for key, snap in self.snaps.items():
                if key[0] == vol.name:
                    snap.deleting = True
            try:
                await self.engine.delete_volume(vol.name, recursive=True)
            except SnapfsError as exc:
                self.expected(exc)
            self.volume_deleted(vol)

    def volume_deleted(self, vol: VolumeModel) -> None:
        """A delete call ended (or was cut off): what the engine still has stays."""
        for key, snap in list(self.snaps.items()):
            if key[0] == vol.name and snap.deleting:
                if self.exists(*key):
                    snap.deleting = False
                else:
                    del self.snaps[key]
        if vol.name in self.engine.heads:
            vol.deleting = False
        else:
            del self.vols[vol.name]

    async def op_sync(self) -> None:
        start = self.tick()
        self.note("sync")
        lost = self.engine.lease_lost
        await self.engine.sync()
        self.no_yes_once_lost(lost, "a sync")
        self.no_sync_after_failure(list(self.vols), start, "sync")
        for vol in self.vols.values():
            vol.durable = max(vol.durable, start)
            vol.published = max(vol.published, start)
        for snap in self.snaps.values():
            if snap.end is not None and snap.end < start and not snap.temporary:
                snap.published = True

    async def op_gc(self) -> None:
        self.note("gc")
        await self.engine.gc(threshold=self.rng.uniform(0.2, 1.0))

    async def op_evict(self) -> None:
        self.note("evict")
        self.engine.evict_all()

    async def op_fsck(self) -> None:
        self.note("fsck")
        report = await self.engine.check()
        self.fsck_clean(report, "fsck")

    def fsck_clean(self, report, what: str) -> None:
        if report.clean:
            return
        packs = [m.split("(its pack ", 1)[-1].split(")")[0] for m in report.missing]
        there = [p for p in packs if p in self.store.inner.objects]
        why = (
            f" ({len(there)} of the {len(report.missing)} 'missing' objects are in the "
            f"store: fsck trusted a listing that lags {self.knobs.list_lag}s)"
            if there
            else ""
        )
        raise BugFound(f"{what}: {report.as_dict()}{why}")

    def prune(self) -> None:
        pending = [s.start for s in self.snaps.values() if s.end is None]
        keep = min(pending, default=self.clock)
        for vol in self.vols.values():
            vol.prune(keep)

    # ------------------------------------------------------------------ crashes

    def abandon(self) -> None:
        """Drop the engine as a crash does: no flush, no clean mark, nothing saved."""
        engine, self.engine = self.engine, None
        for head in engine.heads.values():
            head.close()
        engine.catalog.close()

    async def restart(self, crash: bool) -> None:
        if crash:
            self.note("CRASH: restart")
            self.abandon()
            self.thaw()
        else:
            self.note("restart")
            failed = self.engine.catalog.failed  # then the close commits no dirty rows
            try:
                await self.engine.close()
            except SnapfsError as exc:
                self.expected(exc)
            self.engine = None
            for vol in self.vols.values():  # a clean close syncs the files
                if vol.name not in self.sync_failed and not failed:
                    vol.durable = self.tick()
        self.sync_failed.clear()
        self.engine = self.hook_catalog(
            await self.retry(
                Engine.open, self.store, self.cache_dir, self.config, False, self.files
            )
        )
        self.check("a restart")
        await self.recover()

    def thaw(self) -> None:
        """After a crash: what was not synced is lost or torn; the node is up again."""
        self.files.crash(torn=self.rng, prefix=self.cache_dir)
        self.crashed = False
        self.errors.muted = False

    async def switch_to_usurper(self) -> None:
        old = self.engine
        writer = old.fence.writer
        if self.crashed:  # it crashed while the second writer's open went on
            self.abandon()
            self.thaw()
        elif old.lease_lost is None:
            # It may not have tried to publish since: its next publish must fail.
            try:
                await old.sync()
            except SnapfsError as exc:
                self.expected(exc)
        doc = await publish.latest_catalog(self.store.inner)  # the oracle: no faults
        if doc is not None and doc.get("writer") == writer:
            raise BugFound("the displaced writer published after the takeover")
        self.note("the first writer is retired (its cache dir kept)")
        if self.engine is not None:
            self.abandon()
        self.engine, self.usurper = self.hook_catalog(self.usurper), None
        self.cache_dir = self.usurper_dir
        self.adopt_usurper_made()
        self.sync_failed.clear()
        self.check("the takeover")
        await self.recover(takeover=True)

    async def recover(self, takeover: bool = False) -> None:
        """After a restart: every volume the model knows of, and every block of it, holds
        what the model allows; temporary snapshots are gone, acknowledged ones are there."""
        for key, snap in list(self.snaps.items()):  # first: they need the history
            there = self.exists(*key)
            if snap.temporary:
                if there:
                    raise BugFound(f"temporary snapshot {key} survived a restart")
                del self.snaps[key]
            elif not there:
                needed = snap.published if takeover else snap.end is not None
                if needed and not snap.deleting:
                    raise BugFound(f"snapshot {key[0]}@{key[1]} is gone after a restart")
                del self.snaps[key]
            elif snap.end is None:  # the call was cut off, but the snapshot is there
                snap.end = self.tick()
                snap.fix_candidates(self.vols[snap.volume])
            snap.deleting = False
        for name, vol in list(self.vols.items()):
            if name not in self.engine.heads:
                if vol.acked and not vol.deleting:
                    raise BugFound(f"volume {name} is gone after a restart")
                del self.vols[name]
                continue
            vol.acked, vol.deleting = True, False
            self.resized(vol)
            if self.engine.heads[name].row.size != vol.size:
                raise BugFound(
                    f"volume {name} is {self.engine.heads[name].row.size} bytes after a "
                    f"restart, not {vol.size}"
                )
            for blk in self.blocks_to_check(vol):
                data = await self.retry(self.engine.read, name, blk * BS, vol.blen(blk))
                vol.after_crash(blk, data, self.tick(), takeover)
            vol.durable = self.tick()  # a crash publishes nothing: a takeover may go back
            if takeover:
                vol.published = vol.durable

    def blocks_to_check(self, vol: VolumeModel) -> list[int]:
        """Every block of a small volume; of a large sparse one, those ever written and a
        sample of the others (they read zeros)."""
        if len(vol.blocks) <= 64:
            return list(range(len(vol.blocks)))
        sample = self.rng.sample(range(len(vol.blocks)), 16)
        return sorted(vol.touched | set(sample) | {len(vol.blocks) - 1})

    # ------------------------------------------------------------------ the end

    def compare(self, vol: VolumeModel, got: bytes, when: str) -> None:
        bad = [b for b in range(len(vol.blocks)) if got[b * BS : (b + 1) * BS] != vol.current(b)]
        if bad:
            blk = bad[0]
            raise BugFound(
                f"{vol.name} differs from the model {when} in blocks {bad}: block {blk} reads "
                f"{_show(got[blk * BS : (blk + 1) * BS])}, the model says {_show(vol.current(blk))}"
            )

    async def resolve_cut_off(self) -> None:
        """The last incarnation ended by cancelling its calls wherever they were (a
        cancellation, not a crash): each may or may not have happened, in part."""
        for key, snap in list(self.snaps.items()):
            if snap.end is None or snap.deleting:
                if not self.exists(*key):
                    del self.snaps[key]
                    continue
                if snap.end is None:
                    snap.end = self.tick()
                    snap.fix_candidates(self.vols[snap.volume])
                snap.deleting = False
        for name, vol in list(self.vols.items()):
            if name not in self.engine.heads:
                del self.vols[name]
                continue
            vol.acked, vol.deleting = True, False
            self.resized(vol)
            cut = [
                b
                for b, vs in enumerate(vol.blocks)
                if b < vol.shared or any(v.end is None for v in vs)
            ]
            await self.settle(vol, cut, "a cancelled call")

    async def finish(self) -> None:
        self.note("finish")
        if self.sync_failed or self.engine.catalog.failed:  # they fail until reopened
            await self.restart(crash=False)
        await self.resolve_cut_off()
        await self.engine.sync()
        self.check("the final sync")
        self.engine.evict_all()
        for vol in self.vols.values():
            self.compare(vol, await self.engine.read(vol.name, 0, vol.size), "at the end")
        for snap in list(self.snaps.values()):
            await self.op_read_snapshot(snap)
        report = await self.engine.check()
        self.fsck_clean(report, "fsck at the end")
        await self.engine.close()
        self.engine = None
        # Store-only restore: a new machine with an empty cache dir.
        fresh = tempfile.mkdtemp(prefix="restore-", dir=self.root)
        self.engine = await Engine.open(self.store, fresh, self.config)
        for vol in self.vols.values():
            got = await self.engine.read(vol.name, 0, vol.size)
            self.compare(vol, got, "after a store-only restore")
        for snap in self.snaps.values():
            if snap.temporary:
                continue
            row = self.engine.snapshot_row(snap.volume, snap.name)
            data = await self.engine.read_snapshot(row, 0, row.size)
            if data != snap.content:
                raise BugFound(f"{snap.volume}@{snap.name} differs after a store-only restore")
        report = await self.engine.check()
        self.fsck_clean(report, "fsck after a store-only restore")
        await self.engine.close()
        self.engine = None


_SQL_READS = {
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_PRAGMA,
    sqlite3.SQLITE_RECURSIVE,
}


def _read_only_sql(action: int, arg1, _arg2, _db, _trigger) -> int:
    """The catalog of a crashed node: nothing commits any more (a rollback may run)."""
    if action in _SQL_READS:
        return sqlite3.SQLITE_OK
    if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT) and arg1 == "ROLLBACK":
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def inline_threads(monkeypatch) -> None:
    """Thread work runs on the event loop, so that a seed decides everything."""

    async def run_sync(fn, *args, **_kw):
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


def seeded_randomness(monkeypatch, seed: int) -> None:
    """trio's scheduler coin and the pack nonces come from the seed too."""
    import trio._core._run as trio_run

    import snapfs.chunks

    trio_run._r.seed(seed)
    # Sort each batch of runnable tasks by age before the seeded shuffle (trio does it once
    # hypothesis is imported, as under pytest): the order would otherwise follow sets of
    # tasks, by address, and the soak (no pytest) could not replay a pytest seed.
    monkeypatch.setattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)
    nonces = random.Random(seed ^ 0x5EED)

    class Secrets:
        @staticmethod
        def token_bytes(n: int) -> bytes:
            return nonces.randbytes(n)

    monkeypatch.setattr(snapfs.chunks, "secrets", Secrets)
    os.environ.setdefault("SNAPFS_LEASE_SECONDS", "60")


class CatalogIndex:
    """The blob → pack map of one published catalog: the index fragments it names (the
    highest fragment seq wins), read from the store; enough for a TreeReader."""

    def __init__(self, store, where: dict[bytes, tuple[bytes, int, int]]) -> None:
        self.store, self.where = store, where

    @classmethod
    async def load(cls, store, doc: dict) -> CatalogIndex:
        best: dict[bytes, tuple[int, bytes, int, int]] = {}
        for key in doc.get("fragments") or ():
            frag = codec.unpack(await store.get(key))
            seq = int(frag.get("seq", -1))
            for bkey, pid, off, length in frag["blobs"]:
                if bytes(bkey) not in best or seq >= best[bytes(bkey)][0]:
                    best[bytes(bkey)] = (seq, bytes(pid), off, length)
        return cls(store, {k: v[1:] for k, v in best.items()})

    async def get(self, kind: str, oid: bytes) -> bytes:
        loc = self.where.get(blob_key(kind, oid))
        if loc is None:
            raise ObjectNotFound(f"{kind}/{oid.hex()}: not in the catalog's index")
        pid, off, length = loc
        return (await self.store.get(pack_key(pid), off, length))[1:]


async def walk_catalog(store, doc: dict) -> list[str]:
    """What a published catalog references that the store lacks: its index fragments,
    its tree nodes, its chunks' packs."""
    try:
        index = await CatalogIndex.load(store, doc)
        expected = await expected_refs(TreeReader(index), publish.doc_roots(doc))
    except (ObjectNotFound, NotFound) as exc:
        return [f"{exc.__class__.__name__}: {exc}"]
    missing = []
    for key in expected:
        loc = index.where.get(key)
        if loc is None:
            missing.append(f"{key_to_store_key(key)}: not in the catalog's index")
        elif pack_key(loc[0]) not in store.objects:
            missing.append(f"{key_to_store_key(key)}: its pack {pack_key(loc[0])} is gone")
    return missing
