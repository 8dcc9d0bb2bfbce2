"""The engine: volumes and snapshots over the cache, the tree and the store.

Concurrency (trio: code between two awaits is atomic):
- `commit_lock` serialises every change of roots and refcounts: flush cycles, snapshot
  deletion, clone, rollback, volume deletion. All refcount arithmetic that needs to read tree
  nodes (which may await the store) is done before the SQLite transaction, which then runs
  without an await.
- `Head.write_lock` serialises writes to one volume, so that read-modify-write of a block and
  the copy-on-write save of a block for a pending snapshot are atomic with the write.
- Reads take no lock. A block fetch re-checks after its await that nobody wrote the block in
  the meantime before it fills the cache.

Sentinels: a block is *present* when it is dirty or clean-cached (`Head.blocks`, a
`VolumeCache`); otherwise its content is whatever the committed tree maps it to.
"""

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import trio
import trio.lowlevel

from snapfs.chunks import ChunkStore
from snapfs.errors import (
    Busy,
    CacheSyncFailed,
    CatalogFailed,
    IntegrityError,
    InvalidArgument,
)
from snapfs.store.base import Store
from snapfs.tree import TreeReader
from snapfs.units import format_size
from snapfs.volume import publish
from snapfs.volume.background import Background
from snapfs.volume.base import DEFAULT_BLOCK_SIZE, EngineConfig, EngineStatistics, Wakeup
from snapfs.volume.cache import CacheSpace
from snapfs.volume.catalog import (
    Catalog,
    ReferenceRow,
    SnapshotRow,
    VolumeRow,
)
from snapfs.volume.check import CheckReport, expected_refs
from snapfs.volume.collector import Collector
from snapfs.volume.datapath import DataPath
from snapfs.volume.fence import Fence, FenceConflict
from snapfs.volume.files import Files
from snapfs.volume.flusher import Committer
from snapfs.volume.follow import Follower, add_snapshot_record, add_volume_record
from snapfs.volume.fsck import Checker
from snapfs.volume.head import Head
from snapfs.volume.refcounts import Refcounts
from snapfs.volume.references import References
from snapfs.volume.volumes import Volumes

__all__ = ["DEFAULT_BLOCK_SIZE", "Engine", "EngineConfig", "EngineStatistics", "Head"]

log = logging.getLogger("snapfs.engine")


