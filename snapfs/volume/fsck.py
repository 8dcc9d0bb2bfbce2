"""The checks: `check_state` (every local component's own `check()`), `assert_invariants`
and fsck (`check`: those, plus the walk of every root against the refcounts and the
store)."""

from __future__ import annotations

import logging

import trio
import trio.lowlevel

from snapfs.chunks import CHUNK, ChunkStore, pack_key
from snapfs.errors import (
    IntegrityError,
    ObjectNotFound,
)
from snapfs.tree import TreeReader
from snapfs.volume.cache import CacheSpace
from snapfs.volume.catalog import Catalog
from snapfs.volume.check import (
    K_CHUNK,
    K_NODE,
    K_PACK,
    CheckReport,
    Root,
    Walk,
    key_to_store_key,
)
from snapfs.volume.datapath import DataPath
from snapfs.volume.fence import Fence
from snapfs.volume.head import Head
from snapfs.volume.refcounts import Refcounts
from snapfs.volume.references import check_references

log = logging.getLogger("snapfs.engine")


class Checker:
    """fsck and the invariants: every component's own `check()` (`check_state`), then one
    walk of every root against the refcounts and the store (`check`).

    owns: nothing; it reads every component's state, under the commit lock for the walk."""

    def __init__(
        self,
        heads: dict[str, Head],
        catalog: Catalog,
        chunks: ChunkStore,
        refs: Refcounts,
        fence: Fence,
        space: CacheSpace,
        data: DataPath,
        commit_lock: trio.Lock,
    ) -> None:
        self.heads = heads
        self.catalog = catalog
        self.chunks = chunks
        self.tree = refs.tree
        self.refs = refs
        self.fence = fence
        self.store = fence.store
        self.read_only = fence.read_only
        self.space = space
        self.data = data
        self.commit_lock = commit_lock
        self.offline = False  # a read-only engine in a temporary cache dir (fsck STORE_URL)

    def check_state(self) -> list[str]:
        """Every local component's own check, as findings (one line each, naming the
        object): the snapshot chunk cache; the block cache's totals and clean blocks
        (`CacheSpace`); per volume its dirty records against its `dirty` rows
        (`VolumeCache`), its pending snapshots and its copy-on-write saves (`CowSaves`);
        the refcount rows (`Refcounts`, a writer's); the fence's counter and garbage
        times (`Fence`, a writer's); the references (states, pins, their nodes counted).
        A plain def: the state of one instant."""
        heads = list(self.heads.values())
        saved = sum(h.saves.count() * h.bs for h in heads)
        found = self.data.check()
        found += self.space.check({h.row.id for h in heads}, saved)
        counted = None if self.read_only else self.refs.count
        if counted is not None:
            found += self.refs.check()
            found += self.fence.check()
            found += self._check_queue()
        found += check_references(self.catalog.references(), counted)
        for head in heads:
            found += self._check_head(head)
        return found

    def _check_queue(self) -> list[str]:
        """No root is on the queue of dropped nodes (a queued node has count 0: nothing
        may hold it)."""
        queued = set(self.refs.queued())
        return [
            f"{key_to_store_key(K_NODE + root.node)}: the root of {root.name}, and queued"
            for root in self._roots()
            if root.node is not None and K_NODE + root.node in queued
        ]

    def _check_head(self, head: Head) -> list[str]:
        name, epoch = head.row.name, head.row.epoch
        epochs = [s.epoch for s in head.pending]
        found = [
            f"snapshot {name}@{snap.name}: pending in epoch {snap.epoch}, not before the "
            f"volume's {epoch}"
            for snap in head.pending
            if snap.epoch >= epoch
        ]
        if epochs != sorted(epochs):
            found.append(f"volume {name}: pending snapshots out of order (epochs {epochs})")
        found += head.blocks.check(self.catalog.dirty(head.row.id), head.gen)
        found += head.saves.check(epochs, head.nblocks, name)
        return found

    def assert_invariants(self) -> None:
        """Every local component's check (`check_state`) finds nothing: tests call it after
        every step (it reads the local catalog, so it is not for the hot path). They hold
        at every await, not only between calls."""
        found = self.check_state()
        assert not found, "; ".join(found[:5])

    async def check(
        self, repair: bool = False, verify_store: bool = True, verify_data: bool = False
    ) -> CheckReport:
        """fsck: the components' own checks (`check_state`, on a writer or a read-only
        mount), then one walk of every root's tree: every refcount recomputed and compared
        (a writer's), every object a root references in the index and its pack in the
        store, and with `verify_data` every chunk read and verified against its digest. A
        node the walk cannot read is a finding, and the walk goes on with the rest. Each
        finding names the object and the first root that needs it. With repair, write the
        recomputed counts (not when a node could not be read: its subtree is uncounted)
        and delete orphan packs."""
        async with self.commit_lock:
            report = CheckReport(not_checked=self._not_checked())
            if not self.offline:
                report.state = self.check_state()
            roots = self._roots() + self._queue_roots()
            walk = await Walk(self.tree, strict=False).run(roots)
            expected = walk.refs()
            report.objects = len(expected)
            found = _Found(walk)
            if not self.read_only:
                self._compare_counts(walk, found, report)
            if verify_store:
                report.orphan_packs = await self._check_store(expected, found, repair)
                if repair and report.orphan_packs:
                    report.repaired = True
            if verify_data:
                await self._verify_data(expected, found)
            await found.name_roots(self.tree, roots, report)
            if repair and report.wrong_counts and not walk.unreadable:
                with self.catalog.transaction():
                    self.refs.replace(expected)
                    self.chunks.recount_live()
                report.repaired = True
            return report

    def _queue_roots(self) -> list[Root]:
        """The queue of dropped nodes (a writer's), as roots: until expanded, a queued node
        still holds a count on each child, and its own count is 0 (the block size of its
        chunks is unknown: their rows keep theirs)."""
        queued = [] if self.read_only else self.refs.queued()
        return [Root("the queue of dropped trees", key[1:], 0, queued=True) for key in queued]

    def _not_checked(self) -> list[str]:
        if self.offline:
            return [
                "refcounts, the block cache and the copy-on-write saves: they live in the "
                "writer's cache dir, not in the store (run `snapfs fsck` on its mount)"
            ]
        if self.read_only:
            return ["refcounts: a read-only mount keeps none (run `snapfs fsck` on the writer's)"]
        return []

    def _roots(self) -> list[Root]:
        """Everything that keeps a tree alive, named: volume heads, available snapshots,
        the nodes each reference holds."""
        roots = [Root(f"volume {h.row.name}", h.row.root, h.bs) for h in self.heads.values()]
        roots += [
            Root(f"snapshot {s.volume}@{s.name}", s.root, s.block_size)
            for s in self.catalog.snapshots()
            if s.state == "available"
        ]
        roots += [
            Root(f"reference {r.id} ({r.name})", node, r.block_size)
            for r in self.catalog.references()
            for node in r.held()
        ]
        return roots

    def _compare_counts(self, walk: Walk, found: _Found, report: CheckReport) -> None:
        """Refcounts against the walk's (not when a node could not be read: what is under
        it is uncounted), and packs whose live bytes differ from the blobs indexed in
        them."""
        if walk.unreadable:
            report.not_checked.append(
                f"refcounts: not compared, {len(walk.unreadable)} tree nodes could not be "
                "read (what is under them is not counted)"
            )
            return
        for key, (counted, referenced) in sorted(self.refs.differences(walk.refs()).items()):
            found.wrong(key, f"counted {counted}, referenced {referenced}")
        if not any(k[:1] in (K_CHUNK, K_NODE) for k in self.catalog.garbage()):
            report.wrong_counts += [
                f"{pack_key(pid)}: live bytes {live}, blobs indexed in it {counted}"
                for pid, live, counted in self.chunks.live_mismatches()
            ]

    async def _check_store(self, expected: dict, found: _Found, repair: bool) -> int:
        """Every referenced blob is indexed and its pack is in the store (a listing may
        lag: a pack it lacks is asked for itself); returns how many packs in the store
        nothing indexes (left by a crashed cycle), deleted with `repair`."""
        packs = set()
        for key in expected:
            loc = self.chunks.location(key)
            if loc is None:
                found.missing(key, "not in the index")
            else:
                packs.add(loc[0])
        listed = {bytes.fromhex(k.rsplit("/", 1)[1]) for k in await self.store.list("p/")}
        gone = {pid for pid in packs - listed if await self.store.head(pack_key(pid)) is None}
        for key in expected if gone else ():
            loc = self.chunks.location(key)
            if loc is not None and loc[0] in gone:
                found.missing(key, f"missing from the store (its pack {pack_key(loc[0])})")
        if found.any_missing() and self.fence.fenced and not self.read_only:
            # Not damage if another writer took the store over: what only this writer's
            # unpublished state needed is that writer's to delete.
            await self.fence.confirm_current("checking the store")
        known = self.chunks.known_packs()
        known.update(k[1:] for k in self.catalog.garbage() if k[:1] == K_PACK)  # in grace
        orphans = sorted(listed - known)
        if repair and orphans:
            await self.fence.delete([pack_key(p) for p in orphans])
        return len(orphans)

    async def _verify_data(self, expected: dict, found: _Found) -> None:
        """Read every referenced chunk (the tree walk read every node already), in ranged
        GETs of up to 64, verifying each against its digest (those found missing already
        are not read); a batch that fails is read again one by one to name the objects."""
        chunks = sorted(
            k[1:]
            for k in expected
            if k[:1] == K_CHUNK and self.chunks.location(k) and not found.is_missing(k)
        )
        for first in range(0, len(chunks), 64):
            batch = chunks[first : first + 64]
            try:
                await self.chunks.get_many(CHUNK, batch)
                continue
            except (IntegrityError, ObjectNotFound):
                pass
            for oid in batch:
                try:
                    await self.chunks.get(CHUNK, oid)
                except (IntegrityError, ObjectNotFound) as exc:
                    found.corrupt(K_CHUNK + oid, str(exc))


