"""References: snapshot trees kept alive outside any volume (docs/design.md, "References").

A reference is a row of the catalog's `snaprefs` table. It holds one refcount on its root,
exactly as a snapshot does, so a volume whose snapshots were all unmanaged can be deleted
and the trees stay; it is published in the catalog document, restored from it, and its
nodes are roots for fsck, restore and the read-only auditor (`ReferenceRow.held`).

States:
    inbound     being copied in by `snapfs replicate` (snapfs/volume/replicate.py): the
                root is named but not yet all in the store, so the reference holds one
                count on each complete subtree copied so far (`pins`) instead of its root
    available   holds its root; `snapshot manage` may adopt it into a volume

`References` (a component the Engine holds)
    owns: the reference rows and the moves of a root's count between a snapshot and a
          reference (unmanage, manage: the count moves, its value does not change), the
          drop of a deleted reference's count, and the inbound protocol's transactions
          (`begin_inbound`, `commit_inbound`, `finish_inbound`).
    does not own: the refcounts (`Refcounts`), what an inbound copy stages (the
          replicator does, through the engine's ChunkStore), publishing (the fence).

Invariants (`check_references`, which `assert_invariants` and fsck use): a reference is
inbound or available, only an inbound one has pins (whole node ids), and every node it
holds has a refcount (a writer's).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from snapfs.access import check_owner
from snapfs.errors import AlreadyExists, Busy, InvalidArgument, InvalidReference
from snapfs.units import check_name
from snapfs.volume.catalog import Catalog, ReferenceRow, SnapshotRow, check_guid
from snapfs.volume.check import K_NODE, key_to_store_key
from snapfs.volume.refcounts import Refcounts

if TYPE_CHECKING:
    from snapfs.volume.collector import Collector
    from snapfs.volume.fence import Fence
    from snapfs.volume.flusher import Committer
    from snapfs.volume.volumes import Volumes

REFERENCE_ID_CHARS = 16  # hex digits of a reference id


def new_reference_id() -> str:
    return secrets.token_hex(REFERENCE_ID_CHARS // 2)


def check_reference_id(text: str) -> str:
    """A reference id a user gives: 16 hex digits (InvalidReference otherwise)."""
    rid = str(text).lower()
    if len(rid) != REFERENCE_ID_CHARS or any(c not in "0123456789abcdef" for c in rid):
        raise InvalidReference(f"invalid reference {str(text)[:40]!r}: 16 hex digits")
    return rid


def check_references(rows: list[ReferenceRow], counted: Callable[[bytes], int] | None) -> list[str]:
    """The references' invariants, as findings naming the reference: inbound or available,
    pins (whole node ids) only while inbound, and (`counted`: a writer's refcount of a key)
    a count on every node it holds."""
    found = []
    for ref in rows:
        what = f"reference {ref.id} ({ref.name})"
        if ref.state not in ("inbound", "available"):
            found.append(f"{what}: in state {ref.state!r}")
        elif len(ref.pins) % 32:
            found.append(f"{what}: pins of {len(ref.pins)} bytes, not whole node ids")
        elif ref.state == "available" and ref.pins:
            found.append(f"{what}: available, yet it holds pins")
        else:
            found += [
                f"{what}: holds {key_to_store_key(K_NODE + node)}, which has no refcount"
                for node in ref.held()
                if counted is not None and counted(K_NODE + node) < 1
            ]
    return found


class References:
    """Unmanage, manage, list and delete references; the target side of a replicate.

    owns: the reference rows (through the catalog) and the counts they hold.
    does not own: the snapshots it turns into references and back (the catalog's rows,
    the engine's opens), the refcounts (`Refcounts`), publishing (`Committer`, `Fence`),
    what a dropped reference frees (`Collector`)."""

    def __init__(
        self,
        vols: Volumes,
        catalog: Catalog,
        refs: Refcounts,
        fence: Fence,
        commit_lock: trio.Lock,
        committer: Committer,
        collector: Collector,
    ) -> None:
        self.vols = vols  # the volumes and snapshots a reference comes from or goes to
        self.catalog = catalog
        self.refs = refs
        self.fence = fence
        self.store = fence.store
        self.chunks = committer.chunks
        self.commit_lock = commit_lock
        self.committer = committer
        self.collector = collector

    def references(self) -> list[ReferenceRow]:
        return self.catalog.references()

    def reference(self, rid: str) -> ReferenceRow:
        """The reference `rid` of this store; InvalidReference when there is none."""
        row = self.catalog.reference(check_reference_id(rid))
        if row is None:
            raise InvalidReference(f"reference {rid} is not a reference in {self.store.url}")
        return row

    async def unmanage(self, volume: str, name: str, uid: int = 0) -> ReferenceRow:
        """Forget snapshot volume@name in the catalog, keeping its tree under a new
        reference: in one transaction the row goes and its root's count moves to the
        reference. Only available, non-temporary snapshots that nobody has open."""
        self.fence.writable()
        snap = self.vols.snapshot_row(volume, name)
        check_owner(snap.owner, uid, f"snapshot {volume}@{name}")
        async with self.commit_lock:
            snap = self.vols.snapshot_row(volume, name)
            self._check_unmanageable(snap)
            ref = ReferenceRow(
                new_reference_id(),
                snap.name,
                "",
                "available",
                snap.root,
                snap.root_level,
                snap.size,
                snap.block_size,
                f"{volume}@{name}",
                snap.guid,
                snap.owner,
                snap.created,
                b"",
            )
            with self.catalog.transaction():  # the root's count moves: same value
                self.catalog.add_reference(ref)
                self.catalog.delete_snapshot(snap.id)
                self.fence.changed()
            await self.committer.publish()
        return ref

    def _check_unmanageable(self, snap: SnapshotRow) -> None:
        what = f"snapshot {snap.volume}@{snap.name}"
        if snap.temporary:
            raise InvalidArgument(f"{what} is temporary: it cannot be unmanaged")
        if snap.state != "available":
            raise Busy(f"{what} is {snap.state}: wait until it is uploaded (snapfs sync)")
        if self.vols.snap_opens.get(snap.id):
            raise Busy(f"{what} is open")

    async def manage(
        self, volume: str, rid: str, name: str | None = None, uid: int = 0
    ) -> SnapshotRow:
        """Adopt available reference `rid` as snapshot volume@name (name: the reference's):
        the reference's count moves to the snapshot, which keeps the reference's guid.
        NotFound without the volume; InvalidReference when `rid` is no available
        reference here, or its block size differs or it is larger than the volume."""
        self.fence.writable()
        head = self.vols.head(volume)
        check_owner(head.row.owner, uid, f"volume {volume!r}")
        async with self.commit_lock:
            ref = self._adoptable(rid, head.row.size, head.row.block_size, uid)
            name = check_name(name or ref.name, "snapshot name")
            if self.catalog.snapshot(volume, name) is not None:
                raise AlreadyExists(f"snapshot {volume}@{name} already exists (--name NAME)")
            if self.catalog.snapshot_by_guid(volume, ref.guid) is not None:
                raise AlreadyExists(f"volume {volume!r} has a snapshot with guid {ref.guid}")
            with self.catalog.transaction():  # the root's count moves: same value
                self.catalog.add_snapshot(
                    volume,
                    name,
                    max(head.row.epoch - 1, 0),  # no cut of this volume: ordered last
                    "available",
                    ref.root,
                    ref.root_level,
                    ref.size,
                    ref.block_size,
                    False,
                    ref.owner,
                    ref.created,
                    ref.guid,
                )
                self.catalog.delete_reference(ref.id)
                self.fence.changed()
            await self.committer.publish()
        snap = self.catalog.snapshot(volume, name)
        assert snap is not None
        return snap

    def _adoptable(self, rid: str, size: int, block_size: int, uid: int) -> ReferenceRow:
        ref = self.reference(rid)
        check_owner(ref.owner, uid, f"reference {ref.id}")
        if ref.state != "available":
            raise InvalidReference(f"reference {ref.id} is {ref.state}: replicate it again")
        if ref.block_size != block_size:
            raise InvalidReference(
                f"reference {ref.id} has block size {ref.block_size}, the volume {block_size}"
            )
        if ref.size > size:
            raise InvalidReference(
                f"reference {ref.id} is {ref.size} bytes, larger than the volume ({size})"
            )
        return ref

    async def delete_reference(self, rid: str, uid: int = 0) -> None:
        """Drop reference `rid` and the counts it holds: frees what nothing else needs."""
        self.fence.writable()
        check_owner(self.reference(rid).owner, uid, f"reference {rid}")
        async with self.commit_lock:
            ref = self.reference(rid)
            deltas: dict[bytes, int] = {}
            for node in ref.held():
                self.refs.plan_drop(deltas, K_NODE + node)
            with self.catalog.transaction():
                self.refs.apply(deltas)
                self.catalog.delete_reference(ref.id)
                self.fence.changed()
            await self.committer.publish()
            await self.collector.collect()

    # ------------------------------------------------------------------ inbound (replicate)

    async def begin_inbound(
        self, snap: SnapshotRow, name: str, description: str, source: str, unique: bool = False
    ) -> ReferenceRow:
        """The reference a replicate of `snap` fills: an existing one of the same guid and
        root (inbound: resumed; available: already complete), else a new inbound one,
        published before anything is copied. Holds nothing yet (a taken-over one: its pins).

        `unique` (a backup: names are unique in a bank): another reference named `name` is
        refused (AlreadyExists) when available; an inbound one (a backup that failed or was
        killed) is taken over: it is retargeted to `snap` and keeps its pins, which the
        walk takes over where the trees agree, so what it copied is not sent again."""
        self.fence.writable()
        check_name(name, "reference name")
        check_guid(snap.guid)
        async with self.commit_lock:
            for ref in self.catalog.references():
                if (ref.guid, ref.root) == (snap.guid, snap.root):
                    return ref
            named = [r for r in self.catalog.references() if r.name == name] if unique else []
            if any(r.state == "available" for r in named):
                raise AlreadyExists(f"a backup named {name!r} already exists in {self.store.url}")
            ref = self._inbound_row(snap, name, description, source, named)
            with self.catalog.transaction():
                if named:
                    self.catalog.delete_reference(ref.id)
                self.catalog.add_reference(ref)
                self.fence.changed()
            await self.committer.publish()
        return ref

    def _inbound_row(
        self, snap: SnapshotRow, name: str, description: str, source: str, old: list
    ) -> ReferenceRow:
        """A new inbound reference for `snap`; one taken over (`old`) keeps its id and pins."""
        rid, pins = (old[0].id, old[0].pins) if old else (new_reference_id(), b"")
        return ReferenceRow(
            rid,
            name,
            description,
            "inbound",
            snap.root,
            snap.root_level,
            snap.size,
            snap.block_size,
            source,
            snap.guid,
            snap.owner,
            time.time(),
            pins,
        )

    async def commit_inbound(
        self,
        rid: str,
        deltas: dict[bytes, int],
        sizes: dict[bytes, int],
        pins: list[bytes],
        locked: bool = False,
    ) -> None:
        """One batch of an inbound copy: make what was staged durable, then in one
        transaction index it, apply its counts and record the subtrees the reference now
        holds; publish. A crash before the transaction leaves orphan packs (swept).
        `locked`: the caller holds commit_lock (a copy into a writer that serves a mount
        holds it for the whole batch, see volume/replicate.py)."""
        self.fence.writable()
        if locked:
            await self._commit_inbound(rid, deltas, sizes, pins)
            return
        async with self.commit_lock:
            await self._commit_inbound(rid, deltas, sizes, pins)

    async def _commit_inbound(self, rid, deltas, sizes, pins: list[bytes]) -> None:
        await self.committer.flush_staged(check_fence=True)
        with self.catalog.transaction():
            self.chunks.record()
            self.refs.apply(deltas, sizes)
            self.catalog.update_reference(rid, pins=b"".join(pins))
            self.fence.changed()
        await self.committer.publish()

    async def finish_inbound(self, rid: str, stale: list[bytes]) -> ReferenceRow:
        """The copy is complete: the reference holds its root (its last pin) and becomes
        available; pins left from an earlier run that the walk did not meet again
        (`stale`: their subtrees were complete by other means) are dropped."""
        async with self.commit_lock:
            ref = self.reference(rid)
            want = [] if ref.root is None else [ref.root]
            assert sorted(ref.held()) == sorted(want + stale), f"reference {rid}: pins differ"
            deltas: dict[bytes, int] = {}
            for node in stale:
                self.refs.plan_drop(deltas, K_NODE + node)
            with self.catalog.transaction():
                self.refs.apply(deltas)
                self.catalog.update_reference(rid, state="available", pins=b"")
                self.fence.changed()
            await self.committer.publish()
            await self.collector.collect()
        return self.reference(rid)
