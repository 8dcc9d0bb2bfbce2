"""The follower: a read-only engine follows the writer's catalogs and index fragments.

owns: the refresh (one at a time) and the count of full index reloads.
does not own: the records it writes (the catalog's), the heads it adds or drops
(`Volumes`), the index (`ChunkStore`), the store seq it has loaded (`Fence`).
"""

import logging
from collections.abc import Awaitable, Callable

import trio

from snapfs.chunks import ChunkStore
from snapfs.errors import SnapfsError
from snapfs.volume import publish
from snapfs.volume.base import EngineConfig
from snapfs.volume.catalog import Catalog, legacy_guid
from snapfs.volume.check import K_NODE
from snapfs.volume.fence import Fence
from snapfs.volume.volumes import Volumes

log = logging.getLogger("snapfs.engine")


class Follower:
    def __init__(
        self,
        catalog: Catalog,
        chunks: ChunkStore,
        fence: Fence,
        config: EngineConfig,
        vols: Volumes,
    ) -> None:
        self.catalog = catalog
        self.chunks = chunks
        self.fence = fence
        self.store = fence.store
        self.config = config
        self.vols = vols
        self._refresh_lock = trio.Lock()
        self._index_loads = 0  # full index reloads

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

    async def reload_index(self) -> None:
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
        if not self.fence.read_only:
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
            add_snapshot_record(cat, s)
        for ref in cat.references():  # a reader keeps no refcounts: the records only
            cat.delete_reference(ref.id)
        for ref in publish.doc_references(doc):
            cat.add_reference(ref)
        volumes = {v["name"]: v for v in doc["volumes"]}
        for vrow in cat.volumes():
            v = volumes.pop(vrow.name, None)
            head = self.vols.heads.get(vrow.name)
            if v is None or v["block_size"] != vrow.block_size:
                cat.delete_volume(vrow.id)
                self.vols.drop_head(vrow)
                if v is not None:
                    volumes[vrow.name] = v  # taken again, with another block size
            elif (v["root"], v["root_level"], v["size"]) != (vrow.root, vrow.root_level, vrow.size):
                cat.update_volume(
                    vrow.id, root=v["root"], root_level=v["root_level"], size=v["size"]
                )
                if head is not None:
                    head.row.root, head.row.root_level = v["root"], v["root_level"]
                    if v["size"] != head.row.size:
                        head.cache.truncate(v["size"])
                        head.row.size = v["size"]
                    head.blocks.forget_clean()  # cached from the old root
        for v in volumes.values():
            vid = add_volume_record(cat, v)
            added = cat.volume(v["name"])
            assert added is not None and added.id == vid
            if self.vols.heads:  # else the open adds the heads
                self.vols.add_head(added)


def add_volume_record(cat: Catalog, v: dict) -> int:
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


def add_snapshot_record(cat: Catalog, s: dict) -> int:
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