class _Found:
    """fsck's findings about stored objects while it works, by key; `name_roots` writes
    them to the report, each naming the first root that needs the object."""

    def __init__(self, walk: Walk) -> None:
        self._missing: set[bytes] = set()
        self._lines: dict[str, list[tuple[bytes, str]]] = {
            "wrong": [],
            "missing": [],
            "corrupt": [],
        }
        for key, (exc, _root) in walk.unreadable.items():
            if isinstance(exc, IntegrityError):
                self.corrupt(key, str(exc))
        self._unfound = {
            k: exc
            for k, (exc, _r) in walk.unreadable.items()
            if not isinstance(exc, IntegrityError)
        }

    def wrong(self, key: bytes, why: str) -> None:
        self._lines["wrong"].append((key, why))

    def missing(self, key: bytes, why: str) -> None:
        self._unfound.pop(key, None)
        self._missing.add(key)
        self._lines["missing"].append((key, why))

    def is_missing(self, key: bytes) -> bool:
        return key in self._missing

    def corrupt(self, key: bytes, why: str) -> None:
        self._lines["corrupt"].append((key, why))

    def any_missing(self) -> bool:
        return bool(self._lines["missing"])

    async def name_roots(self, tree: TreeReader, roots: list[Root], report: CheckReport) -> None:
        """A second walk, only when something was found, to learn which root needs each
        object (the first walk keeps no such map: it would double fsck's memory)."""
        for key, exc in sorted(self._unfound.items()):  # not explained by the store check
            self._lines["missing"].append((key, f"could not be read ({exc})"))
        keys = {key for lines in self._lines.values() for key, _why in lines}
        needed = (await Walk(tree, strict=False, want=keys).run(roots)).needed_by if keys else {}

        def line(key: bytes, why: str) -> str:
            root = needed.get(key)
            return f"{key_to_store_key(key)}: {why}, needed by {root.name if root else 'no root'}"

        report.wrong_counts[:0] = [line(k, w) for k, w in self._lines["wrong"]]
        report.missing += [line(k, w) for k, w in self._lines["missing"]]
        report.corrupt += [line(k, w) for k, w in self._lines["corrupt"]]