class Engine:
    """Volumes and snapshots over the cache, the tree and the store: the wiring of the
    components (see docs/design.md, "The components") and the engine's public interface.

    owns: the components, and the lifecycle: open (restore from the store, recover after
    a crash, the fence), close. Every other call is delegated: `Volumes` (the heads;
    create, clone, resize, rename, delete, snapshot, rollback, diff), `DataPath` (reads,
    writes, discards, fsync), `Committer` (flush cycles, publish), `Collector` (collect,
    gc, sweep), `Background` (the flusher loop), `References` (manage, unmanage, inbound
    copies), `Follower` (a read-only engine follows the writer), `Checker` (invariants
    and fsck)."""

    # ------------------------------------------------------------------ lifecycle

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        cache_dir: str,
        config: EngineConfig,
        read_only: bool = False,
        files: Files | None = None,
    ) -> None:
        self.read_only = read_only
        self.files = files or Files()
        self.store = store
        self.catalog = catalog
        self.cache_dir = cache_dir
        self.config = config
        self.fence = Fence(store, catalog, read_only, config.grace, config.clock, config.uploads)
        self.chunks = ChunkStore(store, catalog.db, config.pack_size, config.uploads)
        self.tree = TreeReader(self.chunks)
        self.refs = Refcounts(catalog, self.tree)  # counts of stored objects
        self.space = CacheSpace(config.cache_size, config.dirty_fraction)  # the block cache
        self.heads: dict[str, Head] = {}
        self.commit_lock = trio.Lock()
        self.wake = Wakeup()
        self._wire_commits(catalog, config)
        self._wire_users(catalog, config)
        self.readahead = self.data.readahead  # the daemon runs its task
        self.snap_cache = self.data.snap_cache
        self.checking = False  # opened for fsck: a restore goes on past missing objects
        if self.read_only:
            self.chunks.on_missing = self.follower.reload_index

    def _wire_commits(self, catalog: Catalog, config: EngineConfig) -> None:
        """Make the components that change the store, each given the collaborators it uses
        (and nothing else): collector, committer, the background flusher."""
        self.collector = Collector(
            catalog,
            self.chunks,
            self.refs,
            self.fence,
            config,
            self.commit_lock,
            self.wake.kick,
        )
        self.committer = Committer(
            self.heads,
            catalog,
            self.chunks,
            self.refs,
            self.fence,
            self.space,
            config,
            self.commit_lock,
            self.collector,
        )

        self.background = Background(
            self.committer,
            self.collector,
            self.chunks,
            self.refs,
            self.fence,
            config,
            self.commit_lock,
            self.wake,
        )

    def _wire_users(self, catalog: Catalog, config: EngineConfig) -> None:
        """The components that use the committer: the volumes, the data path, references,
        the checker."""
        self.vols = Volumes(
            self.heads,
            catalog,
            self.refs,
            self.fence,
            self.space,
            self.files,
            self.cache_dir,
            self.committer,
            self.collector,
            self.wake.kick,
        )
        self.data = DataPath(
            self.heads,
            self.chunks,
            self.tree,
            self.fence,
            self.space,
            config,
            self.committer,
            self.wake.kick,
        )
        self.referencing = References(
            self.vols,
            catalog,
            self.refs,
            self.fence,
            self.commit_lock,
            self.committer,
            self.collector,
        )
        self.follower = Follower(catalog, self.chunks, self.fence, config, self.vols)
        self.checker = Checker(
            self.heads,
            catalog,
            self.chunks,
            self.refs,
            self.fence,
            self.space,
            self.data,
            self.commit_lock,
        )

    @classmethod
    async def open(
        cls,
        store: Store,
        cache_dir: str,
        config: EngineConfig | None = None,
        read_only: bool = False,
        files: Files | None = None,
        checking: bool = False,
    ):
        """Open the cache dir for `store`: restore from the store when it is empty (a
        read-write engine fences first, then restores the catalog just before its fence),
        recover after a crash when the last shutdown was not clean. A read-write engine
        publishes its fence catalog before any delete; a read-only one catches up with
        the store's newest catalog. Busy when another writer published since this cache
        dir did, or keeps publishing while a fresh one fences. `checking` (read-only, for
        `snapfs fsck STORE_URL`): a restore that finds objects missing goes on, keeping
        the index the fragments give, so that the check names them."""
        manifest = await publish.read_manifest(store)
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        catalog = Catalog(os.path.join(cache_dir, "catalog.sqlite3"))
        engine = cls(store, catalog, cache_dir, config or EngineConfig(), read_only, files)
        engine.checking = engine.checker.offline = checking and read_only
        if engine.checking:  # a blob it cannot find is a finding (and the restore of the
            engine.chunks.on_missing = None  # catalog must not reload it in its middle)
        try:
            await engine._load(manifest)
        except FenceConflict as exc:
            why = engine._older_than_store(exc)
            engine._abandon()
            raise Busy(why) from None
        except BaseException:
            engine._abandon()
            raise
        return engine

    def _abandon(self) -> None:
        """A failed open: release the files, publish nothing."""
        for head in self.heads.values():
            head.close()
        self.heads.clear()
        self.catalog.close()

    def _older_than_store(self, exc: FenceConflict) -> str:
        """Why this cache dir cannot follow the store, and what it holds that is lost."""
        cat = self.catalog
        dirty = [(v.name, len(cat.dirty(v.id)) * v.block_size) for v in cat.volumes()]
        dirty = [(n, b) for n, b in dirty if b]
        unpublished = [f"{s.volume}@{s.name}" for s in cat.snapshots() if s.state != "available"]
        behind = self.fence.changes() - self.fence.covers
        held = []
        if dirty:
            held.append(
                f"{format_size(sum(b for _n, b in dirty))} written but not uploaded "
                f"(volumes {', '.join(n for n, _b in dirty)})"
            )
        if unpublished:
            held.append(f"snapshots never published: {', '.join(unpublished)}")
        if behind:
            held.append(f"{behind} committed change(s) never published")
        what = "; ".join(held) if held else "nothing that was not uploaded"
        return (
            f"cache dir {self.cache_dir} is older than the store (catalog {exc.seq} was "
            f"published by another writer, this cache dir published {self.fence.store_seq}): "
            f"it holds {what}; mount with a new --cache-dir to follow the store (this one is "
            "left as it is)"
        )

    async def _load(self, manifest: dict) -> None:
        cat = self.catalog
        known = cat.get_meta("store_uuid")
        if known is None:
            if self.read_only:
                doc = await publish.latest_catalog(self.store)
            else:  # fence first: no writer it displaces publishes after the catalog copied
                doc = await self.fence.claim()
            await self._restore_from_store(manifest["uuid"], doc)
        elif known != manifest["uuid"]:
            raise InvalidArgument(
                f"cache dir {self.cache_dir} belongs to another store; use another --cache-dir"
            )
        elif not self.read_only:
            await self.fence.reconcile()  # FenceConflict: another writer published since
        else:
            await self.refresh()  # a reused read-only cache dir: catch up with the store
        clean = bool(cat.get_meta("clean", 0))
        with cat.transaction():
            cat.set_meta("clean", 0)
            present = cat.take_present()
        for row in cat.volumes():
            self.vols.add_head(row)
        by_id = {h.row.id: h for h in self.heads.values()}
        if clean:
            for vid, blk in present:
                head = by_id.get(vid)
                if head and blk not in head.dirty and blk < head.nblocks:
                    head.blocks.add_clean(blk)
        temporary = []
        for snap in cat.snapshots():
            if snap.state == "creating" and snap.temporary and not self.read_only:
                # Left by a crash: dropped like any temporary snapshot, once committed
                # (later snapshots of the volume build on it).
                with cat.transaction():
                    cat.update_snapshot(snap.id, state="deleting")
                snap.state = "deleting"
            if snap.state in ("creating", "deleting"):
                self.heads[snap.volume].pending.append(snap)
            elif snap.temporary:
                temporary.append(snap)
        for head in self.heads.values():
            self.vols.drop_stale_saves(head)
            if not self.checking:  # fsck reports a node it cannot read, and goes on
                await self.vols.count_mapped(head)
        if not self.read_only:
            # The fence, before any delete, sweep or collect: from here on a writer that
            # this one displaced can publish nothing.
            async with self.commit_lock:
                await self.committer.publish()
        for snap in temporary:  # dropped on unmount; after a crash, dropped now
            await self.vols.drop_snapshot(snap)
        if not clean:
            if not self.read_only:
                self.collector.cycle_failed()
            log.warning(
                "recovering after an unclean shutdown: %d dirty blocks to upload",
                sum(len(h.dirty) for h in self.heads.values()),
            )

    async def _restore_from_store(self, store_uuid: str, doc: dict | None) -> None:
        """Fill the empty cache dir with catalog `doc` (None: an empty store) and the index.
        A writer's fence is out already and stays its store seq."""
        refs: dict[bytes, tuple[int, int]] = {}
        cat = self.catalog
        with cat.transaction():  # the index first: walking the roots reads nodes through it
            await self.chunks.load_index(
                () if doc is None else doc.get("fragments", ()), keep_absent=self.checking
            )
        if doc is not None:
            refs = await expected_refs(self.tree, publish.doc_roots(doc), strict=not self.checking)
        indexed = self.chunks.indexed_keys()
        missing = set(refs) - indexed
        if missing and not self.checking:
            raise IntegrityError(
                f"{self.store.url}: {len(missing)} objects the catalog references are in no "
                "pack; run fsck on the writer"
            )
        with cat.transaction():
            # Left over from crashed cycles, or uploaded by a writer this one displaces:
            # released at the first collect, which comes after the fence.
            cat.add_garbage(indexed - set(refs))
            if doc is not None:
                for v in doc["volumes"]:
                    add_volume_record(cat, v)
                for s in doc["snapshots"]:
                    add_snapshot_record(cat, s)
                for ref in publish.doc_references(doc):
                    cat.add_reference(ref)
                self.refs.replace(refs)
            seq = doc["seq"] if doc else 0
            self.fence.reset_changes()
            if self.read_only:
                self.fence.record_loaded(seq)
            cat.set_meta("store_uuid", store_uuid)
            cat.set_meta("clean", 1)
        if doc is not None:
            log.info(
                "restored %d volumes and %d snapshots from %s (catalog %d)",
                len(doc["volumes"]),
                len(doc["snapshots"]),
                self.store.url,
                seq,
            )

    async def close(self, flush: bool = True) -> None:
        """Flush everything (unless told not to), drop temporary snapshots, remember the
        clean cache and mark the shutdown clean. Shielded: runs to the end when cancelled."""
        with trio.CancelScope(shield=True):
            try:
                if flush and not (self.lease_lost or self.read_only or self.catalog.failed):
                    await self.sync()
                    for snap in [s for s in self.catalog.snapshots() if s.temporary]:
                        await self.vols.delete_snapshot(snap.volume, snap.name, uid=0)
            finally:
                clean = self.catalog.failed is None
                for head in self.heads.values():
                    try:
                        await head.persist_dirty()
                    except (CacheSyncFailed, CatalogFailed):
                        clean = False  # the next open recovers as after a crash
                with contextlib.suppress(CatalogFailed):
                    if clean:
                        with self.catalog.transaction():
                            self.catalog.save_present(self.space.present_keys())
                            self.catalog.set_meta("clean", 1)
                for head in self.heads.values():
                    head.close()
                self.catalog.close()

    def statistics(self) -> EngineStatistics:
        """Assembled from the components' own statistics."""
        packs = self.chunks.statistics()
        return EngineStatistics(
            volumes=len(self.heads),
            snapshots=len(self.catalog.snapshots()),
            uploaded_bytes=self.chunks.uploaded_bytes,
            uploaded_objects=self.chunks.uploaded_blobs,
            uploading_objects=self.chunks.staged_blobs,
            packs=packs.packs,
            pack_bytes=packs.pack_bytes,
            live_bytes=packs.live_bytes,
            index_fragments=packs.fragments,
            **self.space.statistics(),
            **self.refs.statistics(),
            **self.data.statistics(),
            **self.committer.statistics(),
            **self.collector.statistics(),
            **self.background.statistics(),
            **self.fence.statistics(),
        )

    # ------------------------------------------------------------------ delegated

    def head(self, name: str) -> Head:
        return self.vols.head(name)

    def snapshot_row(self, volume: str, name: str) -> SnapshotRow:
        return self.vols.snapshot_row(volume, name)

    # a read-only engine follows the writer (`Follower`)

    async def run_refresher(
        self,
        changed: Callable[[], Awaitable[None]] | None = None,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.follower.run_refresher(changed, task_status=task_status)

    async def refresh(self) -> bool:
        return await self.follower.refresh()

    # volumes and snapshots (`Volumes`)

    async def create_volume(
        self,
        name: str,
        size: int,
        block_size: int | None = None,
        uid: int = 0,
        source: tuple[str, str] | None = None,
    ) -> VolumeRow:
        return await self.vols.create_volume(name, size, block_size, uid, source)

    async def resize_volume(self, name: str, size: int, uid: int = 0) -> VolumeRow:
        return await self.vols.resize_volume(name, size, uid)

    async def delete_volume(self, name: str, recursive: bool = False, uid: int = 0) -> None:
        await self.vols.delete_volume(name, recursive, uid)

    async def rename_volume(self, name: str, new: str, uid: int = 0) -> VolumeRow:
        return await self.vols.rename_volume(name, new, uid)

    def allocated_bytes(self, name: str) -> int:
        return self.vols.allocated_bytes(name)

    def volume_info(self, name: str) -> dict:
        return self.vols.volume_info(name)

    async def create_snapshot(
        self,
        volume: str,
        name: str,
        temporary: bool = False,
        uid: int = 0,
        guid: str | None = None,
    ) -> SnapshotRow:
        return await self.vols.create_snapshot(volume, name, temporary, uid, guid)

    async def wait_available(self, volume: str, name: str) -> SnapshotRow:
        return await self.vols.wait_available(volume, name)

    async def delete_snapshot(self, volume: str, name: str, uid: int = 0) -> None:
        await self.vols.delete_snapshot(volume, name, uid)

    async def rollback(self, volume: str, name: str, uid: int = 0) -> None:
        await self.vols.rollback(volume, name, uid)

    async def diff(self, volume: str, a: str, b: str) -> list[int]:
        return await self.vols.diff(volume, a, b)

    async def allocated(self, volume: str, name: str) -> list[int]:
        return await self.vols.allocated(volume, name)

    async def changed_since(self, volume: str, name: str) -> list[int]:
        return await self.vols.changed_since(volume, name)

    async def snapshot_extents(self, volume: str, name: str) -> list[tuple[int, int]]:
        return await self.vols.snapshot_extents(volume, name)

    # for the FUSE layer: what snapfs/fuse/ops.py, snapfs/control.py and the daemon may
    # ask of the engine. They call only these (and the operations above), never the
    # catalog, a Head or the engine's fields: rows come out as values, opens go in
    # through calls.

    def volumes(self) -> list[VolumeRow]:
        """The volumes of the head, by name."""
        return self.vols.volumes()

    def volume(self, name: str) -> VolumeRow:
        """One volume's row; NotFound when there is no such volume."""
        return self.vols.volume(name)

    def volume_by_id(self, vid: int) -> VolumeRow | None:
        return self.vols.volume_by_id(vid)

    def snapshots(self, volume: str | None = None) -> list[SnapshotRow]:
        """Every snapshot (of `volume`, when given) in every state, by volume and epoch."""
        return self.vols.snapshots(volume)

    def snapshot_by_id(self, sid: int) -> SnapshotRow | None:
        return self.vols.snapshot_by_id(sid)

    def open_volume(self, name: str) -> None:
        """A volume file was opened: rollback and delete refuse while it is open."""
        self.vols.open_volume(name)

    def close_volume(self, name: str) -> None:
        self.vols.close_volume(name)

    def open_snapshot(self, sid: int) -> None:
        """A snapshot file was opened: delete refuses while it is open."""
        self.vols.open_snapshot(sid)

    def close_snapshot(self, sid: int) -> None:
        self.vols.close_snapshot(sid)

    def writable(self) -> None:
        """Raise ReadOnly on a read-only mount, or after this writer lost the store."""
        self.fence.writable()

    @property
    def lease_lost(self) -> str | None:
        """Why this writer lost the store (the fence owns it), or None."""
        return self.fence.lost

    def lost(self, reason: str) -> None:
        """This writer no longer owns the store: keep the cache, publish and delete nothing,
        refuse snapshots until remounted."""
        self.fence.mark_lost(reason)

    def kick(self) -> None:
        self.wake.kick()

    def evict_all(self) -> None:
        """Drop every clean cached block (tests use it to force reads from the store)."""
        self.space.evict(limit=0)

    @property
    def sweep_needed(self) -> bool:
        return self.collector.sweep_needed

    async def read(self, name: str, offset: int, size: int) -> bytes:
        return await self.data.read(name, offset, size)

    async def read_ref(self, name: str, offset: int, size: int) -> bytes | tuple[int, int, int]:
        return await self.data.read_ref(name, offset, size)

    async def write(self, name: str, offset: int, data: bytes) -> int:
        return await self.data.write(name, offset, data)

    async def discard(self, name: str, offset: int, length: int) -> None:
        await self.data.discard(name, offset, length)

    async def fsync(self, name: str) -> None:
        await self.data.fsync(name)

    async def read_snapshot(self, snap: SnapshotRow, offset: int, size: int) -> bytes:
        return await self.data.read_snapshot(snap, offset, size)

    async def sync(self) -> None:
        await self.committer.sync()

    async def flush_once(self, want=None, min_age: float = 0.0, max_age: float = 0.0) -> bool:
        return await self.committer.flush_once(want, min_age, max_age)

    async def run_flusher(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.background.run_flusher(task_status=task_status)

    async def gc(self, threshold: float | None = None) -> dict:
        return await self.collector.gc(threshold)

    async def sweep_orphans(self) -> int:
        return await self.collector.sweep_orphans()

    async def expand_drops(self, batches: int | None = 1) -> int:
        return await self.collector.expand_drops(batches)

    def check_state(self) -> list[str]:
        return self.checker.check_state()

    def assert_invariants(self) -> None:
        self.checker.assert_invariants()

    async def check(
        self, repair: bool = False, verify_store: bool = True, verify_data: bool = False
    ) -> CheckReport:
        return await self.checker.check(repair, verify_store, verify_data)

    def references(self) -> list[ReferenceRow]:
        return self.referencing.references()

    def reference(self, rid: str) -> ReferenceRow:
        return self.referencing.reference(rid)

    async def unmanage(self, volume: str, name: str, uid: int = 0) -> ReferenceRow:
        return await self.referencing.unmanage(volume, name, uid)

    async def manage(
        self, volume: str, rid: str, name: str | None = None, uid: int = 0
    ) -> SnapshotRow:
        return await self.referencing.manage(volume, rid, name, uid)

    async def delete_reference(self, rid: str, uid: int = 0) -> None:
        await self.referencing.delete_reference(rid, uid)

    async def begin_inbound(
        self, snap: SnapshotRow, name: str, description: str, source: str, unique: bool = False
    ) -> ReferenceRow:
        return await self.referencing.begin_inbound(snap, name, description, source, unique)

    async def commit_inbound(self, rid, deltas, sizes, pins, locked: bool = False) -> None:
        await self.referencing.commit_inbound(rid, deltas, sizes, pins, locked)

    async def finish_inbound(self, rid: str, stale: list[bytes]) -> ReferenceRow:
        return await self.referencing.finish_inbound(rid, stale)
