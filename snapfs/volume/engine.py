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

from snapfs.access import check_owner
from snapfs.chunks import ChunkStore
from snapfs.errors import (
    AlreadyExists,
    Busy,
    CacheSyncFailed,
    CatalogFailed,
    IntegrityError,
    InvalidArgument,
    NotFound,
    SnapfsError,
)
from snapfs.store.base import Store
from snapfs.tree import TreeReader
from snapfs.units import MAX_VOLUME_SIZE, check_name, check_volume_name, format_size
from snapfs.volume import publish
from snapfs.volume.background import Background
from snapfs.volume.base import DEFAULT_BLOCK_SIZE, EngineConfig, EngineStatistics, Wakeup
from snapfs.volume.cache import CacheSpace
from snapfs.volume.catalog import (
    Catalog,
    ReferenceRow,
    SnapshotRow,
    VolumeRow,
    check_guid,
    legacy_guid,
)
from snapfs.volume.check import K_NODE, CheckReport, expected_refs
from snapfs.volume.collector import Collector
from snapfs.volume.datapath import DataPath
from snapfs.volume.fence import Fence, FenceConflict
from snapfs.volume.files import Files
from snapfs.volume.flusher import Committer
from snapfs.volume.fsck import Checker
from snapfs.volume.head import Head, find_head, find_snapshot
from snapfs.volume.refcounts import Refcounts
from snapfs.volume.references import References

__all__ = ["DEFAULT_BLOCK_SIZE", "Engine", "EngineConfig", "EngineStatistics", "Head"]

log = logging.getLogger("snapfs.engine")


