"""The fence: the one owner of this writer's right to publish catalogs and to delete from
the store (docs/design.md, "Fencing: one writer per store").

State it owns (no other code changes it):

    writer      this cache dir's token (meta `writer`, made once), written into every
                catalog it publishes: how it recognises its own catalog after a lost reply
                or a crash (by the token, not by the bytes: a retry builds a new document)
    store_seq   the store sequence of the last catalog this writer published or adopted
                (meta `store_seq`; a read-only engine: the catalog it shows)
    covers      the local change counter that catalog covers (meta `published`; the local
                counter itself is meta `seq`, bumped by every committed change)
    publishing  the store seq it is about to put (meta `publishing`), durable before the PUT
    fenced      whether this writer has published a catalog since it opened
    lost        why this writer lost the store, or None

The rules:

- Catalog sequences are contiguous: a publish is `put_new(catalog/<store_seq + 1>)`. A writer
  that opens first publishes at the newest seq + 1 (found by probing, not by a listing that
  may lag): its *fence*. From then on a writer it displaced can never publish again, since
  its next seq is taken; its publish finds another writer's token there, and it has lost.
  A fresh cache dir fences before it restores (`claim`: the newest catalog again, as
  newest + 1), then restores the catalog just before its fence: a writer that keeps
  publishing cannot outrun it.
- A seq is free again once its catalog was deleted as old (3 behind, after the grace): a
  writer paused for longer than that succeeds with its `put_new`. So after every publish,
  and before every delete, the fence looks for a newer catalog (a LIST, then HEADs past
  it); the 3 newest are never deleted, so a writer that displaced this one is found.
- Nothing is deleted from the store before this writer has published its fence, nor after
  it lost the store, nor within `grace` seconds (this host's clock) after the last catalog or
  index that needed the object was replaced: read-only mounts and reads in flight finish
  first. Every deletion of the engine goes through `delete` (store objects queued by `queue`,
  deleted by `delete_due`; orphans by `sweep`).
"""

import functools
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import NoReturn

import trio

from snapfs import codec
from snapfs.chunks import fragment_key, pack_key
from snapfs.errors import AlreadyExists, Busy, CatalogFailed, ReadOnly, StoreError
from snapfs.store.base import Store
from snapfs.tasks import run_all
from snapfs.volume import lease, publish
from snapfs.volume.catalog import BLOB_KINDS, Catalog
from snapfs.volume.check import K_CATALOG, K_FRAG, K_PACK, key_to_store_key

log = logging.getLogger("snapfs.fence")
CLAIM_TRIES = 10  # a fresh cache dir's fence against a writer that keeps publishing


class FenceConflict(Busy):
    """Another writer holds the catalog seq this writer needed when it opened."""

    def __init__(self, seq: int, doc: dict | None) -> None:
        super().__init__(f"catalog {seq} was published by another writer")
        self.seq = seq
        self.doc = doc


def store_key(key: bytes) -> str:
    """The store object a garbage row names."""
    kind, rest = key[:1], key[1:]
    if kind == K_PACK:
        return pack_key(rest)
    if kind == K_FRAG:
        return fragment_key(rest)
    if kind == K_CATALOG:
        return publish.catalog_key(int.from_bytes(rest, "big"))
    raise ValueError(f"not a store object: {key[:1]!r}")


STORE_KINDS = (K_PACK, K_FRAG, K_CATALOG)


def catalog_garbage(seq: int) -> bytes:
    return K_CATALOG + seq.to_bytes(8, "big")


class Fence:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        read_only: bool,
        grace: float,
        clock: Callable[[], float],
        concurrency: int = 8,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.read_only = read_only
        self.grace = grace
        self.clock = clock
        self.concurrency = concurrency
        self.fenced = False
        self.lost: str | None = None
        self.deleted = 0  # store objects this engine deleted
        self.lease: lease.Lease | None = None  # the daemon's advisory lease (hold_lease)

    # ------------------------------------------------------------------ state

    @property
    def writer(self) -> str:
        token = self.catalog.get_meta("writer")
        if token is None:
            token = uuid.uuid4().hex
            with self.catalog.transaction():
                self.catalog.set_meta("writer", token)
        return str(token)

    @property
    def store_seq(self) -> int:
        seq = self.catalog.get_meta("store_seq")
        if seq is None:  # a cache dir of the version that published catalog/<local seq>
            seq = self.catalog.get_meta("published", 0)
        return int(seq)

    @property
    def covers(self) -> int:
        return int(self.catalog.get_meta("published", 0))

    def changes(self) -> int:
        """The local change counter: every change a catalog must carry counts one."""
        return int(self.catalog.get_meta("seq", 0))

    def changed(self) -> None:
        """Inside the caller's transaction: one more change for the next catalog to carry
        (the fence alone writes the counter; `publish` compares it with what is out)."""
        self.catalog.set_meta("seq", self.changes() + 1)

    def reset_changes(self) -> None:
        """Inside a restore's transaction: the catalog just loaded is all there is."""
        self.catalog.set_meta("seq", 0)

    def up_to_date(self) -> bool:
        """This writer's fence is out and its newest catalog covers every local change."""
        return self.fenced and self.lost is None and self.covers == self.changes()

    def writable(self) -> None:
        """Raise ReadOnly on a read-only mount or once this writer lost the store, and
        CatalogFailed once the local catalog failed: nothing may change then."""
        if self.read_only:
            raise ReadOnly("this mount is read-only")
        if self.lost:
            raise ReadOnly(f"this writer lost the store ({self.lost}): remount")
        if self.catalog.failed:
            raise CatalogFailed(f"the local catalog failed ({self.catalog.failed}): remount")

    def check(self) -> list[str]:
        """The fence's own invariants, as findings (a writer's; a plain def): the newest
        published catalog covers no change that was not made (`covers` <= the change
        counter), and a blob queued as garbage has no time (it leaves the index once a
        catalog without it is out; only store objects wait for a grace period)."""
        found = []
        covers, changes = self.covers, self.changes()
        if covers > changes:
            found.append(f"fence: the published catalog covers change {covers}, beyond {changes}")
        found += [
            f"{key_to_store_key(key)}: a blob queued as garbage with a time (only store "
            "objects wait for a grace period)"
            for key in self.catalog.timed_garbage(BLOB_KINDS)
        ]
        return found

    def statistics(self) -> dict:
        return {
            "catalog_seq": self.changes(),
            "published_seq": self.covers,
            "lease_lost": self.lost,
        }

    def mark_lost(self, reason: str) -> None:
        if self.lost is None:
            log.error("lost the store: %s; keeping the local cache, publishing nothing", reason)
            self.lost = reason

    def record_loaded(self, seq: int) -> None:
        """Inside the caller's transaction: a read-only engine's cache now holds catalog
        `seq` of the store (restored or refreshed). Nothing local is unpublished. (A
        writer's restore keeps the seq of the fence it claimed first.)"""
        self.catalog.set_meta("store_seq", seq)
        self.catalog.set_meta("published", self.changes())

    # ------------------------------------------------------------------ publishing

    async def reconcile(self) -> None:
        """At the open of a cache dir that published before: the newest catalog in the store
        must be ours. A newer one than we recorded that carries our token (and the seq we
        had said we were about to publish) is our own publish whose record a crash or a
        lost reply prevented: adopt it. Any other raises FenceConflict."""
        mine = self.store_seq
        newest = await publish.newest_seq(self.store, mine)
        if newest == mine:
            return
        doc = await publish.read_catalog(self.store, newest)
        intent = int(self.catalog.get_meta("publishing", 0) or 0)
        if doc is not None and doc.get("writer") == self.writer and newest <= intent:
            log.info("catalog %d is this writer's own, published before a crash: adopted", newest)
            with self.catalog.transaction():
                self.catalog.set_meta("store_seq", newest)
                self.catalog.set_meta("published", min(int(doc["changes"]), self.changes()))
            return
        raise FenceConflict(newest, doc)

    async def publish(self, build: Callable[[int, str, int], dict]) -> None:
        """Publish the local state as catalog store_seq + 1, unless this writer's fence is
        out and its newest catalog covers every change. `build(seq, writer, changes)` makes
        the document; the caller made everything it references durable. Idempotent: a seq
        that holds our own token is our earlier publish (its reply was lost) and counts as
        published; if it covered fewer changes, the next seq carries the rest. Another
        writer's token there, or a newer catalog in the store after the PUT (our seq was
        free again: see `_newer_than`): before the fence, FenceConflict; after it, this
        writer lost the store (ReadOnly)."""
        if self.read_only:
            return
        changes = self.changes()
        if self.fenced and self.covers == changes:
            return
        if self.lost:
            raise ReadOnly(f"not publishing: {self.lost}")
        writer = self.writer
        seq = self.store_seq + 1
        while True:
            with self.catalog.transaction():  # durable before the PUT: a crash after it
                self.catalog.set_meta("publishing", seq)  # lets the next open adopt it
            try:
                await self.store.put_new(
                    publish.catalog_key(seq), codec.pack(build(seq, writer, changes))
                )
                covered = changes
            except AlreadyExists:
                other = await publish.read_catalog(self.store, seq)
                if other is None:
                    raise StoreError(f"catalog {seq} exists but cannot be read") from None
                if other.get("writer") != writer:
                    self._displaced(seq, other, "publishing")
                covered = min(int(other.get("changes", 0)), changes)
                log.info("catalog %d is our own earlier publish (its reply was lost)", seq)
            await self.store.barrier()
            newer = await self._newer_than(seq)
            if newer is not None:  # our seq was free again: deleted by a newer writer
                self._displaced(*newer, "publishing")
            await self._published(seq, covered)
            if covered == changes:
                return
            seq += 1

    async def claim(self, tries: int = CLAIM_TRIES) -> dict | None:
        """The fence of a fresh cache dir, before it restores anything: the newest catalog
        published again as newest + 1 with our token. Returns the catalog it copied (None
        in a store without one): the one to restore, since no writer this fence displaced
        can publish after it. When another writer takes that seq first, try again from
        its catalog: a GET and a PUT, not a whole restore. Busy after `tries`."""
        if self.read_only:
            raise ReadOnly("a read-only engine never fences")
        writer = self.writer
        for _attempt in range(tries):
            newest = await publish.newest_seq(self.store)
            doc = await publish.read_catalog(self.store, newest) if newest else None
            if newest and doc is None:
                continue  # deleted since the probe: a newer one is out
            seq = newest + 1
            with self.catalog.transaction():
                self.catalog.set_meta("publishing", seq)
            try:
                await self.store.put_new(
                    publish.catalog_key(seq), codec.pack(publish.fence_doc(doc, seq, writer))
                )
            except AlreadyExists:
                log.info("catalog %d was published while this writer fenced: again", seq)
                continue
            await self.store.barrier()
            if await self._newer_than(seq) is not None:
                continue  # a seq freed by deletion, under a listing that lagged: again
            await self._published(seq, self.changes())
            return doc
        raise Busy(f"{self.store.url}: another writer keeps publishing; is it still running?")

    async def _published(self, seq: int, covered: int) -> None:
        """Catalog `seq`, covering local change `covered`, is ours and durable: record it,
        queue the catalog that falls out of the newest 3; after the fence, retire older
        ones."""
        first = not self.fenced
        with self.catalog.transaction():
            self.catalog.set_meta("store_seq", seq)
            self.catalog.set_meta("published", covered)
            if seq > publish.KEEP_CATALOGS:
                self.queue([catalog_garbage(seq - publish.KEEP_CATALOGS)])
        self.fenced = True
        if first:
            await self._retire_old_catalogs(seq)

    async def _newer_than(self, seq: int) -> tuple[int, dict | None] | None:
        """The newest catalog (seq, document) when it is newer than `seq`, else None: one
        LIST, then HEADs past it. A catalog deleted as old leaves its seq free for a
        `put_new`: a writer paused for longer than the grace can publish there. The
        catalogs of the writer that displaced it are newer, and the 3 newest are never
        deleted, so this finds them."""
        newest = await publish.newest_seq(self.store, seq)
        if newest == seq:
            return None
        return newest, await publish.read_catalog(self.store, newest)

    async def check_current(self) -> None:
        """Before a commit marks blocks clean: has another writer fenced after our newest
        catalog? (one HEAD of the next seq; our own earlier publish there is fine). Then
        this writer lost the store: ReadOnly, and its dirty blocks stay dirty (for the
        message at unmount, and for recovery) instead of going clean under a catalog it
        can never publish."""
        seq = self.store_seq + 1
        if self.fenced and await self.store.head(publish.catalog_key(seq)) is not None:
            doc = await publish.read_catalog(self.store, seq)
            if doc is None or doc.get("writer") != self.writer:
                self._displaced(seq, doc, "committing")

    async def confirm_current(self, doing: str) -> None:
        """Nobody published after our newest catalog: a LIST, then HEADs past it (a HEAD
        of the next seq would miss a newer writer whose catalogs from there on were
        deleted as old). Else this writer lost the store: ReadOnly, saying it was `doing`."""
        newer = await self._newer_than(self.store_seq)
        if newer is not None:
            seq, doc = newer
            if doc is not None and doc.get("writer") == self.writer and seq == self.store_seq + 1:
                raise StoreError(f"catalog {seq} is ours but not recorded: publish first")
            self._displaced(seq, doc, doing)

    def _displaced(self, seq: int, doc: dict | None, doing: str) -> NoReturn:
        """Catalog `seq` is another writer's: before our fence, FenceConflict; after it,
        this writer lost the store (ReadOnly)."""
        if not self.fenced:
            raise FenceConflict(seq, doc)
        self.mark_lost(f"catalog {seq} was published by another writer")
        raise ReadOnly(f"not {doing}: {self.lost}")

    async def _retire_old_catalogs(self, seq: int) -> None:
        """After the fence: queue every catalog more than KEEP_CATALOGS behind (those of
        displaced writers, or left by a crash). Best effort: a failed listing is retried at
        the next open, and the publish stands."""
        try:
            old = [
                s for s in await publish.listed_seqs(self.store) if s <= seq - publish.KEEP_CATALOGS
            ]
        except StoreError as exc:
            log.warning("could not list old catalogs: %s", exc)
            return
        with self.catalog.transaction():
            self.queue(catalog_garbage(s) for s in old)

    # ------------------------------------------------------------------ the lease

    def hold_lease(self, held: lease.Lease | None) -> None:
        """The advisory lease the daemon took before it opened this writer (None: a
        read-only mount, or tests): renewed by `keep_lease`, given back by
        `release_lease`."""
        self.lease = held

    async def keep_lease(
        self, on_lost: Callable[[str], None], task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Background task: renew the lease; `on_lost(reason)` once another writer holds
        it or it expired while the store was out of reach."""
        if self.lease is None:
            task_status.started()
            return
        await lease.keep_renewed(self.store, self.lease, on_lost, task_status=task_status)

    async def release_lease(self) -> None:
        """Give the lease back (a clean unmount of a writer that did not lose the store)."""
        held, self.lease = self.lease, None
        if held is not None and self.lost is None:
            await lease.release(self.store, held)

    # ------------------------------------------------------------------ deleting

    def may_delete(self) -> bool:
        return not self.read_only and self.fenced and self.lost is None

    def check_may_delete(self) -> None:
        if self.read_only:
            raise ReadOnly("a read-only mount deletes nothing from the store")
        if self.lost:
            raise ReadOnly(f"not deleting: {self.lost}")
        if not self.fenced:
            raise ReadOnly("not deleting before this writer has published its fence catalog")

    def queue(self, keys: Iterable[bytes], published: bool = True) -> None:
        """Inside the caller's transaction: store objects (garbage keys of kind p, i, g)
        that no catalog or index of this writer needs from now on. Each goes a grace
        period after the first catalog without it is out: now, if the change that drops
        it is `published` already; else its time is set when every change is
        (`published_now`): a reader that took the catalog before may read on for that
        long."""
        self.catalog.add_garbage(keys, since=self.clock() if published else None)

    def published_now(self) -> None:
        """Inside a transaction, with every local change published: the grace periods of
        the store objects queued before their change was published start now."""
        self.catalog.stamp_garbage(STORE_KINDS, self.clock())

    async def delete(self, keys: list[str]) -> None:
        """Delete store objects now, if this writer may. Before that, it checks that
        nobody published after our newest catalog (a displaced writer that has not noticed
        yet learns it here, before it deletes anything), with a LIST: a HEAD of the next
        seq would miss a newer writer whose catalogs from there on were deleted as old."""
        self.check_may_delete()
        if not keys:
            return
        await self.confirm_current("deleting")
        await run_all(
            [functools.partial(self.store.delete, k) for k in keys], max(1, self.concurrency)
        )
        self.deleted += len(keys)

    async def delete_due(self) -> int:
        """Delete the queued store objects whose grace period is over."""
        if not self.may_delete():
            return 0
        due = self.catalog.due_garbage(self.clock() - self.grace)
        if due:
            await self.delete([store_key(k) for k in due])
            with self.catalog.transaction():
                self.catalog.forget_garbage(due)
        return len(due)

    def next_due(self) -> float | None:
        """When the next queued object's grace period ends (this host's clock), or None."""
        since = self.catalog.next_garbage_time()
        return None if since is None else since + self.grace

    async def sweep(self, orphans: set[str]) -> tuple[int, float | None]:
        """Orphans (store objects no catalog or index of ours knows, listed just now): those
        seen orphaned for a grace period go; the others are remembered with the time first
        seen. Returns (deleted, when the next one is due or None)."""
        self.check_may_delete()
        now = self.clock()
        known = self.catalog.orphans()
        seen = {key: known.get(key, now) for key in orphans}
        due = sorted(k for k, t in seen.items() if t <= now - self.grace)
        await self.delete(due)
        for key in due:
            del seen[key]
        with self.catalog.transaction():
            self.catalog.set_orphans(seen)
        return len(due), (min(seen.values()) + self.grace if seen else None)

    # ------------------------------------------------------------------ checks

    def assert_invariants(self) -> None:
        cat = self.catalog
        assert self.covers <= self.changes(), "a catalog covers changes never made"
        intent = cat.get_meta("publishing")
        if intent is not None:
            assert int(intent) <= self.store_seq + 1, "publishing more than one seq ahead"
        if self.read_only:
            assert not self.fenced, "a read-only engine never fences"
        if self.fenced:
            assert cat.get_meta("writer") is not None, "fenced without a writer token"
            assert cat.get_meta("store_seq") is not None, "fenced without a store seq"
        for key, since in cat.db.execute("SELECT key, since FROM garbage"):
            if key[:1] in BLOB_KINDS:
                assert since is None, f"blob garbage {key.hex()} has a deletion time"
            else:  # no time yet: the change that queued it is not published yet
                store_key(key)
        assert not (self.lost and self.may_delete())