class Engine:
    """Volumes and snapshots over the cache, the tree and the store: the wiring of the
    components (see docs/design.md, "The components") and the engine's public interface.

    owns: the heads (which volumes exist, and their runtime state), the opens of snapshot
    files, the lifecycle (open, restore, recover, follow, close), and the volume and
    snapshot operations that change roots (create, clone, resize, rename, delete,
    snapshot, rollback). The rest is delegated: `DataPath` (reads, writes, discards,
    fsync), `Committer` (flush cycles, publish), `Collector` (collect, gc, sweep),
    `Background` (the flusher loop), `References` (manage, unmanage, inbound copies),
    `Checker` (invariants and fsck)."""

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
        self.snap_opens: dict[int, int] = {}
        self.commit_lock = trio.Lock()
        self.wake = Wakeup()
        self._wire_commits(catalog, config)
        self._wire_users(catalog, config)
        self.readahead = self.data.readahead  # the daemon runs its task
        self.snap_cache = self.data.snap_cache
        self._refresh_lock = trio.Lock()
        self._index_loads = 0  # full index reloads of a read-only engine
        self.checking = False  # opened for fsck: a restore goes on past missing objects
        if self.read_only:
            self.chunks.on_missing = self._reload_index

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
        """The components that use the committer: the data path, references, the checker."""
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
            self.heads,
            catalog,
            self.refs,
            self.fence,
            self.commit_lock,
            self.committer,
            self.collector,
            self.snap_opens,
        )
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
            self._add_head(row)
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
            self._drop_stale_saves(head)
            if not self.checking:  # fsck reports a node it cannot read, and goes on
                await self._count_mapped(head)
        if not self.read_only:
            # The fence, before any delete, sweep or collect: from here on a writer that
            # this one displaced can publish nothing.
            async with self.commit_lock:
                await self.committer.publish()
        for snap in temporary:  # dropped on unmount; after a crash, dropped now
            await self._drop_snapshot(snap)
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
                    _add_volume_record(cat, v)
                for s in doc["snapshots"]:
                    _add_snapshot_record(cat, s)
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

    # ------------------------------------------------------------------ read-only: follow

    async def run_refresher(
        self,
        changed: Callable[[], Awaitable[None]] | None = None,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Background task of a read-only engine: follow the writer every `refresh`
        seconds (new snapshots appear, deleted ones go, new index fragments are loaded),
        then await `changed()` when the catalog changed (the FUSE layer updates the
        kernel's caches). Errors are logged; the next round tries again."""
        task_status.started()
        while True:
            await trio.sleep(self.config.refresh)
            try:
                if await self.refresh() and changed is not None:
                    await changed()
            except Exception as exc:
                if isinstance(exc, SnapfsError):
                    log.warning("refresh from %s failed: %s", self.store.url, exc)
                else:
                    log.exception("refresh from %s failed", self.store.url)

    async def _reload_index(self) -> None:
        """A read found no blob where the index said (the writer's gc moved it, and the
        old pack went after its grace period): read the whole index again, once for all
        the reads that failed meanwhile."""
        loads = self._index_loads
        async with self._refresh_lock:
            if self._index_loads == loads:
                await self._refresh_locked(reload_index=True)

    async def refresh(self) -> bool:
        """Read-only: take the store's newest catalog (probing past the listing) and the
        index fragments not loaded yet. Returns whether the catalog changed."""
        if not self.read_only:
            return False
        async with self._refresh_lock:
            return await self._refresh_locked(reload_index=False)

    async def _refresh_locked(self, reload_index: bool) -> bool:
        cat = self.catalog
        mine = self.fence.store_seq
        newest = await publish.newest_seq(self.store, mine)
        doc = None
        if newest != mine:
            doc = await publish.latest_catalog(self.store, newest)
            newest = doc["seq"] if doc else newest
        named = () if doc is None else doc.get("fragments", ())
        scan = await self.chunks.scan_index(
            None if reload_index else self.chunks.fragment_keys(), named
        )
        if doc is not None and not reload_index:
            keys = {K_NODE + r for r, _bs in publish.doc_roots(doc) if r is not None}
            if any(k not in scan.found and self.chunks.location(k) is None for k in keys):
                # A root in no fragment (one lost): pack trailers say where it is.
                scan = await self.chunks.scan_index(named=named)
                reload_index = True
        # From here on: no await until the tables and heads agree.
        with cat.transaction():
            self.chunks.apply_scan(scan, replace=reload_index)
            if doc is not None:
                self._apply_catalog(doc)
                self.fence.record_loaded(newest)
        if reload_index:
            self._index_loads += 1
        if doc is None:
            return False
        log.info("following %s: catalog %d", self.store.url, newest)
        return True

    def _apply_catalog(self, doc: dict) -> None:
        """Inside a transaction, no await: make the volume and snapshot records those of
        `doc` (a read-only engine: no refcounts; the volumes are not shown, and their
        `mapped` counts are not kept). Unchanged snapshots keep their ids (open files and
        inode numbers stay valid)."""
        cat = self.catalog
        wanted = {(s["volume"], s["name"]): s for s in doc["snapshots"]}
        for row in cat.snapshots():
            s = wanted.get((row.volume, row.name))
            if s is not None and (s["root"], s["epoch"], record_guid(s)) == (
                row.root,
                row.epoch,
                row.guid,
            ):
                del wanted[(row.volume, row.name)]
            else:
                cat.delete_snapshot(row.id)  # gone, or deleted and taken again
        for s in wanted.values():
            _add_snapshot_record(cat, s)
        for ref in cat.references():  # a reader keeps no refcounts: the records only
            cat.delete_reference(ref.id)
        for ref in publish.doc_references(doc):
            cat.add_reference(ref)
        volumes = {v["name"]: v for v in doc["volumes"]}
        for row in cat.volumes():
            v = volumes.pop(row.name, None)
            head = self.heads.get(row.name)
            if v is None or v["block_size"] != row.block_size:
                cat.delete_volume(row.id)
                if head is None:
                    head = Head(row, self.cache_dir, self.files, self.space, cat)
                else:
                    del self.heads[row.name]
                head.close()
                head.remove_files()
                if v is not None:
                    volumes[row.name] = v  # taken again, with another block size
            elif (v["root"], v["root_level"], v["size"]) != (row.root, row.root_level, row.size):
                cat.update_volume(
                    row.id, root=v["root"], root_level=v["root_level"], size=v["size"]
                )
                if head is not None:
                    head.row.root, head.row.root_level = v["root"], v["root_level"]
                    if v["size"] != head.row.size:
                        head.cache.truncate(v["size"])
                        head.row.size = v["size"]
                    head.blocks.forget_clean()  # cached from the old root
        for v in volumes.values():
            vid = _add_volume_record(cat, v)
            row = cat.volume(v["name"])
            assert row is not None and row.id == vid
            if self.heads:  # else _load adds the heads
                self._add_head(row)

    def _add_head(self, row: VolumeRow) -> Head:
        head = Head(row, self.cache_dir, self.files, self.space, self.catalog)
        for blk, epoch in self.catalog.dirty(row.id).items():
            head.blocks.load_dirty(blk, epoch, head.next_gen())
        head.saves.load()
        self.heads[row.name] = head
        return head

    def _drop_stale_saves(self, head: Head) -> None:
        """Copy-on-write saves of snapshots that are no longer pending (left by an older
        version that could leak them): nothing reads them, they only took dirty room."""
        stale = head.saves.drop_stale({s.epoch for s in head.pending})
        if stale:
            log.warning("%s: dropped the saves of %d stale epochs", head.row.name, stale)

    async def close(self, flush: bool = True) -> None:
        """Flush everything (unless told not to), drop temporary snapshots, remember the
        clean cache and mark the shutdown clean. Shielded: runs to the end when cancelled."""
        with trio.CancelScope(shield=True):
            try:
                if flush and not (self.lease_lost or self.read_only or self.catalog.failed):
                    await self.sync()
                    for snap in [s for s in self.catalog.snapshots() if s.temporary]:
                        await self.delete_snapshot(snap.volume, snap.name, uid=0)
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

    # ------------------------------------------------------------------ volumes

    async def create_volume(
        self,
        name: str,
        size: int,
        block_size: int | None = None,
        uid: int = 0,
        source: tuple[str, str] | None = None,
    ) -> VolumeRow:
        self.writable()
        check_volume_name(name)
        if name in self.heads:
            raise AlreadyExists(f"volume {name!r} already exists")
        root, root_level, parent = None, 0, None
        if source is not None:
            snap = await self.wait_available(*source)
            check_owner(snap.owner, uid, f"snapshot {source[0]}@{source[1]}")
            if block_size not in (None, snap.block_size):
                raise InvalidArgument("a clone keeps the block size of its snapshot")
            block_size = snap.block_size
            if size < snap.size:
                raise InvalidArgument(
                    f"a clone cannot be smaller than its snapshot ({format_size(snap.size)})"
                )
            root, root_level, parent = snap.root, snap.root_level, f"{source[0]}@{source[1]}"
        block_size = block_size or DEFAULT_BLOCK_SIZE
        check_block_size(block_size)
        check_volume_size(size)
        async with self.commit_lock:
            if name in self.heads:
                raise AlreadyExists(f"volume {name!r} already exists")
            if source is not None:
                snap = self.snapshot_row(*source)  # may have been deleted while we waited
                root, root_level = snap.root, snap.root_level
            with self.catalog.transaction():
                vid = self.catalog.add_volume(name, size, block_size, root, root_level, uid, parent)
                if root is not None:
                    self.refs.apply({K_NODE + root: 1})
                self.fence.changed()
            row = self.catalog.volume(name)
            assert row is not None and row.id == vid
            await self._count_mapped(self._add_head(row))
            await self.committer.publish()
        return row

    async def resize_volume(self, name: str, size: int, uid: int = 0) -> VolumeRow:
        self.writable()
        head = self.head(name)
        check_owner(head.row.owner, uid, f"volume {name!r}")
        check_volume_size(size)
        if size < head.row.size:
            raise InvalidArgument(
                f"volume {name!r} is {format_size(head.row.size)}: shrinking is not supported"
            )
        async with self.commit_lock:
            head.cache.truncate(size)
            with self.catalog.transaction():
                self.catalog.update_volume(head.row.id, size=size)
                self.fence.changed()
            head.row.size = size
            await self.committer.publish()
        return head.row

    async def delete_volume(self, name: str, recursive: bool = False, uid: int = 0) -> None:
        self.writable()
        head = self.head(name)
        check_owner(head.row.owner, uid, f"volume {name!r}")
        if head.opens:
            raise Busy(f"volume {name!r} is open")
        snaps = [s for s in self.catalog.snapshots(name) if s.state != "deleting"]
        if snaps and not recursive:
            raise Busy(
                f"volume {name!r} has {len(snaps)} snapshot(s): delete them first "
                "or use --recursive"
            )
        for snap in snaps:
            await self.delete_snapshot(name, snap.name, uid=uid)
        async with self.commit_lock:
            deltas = await self.committer.replace_tree(head, None)
            if any(s.state != "deleting" for s in self.catalog.snapshots(name)):
                raise Busy(f"volume {name!r} has a snapshot taken meanwhile: delete it first")
            with self.catalog.transaction():
                self.refs.apply(deltas)
                self.catalog.delete_volume(head.row.id)
                self.fence.changed()
            del self.heads[name]
            head.close()  # its dirty, clean and saved blocks take no room any more
            head.remove_files()
            await self.committer.publish()
            await self.collector.collect()

    async def rename_volume(self, name: str, new: str, uid: int = 0) -> VolumeRow:
        """Give a closed volume without snapshots another name: how an import's hidden
        volume becomes visible. One transaction, then the head moves under its new name with
        no await in between (every `heads[row.name] is head` check keeps holding). Busy
        while it is open or has snapshots; AlreadyExists when `new` is taken."""
        self.writable()
        head = self.head(name)
        check_owner(head.row.owner, uid, f"volume {name!r}")
        check_volume_name(new)
        async with head.write_lock, self.commit_lock:
            if self.heads.get(name) is not head:
                raise NotFound(f"volume {name!r} not found")
            if head.opens or self.catalog.snapshots(name):
                raise Busy(f"volume {name!r} is open or has snapshots: it cannot be renamed")
            if new in self.heads:
                raise AlreadyExists(f"volume {new!r} already exists")
            with self.catalog.transaction():
                self.catalog.update_volume(head.row.id, name=new)
                self.fence.changed()
            del self.heads[name]
            head.row.name = new
            self.heads[new] = head
            await self.committer.publish()
        return head.row

    async def _count_mapped(self, head: Head) -> None:
        """Count the blocks the committed tree maps, and which dirty blocks it does not."""
        head.mapped = 0
        async for _ in self.tree.items(head.row.root, head.row.root_level):
            head.mapped += 1
        for blk in list(head.dirty):  # after a crash: dirty rows the tree never saw
            oid = await self.tree.lookup(head.row.root, head.row.root_level, blk)
            head.blocks.rebase(blk, mapped=oid is not None)

    def allocated_bytes(self, name: str) -> int:
        """Bytes of the volume that are not holes (dirty all-zero blocks count until the
        flusher turns them into holes)."""
        head = self.head(name)
        dirty = head.dirty.values()
        unmapped = sum(d.hole is True for d in dirty)  # discarded, mapped until the flush
        return (head.mapped - unmapped + sum(d.new for d in dirty)) * head.bs

    def volume_info(self, name: str) -> dict:
        head = self.head(name)
        row = head.row
        snaps = self.catalog.snapshots(name)
        cached = self.space.clean_count(row.id) * row.block_size
        return {
            "name": row.name,
            "size": row.size,
            "block_size": row.block_size,
            "owner": row.owner,
            "created": row.created,
            "parent": row.parent,
            "state": "in-use" if head.opens else "available",
            "allocated": self.allocated_bytes(name),
            "bytes_dirty": len(head.dirty) * row.block_size,
            "bytes_cached": cached + len(head.dirty) * row.block_size,
            "bytes_frozen": head.saves.count() * row.block_size,
            "snapshots": len([s for s in snaps if s.state != "deleting"]),
            "latest_snapshot": snaps[-1].name if snaps else None,
        }

    # ------------------------------------------------------------------ snapshots

    async def create_snapshot(
        self,
        volume: str,
        name: str,
        temporary: bool = False,
        uid: int = 0,
        guid: str | None = None,
    ) -> SnapshotRow:
        """O(1): sync the cache file and the dirty map, then freeze the epoch. The data is
        neither copied nor hashed; the flusher uploads it and marks the snapshot available.
        `guid`: the identity to give it (a received snapshot keeps its source's), else a
        fresh one; one volume never has two snapshots of the same identity."""
        self.writable()
        head = self.head(volume)
        check_owner(head.row.owner, uid, f"volume {volume!r}")
        check_name(name, "snapshot name")
        guid = None if guid is None else check_guid(guid)
        self._check_new_snapshot(volume, name, guid)
        await head.persist_dirty()
        self._check_new_snapshot(volume, name, guid)
        row = head.row
        with self.catalog.transaction():
            sid = self.catalog.add_snapshot(
                volume,
                name,
                row.epoch,
                "creating",
                None,
                row.root_level,
                row.size,
                row.block_size,
                temporary,
                uid,
                guid=guid,
            )
            self.catalog.update_volume(row.id, epoch=row.epoch + 1)
        row.epoch += 1
        snap = self.catalog.snapshot(volume, name)
        assert snap is not None and snap.id == sid
        head.pending.append(snap)
        self.kick()
        return snap

    def _check_new_snapshot(self, volume: str, name: str, guid: str | None) -> None:
        if self.catalog.snapshot(volume, name) is not None:
            raise AlreadyExists(f"snapshot {volume}@{name} already exists")
        same = None if guid is None else self.catalog.snapshot_by_guid(volume, guid)
        if same is not None:
            raise AlreadyExists(f"snapshot {volume}@{same.name} has guid {guid} already")

    async def wait_available(self, volume: str, name: str) -> SnapshotRow:
        while True:
            snap = self.snapshot_row(volume, name)
            if snap.state == "available":
                return snap
            if snap.state != "creating":
                raise SnapfsError(f"snapshot {volume}@{name} is {snap.state}")
            self.writable()  # lost the store: it stays creating here for ever
            if not await self.committer.flush_once():
                await trio.sleep(0.05)  # another task's cycle holds the work: let it run

    async def delete_snapshot(self, volume: str, name: str, uid: int = 0) -> None:
        self.writable()
        snap = self.snapshot_row(volume, name)
        check_owner(snap.owner, uid, f"snapshot {volume}@{name}")
        if self.snap_opens.get(snap.id):
            raise Busy(f"snapshot {volume}@{name} is open")
        async with self.commit_lock:
            snap = self.snapshot_row(volume, name)
            if snap.state == "creating":
                with self.catalog.transaction():
                    self.catalog.update_snapshot(snap.id, state="deleting")
                for pending in self.heads[volume].pending:
                    if pending.id == snap.id:
                        pending.state = "deleting"
                self.kick()
                return
            await self._drop_snapshot(snap)

    async def _drop_snapshot(self, snap: SnapshotRow) -> None:
        deltas: dict[bytes, int] = {}
        if snap.root is not None:
            self.refs.plan_drop(deltas, K_NODE + snap.root)
        with self.catalog.transaction():
            self.refs.apply(deltas)
            self.catalog.delete_snapshot(snap.id)
            self.fence.changed()
        await self.committer.publish()
        await self.collector.collect()

    async def rollback(self, volume: str, name: str, uid: int = 0) -> None:
        self.writable()
        head = self.head(volume)
        check_owner(head.row.owner, uid, f"volume {volume!r}")
        if head.opens:
            raise Busy(f"volume {volume!r} is open: close it (detach its loop device) first")
        snap = await self.wait_available(volume, name)
        async with head.write_lock, self.commit_lock:
            deltas = await self.committer.replace_tree(head, snap.root)
            with self.catalog.transaction():
                self.refs.apply(deltas)
                self.catalog.clear_dirty(head.row.id, list(head.dirty))
                self.catalog.update_volume(
                    head.row.id, root=snap.root, root_level=snap.root_level, size=snap.size
                )
                self.fence.changed()
            head.blocks.forget()
            head.row.root, head.row.root_level = snap.root, snap.root_level
            await self._count_mapped(head)
            head.row.size = snap.size
            head.cache.truncate(0)
            head.cache.truncate(snap.size)
            await self.committer.publish()
            await self.collector.collect()

    async def diff(self, volume: str, a: str, b: str) -> list[int]:
        sa, sb = await self.wait_available(volume, a), await self.wait_available(volume, b)
        return await self.tree.diff(sa.root, sa.root_level, sb.root, sb.root_level)

    async def allocated(self, volume: str, name: str) -> list[int]:
        """The blocks snapshot volume@name maps (its non-zero blocks), sorted: the cost
        follows them, not the volume's size."""
        snap = await self.wait_available(volume, name)
        return [blk async for blk, _oid in self.tree.items(snap.root, snap.root_level)]

    async def changed_since(self, volume: str, name: str) -> list[int]:
        """Blocks of the volume that may differ from its snapshot `name`: where the
        committed tree differs, and every dirty block (one rewritten with the same bytes
        counts). Under the commit lock, so no commit moves a block from dirty to the tree
        while the trees are compared. A size change is the caller's to compare."""
        snap = await self.wait_available(volume, name)
        head = self.head(volume)
        async with self.commit_lock:
            row = head.row
            blocks = set(await self.tree.diff(snap.root, snap.root_level, row.root, row.root_level))
            blocks.update(head.dirty)
        return sorted(blocks)

    async def snapshot_extents(self, volume: str, name: str) -> list[tuple[int, int]]:
        """The byte ranges (offset, length) that snapshot `volume@name` maps, merged, in
        order: what an export reads (the rest are holes). Waits until it is available."""
        blocks = await self.allocated(volume, name)
        snap = self.snapshot_row(volume, name)
        bs = snap.block_size
        extents: list[tuple[int, int]] = []
        for blk in blocks:
            offset = blk * bs
            length = min(bs, snap.size - offset)
            if extents and sum(extents[-1]) == offset:
                extents[-1] = (extents[-1][0], extents[-1][1] + length)
            elif length > 0:
                extents.append((offset, length))
        return extents

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
        return find_head(self.heads, name)

    def snapshot_row(self, volume: str, name: str) -> SnapshotRow:
        return find_snapshot(self.catalog, self.heads, volume, name)

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

    # ------------------------------------------------------------------ for the FUSE layer
    # What snapfs/fuse/ops.py, snapfs/control.py and the daemon may ask of the engine. They
    # call only these (and the operations above), never the catalog, a Head or the
    # engine's fields: rows come out as values, opens go in through calls.

    def volumes(self) -> list[VolumeRow]:
        """The volumes of the head, by name."""
        return [self.heads[name].row for name in sorted(self.heads)]

    def volume(self, name: str) -> VolumeRow:
        """One volume's row; NotFound when there is no such volume."""
        return self.head(name).row

    def volume_by_id(self, vid: int) -> VolumeRow | None:
        for head in self.heads.values():
            if head.row.id == vid:
                return head.row
        return None

    def snapshots(self, volume: str | None = None) -> list[SnapshotRow]:
        """Every snapshot (of `volume`, when given) in every state, by volume and epoch."""
        return self.catalog.snapshots(volume)

    def snapshot_by_id(self, sid: int) -> SnapshotRow | None:
        return self.catalog.snapshot_by_id(sid)

    def open_volume(self, name: str) -> None:
        """A volume file was opened: rollback and delete refuse while it is open."""
        self.head(name).opens += 1

    def close_volume(self, name: str) -> None:
        head = self.heads.get(name)
        if head is not None:
            head.opens = max(0, head.opens - 1)

    def open_snapshot(self, sid: int) -> None:
        """A snapshot file was opened: delete refuses while it is open."""
        self.snap_opens[sid] = self.snap_opens.get(sid, 0) + 1

    def close_snapshot(self, sid: int) -> None:
        count = self.snap_opens.get(sid, 1) - 1
        if count > 0:
            self.snap_opens[sid] = count
        else:
            self.snap_opens.pop(sid, None)


def _add_volume_record(cat: Catalog, v: dict) -> int:
    return cat.add_volume(
        v["name"],
        v["size"],
        v["block_size"],
        v["root"],
        v["root_level"],
        v["owner"],
        v["parent"],
        v["created"],
    )


def _add_snapshot_record(cat: Catalog, s: dict) -> int:
    return cat.add_snapshot(
        s["volume"],
        s["name"],
        s["epoch"],
        "available",
        s["root"],
        s["root_level"],
        s["size"],
        s["block_size"],
        False,
        s["owner"],
        s["created"],
        record_guid(s),
    )


def record_guid(s: dict) -> str:
    """A published snapshot record's identity (a catalog of an older version has none: the
    one derived from the record, as the writer's migration derived it)."""
    return s.get("guid") or legacy_guid(s["volume"], s["name"], s["created"], s["epoch"])


def check_block_size(block_size: int) -> None:
    if block_size < 4096 or block_size > (16 << 20) or block_size & (block_size - 1):
        raise InvalidArgument(f"invalid block size {block_size}: a power of two from 4K to 16M")


def check_volume_size(size: int) -> None:
    if size <= 0 or size % 512:
        raise InvalidArgument(f"invalid volume size {size}: a positive multiple of 512 bytes")
    if size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"invalid volume size {format_size(size)}: at most 1P")
