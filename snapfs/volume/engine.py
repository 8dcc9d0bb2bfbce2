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

Sentinels: a block is *present* when it is dirty (`Head.dirty`) or in the clean LRU
(`Engine.lru`); otherwise its content is whatever the committed tree maps it to.
"""

import contextlib
import ctypes
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import trio
import trio.lowlevel

from snapfs.chunks import CHUNK, NODE, ChunkStore, digest, pack_key
from snapfs.errors import (
    AlreadyExists,
    Busy,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ReadOnly,
    SnapfsError,
)
from snapfs.store.base import Store
from snapfs.tree import TreeReader, levels_for
from snapfs.units import MAX_VOLUME_SIZE, check_name, format_size
from snapfs.volume import publish
from snapfs.volume.catalog import Catalog, SnapshotRow, VolumeRow
from snapfs.volume.check import (
    K_CHUNK,
    K_NODE,
    K_PACK,
    CheckReport,
    expected_refs,
    key_to_store_key,
)
from snapfs.volume.readahead import ReadAhead

log = logging.getLogger("snapfs.engine")

DEFAULT_BLOCK_SIZE = 128 << 10
_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        os.pwrite(fd, bytes(length), offset)  # filesystems without hole punching


@dataclass
class EngineConfig:
    cache_size: int = 2 << 30
    dirty_fraction: float = 0.5
    flush_delay: float = 1.0
    uploads: int = 8
    batch_bytes: int = 256 << 20  # dirty blocks per flush commit
    slice_bytes: int = 32 << 20  # of which a commit holds at most this much in memory
    pack_size: int = 4 << 20
    gc_threshold: float = 0.5  # rewrite packs whose live share fell below this
    readahead_bytes: int = 4 << 20  # fetched ahead of a sequential reader (0: off)


@dataclass(frozen=True)
class EngineStatistics:
    volumes: int
    snapshots: int
    dirty_bytes: int
    cached_bytes: int
    frozen_bytes: int
    stored_bytes: int
    stored_data_bytes: int
    stored_objects: int
    uploaded_bytes: int
    discarded_bytes: int
    orphans_removed: int
    uploaded_objects: int
    deduplicated_blocks: int
    fetched_blocks: int
    catalog_seq: int
    published_seq: int
    flush_errors: int
    last_error: str | None
    packs: int
    pack_bytes: int
    live_bytes: int
    index_fragments: int
    lease_lost: str | None


class Head:
    """Runtime state of one volume's head: its cache file, dirty map and frozen saves."""

    def __init__(self, row: VolumeRow, cache_dir: str) -> None:
        self.row = row
        base = os.path.join(cache_dir, f"vol-{row.id}")
        self.cache_path, self.frozen_path = base + ".cache", base + ".frozen"
        self.cache_fd = os.open(self.cache_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.cache_fd, row.size)
        self.frozen_fd = os.open(self.frozen_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.dirty: dict[int, int] = {}  # blk → epoch of its last write
        self.gen: dict[int, int] = {}  # blk → write generation (detects writes during upload)
        self.touched: dict[int, float] = {}  # blk → trio time of its last write
        self.unsynced: set[int] = set()  # dirty blocks whose dirty row is not yet committed
        self.frozen: dict[int, dict[int, int]] = {}  # snapshot epoch → {blk → slot}
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.pending: list[SnapshotRow] = []  # snapshots in creating/deleting, by epoch
        self.opens = 0
        self.write_lock = trio.Lock()
        self.fetching: dict[int, trio.Event] = {}
        self.mapped = 0  # blocks the committed tree maps to data
        self.dirty_new: set[int] = set()  # dirty blocks the committed tree does not map
        self.holes: dict[int, bool] = {}  # discarded dirty blocks → the committed tree maps it

    @property
    def bs(self) -> int:
        return self.row.block_size

    @property
    def nblocks(self) -> int:
        return -(-self.row.size // self.row.block_size)

    def blen(self, blk: int) -> int:
        return min(self.bs, self.row.size - blk * self.bs)

    def close(self) -> None:
        os.close(self.cache_fd)
        os.close(self.frozen_fd)

    def remove_files(self) -> None:
        for path in (self.cache_path, self.frozen_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Engine:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        cache_dir: str,
        config: EngineConfig,
        read_only: bool = False,
    ):
        self.read_only = read_only
        self.lease_lost: str | None = None
        self.store = store
        self.chunks = ChunkStore(store, catalog.db, config.pack_size, config.uploads)
        self.tree = TreeReader(self.chunks)
        self.catalog = catalog
        self.cache_dir = cache_dir
        self.config = config
        self.heads: dict[str, Head] = {}
        self.lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # (vid, blk) → bytes
        self.lru_bytes = 0
        self.dirty_bytes = 0
        self.frozen_bytes = 0
        self.commit_lock = trio.Lock()
        self.gen = 0
        self.snap_opens: dict[int, int] = {}
        self.uploaded_bytes = 0
        self.discarded_bytes = 0
        self.orphans_removed = 0
        self.sweep_needed = False  # a cycle failed after uploading, or a crash: sweep
        self.uploaded_objects = 0
        self.deduplicated = 0
        self.fetched = 0
        self.flush_errors = 0
        self.last_error: str | None = None
        self._kick = trio.Event()
        self._backlog = False  # the last flush cycle left work behind (a full batch)
        self._zero: dict[int, bytes] = {}
        self.readahead = ReadAhead(config.readahead_bytes, config.uploads)
        self._snap_cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._snap_cache_bytes = 0
        self._snap_cache_limit = 2 * config.readahead_bytes + (4 << 20)
        self._snap_fetching: dict[bytes, trio.Event] = {}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        store: Store,
        cache_dir: str,
        config: EngineConfig | None = None,
        read_only: bool = False,
    ):
        """Open the cache dir for `store`: restore from the store when it is empty, recover
        after a crash when the last shutdown was not clean."""
        manifest = await publish.read_manifest(store)
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        catalog = Catalog(os.path.join(cache_dir, "catalog.sqlite3"))
        engine = cls(store, catalog, cache_dir, config or EngineConfig(), read_only)
        try:
            await engine._load(manifest)
        except BaseException:
            catalog.close()
            raise
        return engine

    async def _load(self, manifest: dict) -> None:
        cat = self.catalog
        known = cat.get_meta("store_uuid")
        if known is None:
            await self._restore_from_store(manifest["uuid"])
        elif known != manifest["uuid"]:
            raise InvalidArgument(
                f"cache dir {self.cache_dir} belongs to another store; use another --cache-dir"
            )
        elif not self.read_only:
            published = int(cat.get_meta("published", 0))
            newest = await publish.latest_seq(self.store)
            if newest > published:
                raise Busy(
                    f"cache dir {self.cache_dir} is older than the store (catalog {newest} > "
                    f"{published}): another writer has published since; mount with a new "
                    "--cache-dir (what this cache had not uploaded is lost)"
                )
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
                    self._lru_add(head, blk)
        temporary = []
        for snap in cat.snapshots():
            if snap.state in ("creating", "deleting"):
                self.heads[snap.volume].pending.append(snap)
            elif snap.temporary:
                temporary.append(snap)
        for head in self.heads.values():
            await self._count_mapped(head)
        for snap in temporary:  # dropped on unmount; after a crash, dropped now
            await self._drop_snapshot(snap)
        if not clean:
            self.sweep_needed = not self.read_only
            log.warning(
                "recovering after an unclean shutdown: %d dirty blocks to upload",
                sum(len(h.dirty) for h in self.heads.values()),
            )

    async def _restore_from_store(self, store_uuid: str) -> None:
        doc = await publish.latest_catalog(self.store)
        refs: dict[bytes, tuple[int, int]] = {}
        cat = self.catalog
        with cat.transaction():  # the index first: walking the roots reads nodes through it
            await self.chunks.load_index()
        if doc is not None:
            roots = [(v["root"], v["block_size"]) for v in doc["volumes"]]
            roots += [(s["root"], s["block_size"]) for s in doc["snapshots"]]
            refs = await expected_refs(self.tree, roots)
        indexed = self.chunks.indexed_keys()
        missing = set(refs) - indexed
        if missing:
            raise IntegrityError(
                f"{self.store.url}: {len(missing)} objects the catalog references are in no "
                "pack; run fsck on the writer"
            )
        with cat.transaction():
            cat.add_garbage(indexed - set(refs))  # left over from crashed cycles
            if doc is not None:
                for v in doc["volumes"]:
                    cat.add_volume(
                        v["name"],
                        v["size"],
                        v["block_size"],
                        v["root"],
                        v["root_level"],
                        v["owner"],
                        v["parent"],
                        v["created"],
                    )
                for s in doc["snapshots"]:
                    cat.add_snapshot(
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
                    )
                cat.replace_refs(refs)
            seq = doc["seq"] if doc else 0
            cat.set_meta("seq", seq)
            cat.set_meta("published", seq)
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

    def _add_head(self, row: VolumeRow) -> Head:
        head = Head(row, self.cache_dir)
        head.dirty = self.catalog.dirty(row.id)
        for blk in head.dirty:
            self.gen += 1
            head.gen[blk] = self.gen
        self.dirty_bytes += len(head.dirty) * head.bs
        used = set()
        for snap_epoch, blk, slot in self.catalog.frozen(row.id):
            head.frozen.setdefault(snap_epoch, {})[blk] = slot
            used.add(slot)
            self.frozen_bytes += head.bs
        head.next_slot = max(used, default=-1) + 1
        head.free_slots = [s for s in range(head.next_slot) if s not in used]
        self.heads[row.name] = head
        return head

    async def close(self, flush: bool = True) -> None:
        """Flush everything (unless told not to), drop temporary snapshots, remember the
        clean cache and mark the shutdown clean. Shielded: runs to the end when cancelled."""
        with trio.CancelScope(shield=True):
            try:
                if flush and not self.lease_lost and not self.read_only:
                    await self.sync()
                    for snap in [s for s in self.catalog.snapshots() if s.temporary]:
                        await self.delete_snapshot(snap.volume, snap.name, uid=0)
            finally:
                for head in self.heads.values():
                    await self._persist_dirty(head)
                    head.close()
                with self.catalog.transaction():
                    self.catalog.save_present(self.lru.keys())
                    self.catalog.set_meta("clean", 1)
                self.catalog.close()

    # ------------------------------------------------------------------ helpers

    def head(self, name: str) -> Head:
        head = self.heads.get(name)
        if head is None:
            raise NotFound(f"volume {name!r} not found")
        return head

    def snapshot_row(self, volume: str, name: str) -> SnapshotRow:
        snap = self.catalog.snapshot(volume, name)
        if snap is None or snap.state == "deleting":
            if volume not in self.heads and not self.catalog.snapshots(volume):
                raise NotFound(f"volume {volume!r} not found")
            raise NotFound(f"snapshot {volume}@{name} not found")
        return snap

    def _zeros(self, n: int) -> bytes:
        z = self._zero.get(n)
        if z is None:
            z = self._zero[n] = bytes(n)
        return z

    def _lru_add(self, head: Head, blk: int) -> None:
        key = (head.row.id, blk)
        if key not in self.lru:
            self.lru_bytes += head.bs
        self.lru[key] = head.bs
        self.lru.move_to_end(key)

    def _lru_drop(self, head: Head, blk: int) -> bool:
        size = self.lru.pop((head.row.id, blk), None)
        if size is not None:
            self.lru_bytes -= size
            return True
        return False

    def _evict(self) -> None:
        by_id = None
        while (
            self.lru
            and self.lru_bytes + self.dirty_bytes + self.frozen_bytes > self.config.cache_size
        ):
            (vid, blk), size = self.lru.popitem(last=False)
            self.lru_bytes -= size
            if by_id is None:
                by_id = {h.row.id: h for h in self.heads.values()}
            head = by_id.get(vid)
            if head is not None:
                punch_hole(head.cache_fd, blk * head.bs, head.blen(blk))

    def evict_all(self) -> None:
        """Drop every clean cached block (tests use it to force reads from the store)."""
        limit, self.config.cache_size = self.config.cache_size, 0
        try:
            self._evict()
        finally:
            self.config.cache_size = limit

    def _bump_seq(self) -> None:
        self.catalog.set_meta("seq", int(self.catalog.get_meta("seq", 0)) + 1)

    def writable(self) -> None:
        """Raise ReadOnly on a read-only mount, or after this writer lost the store."""
        if self.read_only:
            raise ReadOnly("this mount is read-only")
        if self.lease_lost:
            raise ReadOnly(f"this writer lost the store ({self.lease_lost}): remount")

    def lost(self, reason: str) -> None:
        """This writer no longer owns the store: keep the cache, publish and delete nothing,
        refuse snapshots until remounted."""
        if not self.lease_lost:
            log.error("lost the store: %s; keeping the local cache, publishing nothing", reason)
            self.lease_lost = reason
            self.last_error = reason

    def kick(self) -> None:
        self._kick.set()

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
        check_name(name, "volume name")
        if name in self.heads:
            raise AlreadyExists(f"volume {name!r} already exists")
        root, root_level, parent = None, 0, None
        if source is not None:
            snap = await self.wait_available(*source)
            self._check_access(snap.owner, uid, f"snapshot {source[0]}@{source[1]}")
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
                    self.catalog.apply_refs({K_NODE + root: 1}, {})
                self._bump_seq()
            row = self.catalog.volume(name)
            assert row is not None and row.id == vid
            await self._count_mapped(self._add_head(row))
            await self._publish()
        return row

    async def resize_volume(self, name: str, size: int, uid: int = 0) -> VolumeRow:
        self.writable()
        head = self.head(name)
        self._check_access(head.row.owner, uid, f"volume {name!r}")
        check_volume_size(size)
        if size < head.row.size:
            raise InvalidArgument(
                f"volume {name!r} is {format_size(head.row.size)}: shrinking is not supported"
            )
        async with self.commit_lock:
            os.ftruncate(head.cache_fd, size)
            with self.catalog.transaction():
                self.catalog.update_volume(head.row.id, size=size)
                self._bump_seq()
            head.row.size = size
            await self._publish()
        return head.row

    async def delete_volume(self, name: str, recursive: bool = False, uid: int = 0) -> None:
        self.writable()
        head = self.head(name)
        self._check_access(head.row.owner, uid, f"volume {name!r}")
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
        while head.pending:
            await self.flush_once()
        async with self.commit_lock:
            deltas: dict[bytes, int] = {}
            if head.row.root is not None:
                await self._decref(deltas, K_NODE + head.row.root)
            with self.catalog.transaction():
                self.catalog.apply_refs(deltas, {})
                self.catalog.delete_volume(head.row.id)
                self._bump_seq()
            del self.heads[name]
            self.dirty_bytes -= len(head.dirty) * head.bs
            self.frozen_bytes -= sum(len(f) for f in head.frozen.values()) * head.bs
            for key in [k for k in self.lru if k[0] == head.row.id]:
                self.lru_bytes -= self.lru.pop(key)
            head.close()
            head.remove_files()
            await self._publish()
            await self._collect()

    async def _count_mapped(self, head: Head) -> None:
        """Count the blocks the committed tree maps, and which dirty blocks it does not."""
        head.mapped = 0
        async for _ in self.tree.items(head.row.root, head.row.root_level):
            head.mapped += 1
        head.dirty_new = set()
        for blk in list(head.dirty):  # after a crash: dirty rows the tree never saw
            if await self.tree.lookup(head.row.root, head.row.root_level, blk) is None:
                head.dirty_new.add(blk)

    def allocated_bytes(self, name: str) -> int:
        """Bytes of the volume that are not holes (dirty all-zero blocks count until the
        flusher turns them into holes)."""
        head = self.head(name)
        return (head.mapped - sum(head.holes.values()) + len(head.dirty_new)) * head.bs

    def volume_info(self, name: str) -> dict:
        head = self.head(name)
        row = head.row
        snaps = self.catalog.snapshots(name)
        cached = sum(1 for (vid, _b) in self.lru if vid == row.id) * row.block_size
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
            "bytes_frozen": sum(len(f) for f in head.frozen.values()) * row.block_size,
            "snapshots": len([s for s in snaps if s.state != "deleting"]),
            "latest_snapshot": snaps[-1].name if snaps else None,
        }

    # ------------------------------------------------------------------ data path

    async def read(self, name: str, offset: int, size: int) -> bytes:
        head = self.head(name)
        end = min(offset + size, head.row.size)
        if offset >= end:
            return b""
        bs = head.bs
        vid = head.row.id
        self.readahead.note(
            ("vol", vid),
            offset // bs,
            (end - 1) // bs,
            bs,
            head.nblocks,
            lambda blocks: self._prefetch_blocks(head, blocks),
            lambda b: not (b in head.dirty or (vid, b) in self.lru or b in head.fetching),
        )
        out: list[bytes] = []  # joined once at the end
        pos = offset
        while pos < end:
            blk, boff = divmod(pos, bs)
            n = min(bs - boff, end - pos)
            if blk in head.dirty or (head.row.id, blk) in self.lru:
                # Extend over the following present blocks: one pread for the run.
                run_end = pos + n
                while run_end < end:
                    nb = run_end // bs
                    if not (nb in head.dirty or (head.row.id, nb) in self.lru):
                        break
                    run_end = min((nb + 1) * bs, end)
                for b in range(blk, (run_end - 1) // bs + 1):
                    if (head.row.id, b) in self.lru:
                        self.lru.move_to_end((head.row.id, b))
                if pos == offset and run_end == end:  # the common case: no copies
                    return os.pread(head.cache_fd, end - pos, pos)
                out.append(os.pread(head.cache_fd, run_end - pos, pos))
                pos = run_end
                continue
            data = await self._fetch_block(head, blk)
            out.append(data[boff : boff + n] if data is not None else self._zeros(n))
            pos += n
        return out[0] if len(out) == 1 else b"".join(out)

    async def _prefetch_blocks(self, head: Head, blocks: list[int]) -> None:
        """Read-ahead: fetch blocks that are not present, with as few GETs as possible, into
        the cache (the rules of `_fetch_block`; its readers wait for these fetches)."""
        vid = head.row.id
        if head is not self.heads.get(head.row.name):
            return
        todo = [
            b
            for b in blocks
            if b < head.nblocks
            and b not in head.dirty
            and (vid, b) not in self.lru
            and b not in head.fetching
        ]
        events = {b: trio.Event() for b in todo}
        head.fetching.update(events)
        try:
            root, level = head.row.root, head.row.root_level
            oids = {b: await self.tree.lookup(root, level, b) for b in todo}
            datas = await self.chunks.get_many(CHUNK, [o for o in oids.values() if o])
            if head.row.root != root or head is not self.heads.get(head.row.name):
                return
            for b, oid in oids.items():
                if b in head.dirty or (vid, b) in self.lru:
                    continue
                if oid is None:
                    punch_hole(head.cache_fd, b * head.bs, head.blen(b))
                else:
                    self.fetched += 1
                    os.pwrite(head.cache_fd, memoryview(datas[oid])[: head.blen(b)], b * head.bs)
                self._lru_add(head, b)
            self._evict()
        finally:
            for b, event in events.items():
                del head.fetching[b]
                event.set()

    async def _fetch_block(self, head: Head, blk: int) -> bytes | None:
        """Content of a block that was not present (None for a hole), cached on the way."""
        key = (head.row.id, blk)
        while True:
            if blk in head.dirty or key in self.lru:
                return os.pread(head.cache_fd, head.blen(blk), blk * head.bs)
            event = head.fetching.get(blk)
            if event is None:
                break
            await event.wait()
        event = head.fetching[blk] = trio.Event()
        try:
            root, level = head.row.root, head.row.root_level
            oid = await self.tree.lookup(root, level, blk)
            data = None if oid is None else await self.chunks.get(CHUNK, oid)
            if blk not in head.dirty and key not in self.lru and head.row.root == root:
                if data is None:
                    punch_hole(head.cache_fd, blk * head.bs, head.blen(blk))
                else:
                    self.fetched += 1
                    os.pwrite(head.cache_fd, memoryview(data)[: head.blen(blk)], blk * head.bs)
                self._lru_add(head, blk)
                self._evict()
            return data
        finally:
            del head.fetching[blk]
            event.set()

    async def write(self, name: str, offset: int, data: bytes) -> int:
        head = self.head(name)
        if self.read_only:
            raise ReadOnly("this mount is read-only")
        if offset < 0 or offset + len(data) > head.row.size:
            raise SnapfsError(f"write beyond the end of volume {name!r}")
        lock = head.write_lock
        try:  # uncontended (the usual case): no round trip through the scheduler
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._wait_dirty_room()
            if head is not self.heads.get(name):
                raise NotFound(f"volume {name!r} not found")
            await self._write_locked(head, offset, memoryview(data))
        finally:
            lock.release()
        return len(data)

    async def _write_locked(self, head: Head, offset: int, view: memoryview) -> None:
        bs = head.bs
        pos = 0
        while pos < len(view):
            blk, boff = divmod(offset + pos, bs)
            n = min(bs - boff, len(view) - pos)
            written = head.dirty.get(blk)
            unmapped = False
            if written is None:
                # Not dirty: its mapping cannot change while we hold the write lock.
                unmapped = await self.tree.lookup(head.row.root, head.row.root_level, blk) is None
                # Read-modify-write needs the block cached. A fetch that a commit overtook
                # does not cache it: fetch again.
                while n < head.blen(blk) and (head.row.id, blk) not in self.lru:
                    await self._fetch_block(head, blk)
            elif written < head.row.epoch:
                await self._freeze(head, blk)
            # No await from here until the block is marked dirty.
            os.pwrite(head.cache_fd, view[pos : pos + n], offset + pos)
            if blk not in head.dirty:
                self._lru_drop(head, blk)
                self.dirty_bytes += bs
                if unmapped:
                    head.dirty_new.add(blk)
            elif blk in head.holes and not head.holes.pop(blk):
                head.dirty_new.add(blk)  # a discarded block that the tree does not map
            self._mark_dirty(head, blk)
            pos += n

    def _mark_dirty(self, head: Head, blk: int) -> None:
        head.dirty[blk] = head.row.epoch
        self.gen += 1
        head.gen[blk] = self.gen
        head.touched[blk] = trio.current_time()
        head.unsynced.add(blk)

    async def discard(self, name: str, offset: int, length: int) -> None:
        """Discard (TRIM, fallocate PUNCH_HOLE): the range reads as zeros at once. Whole
        blocks become holes: the cache gives their space back, their dirty data is dropped
        instead of uploaded, and the next flush maps them to nothing. Partial blocks at the
        edges are zeroed. A snapshot taken before keeps the old data (copy-on-write, as for
        a write). Durable like a write: at the next fsync, snapshot or flush."""
        head = self.head(name)
        if self.read_only:
            raise ReadOnly("this mount is read-only")
        if offset < 0 or length < 0:
            raise InvalidArgument("discard: negative offset or length")
        end = min(offset + length, head.row.size)
        if offset >= end:
            return
        bs = head.bs
        first = -(-offset // bs)  # first whole block
        last = end // bs if end < head.row.size else head.nblocks  # after the last whole one
        async with head.write_lock:
            if head is not self.heads.get(name):
                raise NotFound(f"volume {name!r} not found")
            if first >= last:  # no whole block: one or two partial ones
                cut = min(end, (offset // bs + 1) * bs)
                await self._zero_range(head, offset, cut)
                await self._zero_range(head, cut, end)
                return
            await self._zero_range(head, offset, first * bs)
            await self._zero_range(head, last * bs, end)
            # Blocks that are neither mapped nor dirty read as zeros already, and stay so
            # (a flush changes only dirty blocks; writes wait for the lock).
            candidates = {
                blk
                async for blk, _oid in self.tree.items(
                    head.row.root, head.row.root_level, first, last
                )
            }
            if last - first <= 2 * len(head.dirty):
                candidates.update(b for b in range(first, last) if b in head.dirty)
            else:
                candidates.update(b for b in head.dirty if first <= b < last)
            todo = sorted(candidates)
            for i in range(0, len(todo), 1024):  # the dirty limit holds for discards too
                chunk = todo[i : i + 1024]
                mapped = await self._settle_for_discard(name, head, chunk)
                # No await from here to the end of the chunk: blocks are marked dirty first,
                # then their cache ranges are punched in runs.
                run: list[int] = []
                for blk in chunk:
                    if blk in head.holes and head.dirty.get(blk) == head.row.epoch:
                        continue  # already discarded since the last snapshot
                    if run and blk != run[-1] + 1:
                        self._punch_run(head, run)
                    run.append(blk)
                    if blk not in head.dirty:
                        self._lru_drop(head, blk)
                        self.dirty_bytes += bs
                    head.dirty_new.discard(blk)
                    head.holes[blk] = blk in mapped
                    self._mark_dirty(head, blk)
                self._punch_run(head, run)
        self.discarded_bytes += end - offset

    async def _settle_for_discard(self, name: str, head: Head, chunk: list[int]) -> set[int]:
        """Wait for dirty room, freeze what a pending snapshot needs, and return which blocks
        of the chunk the committed tree maps, in a state where nothing changed since (a
        flush or a new snapshot during these awaits makes it start over)."""
        while True:
            await self._wait_dirty_room()
            if head is not self.heads.get(name):
                raise NotFound(f"volume {name!r} not found")
            for blk in chunk:
                if blk in head.dirty and head.dirty[blk] < head.row.epoch:
                    await self._freeze(head, blk)
            root, epoch = head.row.root, head.row.epoch
            mapped = {
                blk
                async for blk, _oid in self.tree.items(
                    root, head.row.root_level, chunk[0], chunk[-1] + 1
                )
            }
            stale = any(b in head.dirty and head.dirty[b] < epoch for b in chunk)
            if head.row.root == root and head.row.epoch == epoch and not stale:
                return mapped

    @staticmethod
    def _punch_run(head: Head, run: list[int]) -> None:
        """Punch the cache ranges of consecutive blocks in one call; empties `run`."""
        if run:
            start = run[0] * head.bs
            punch_hole(head.cache_fd, start, min((run[-1] + 1) * head.bs, head.row.size) - start)
            run.clear()

    async def _zero_range(self, head: Head, start: int, end: int) -> None:
        """Zero part of a block, unless it reads as zeros already (a hole nobody wrote)."""
        if start >= end:
            return
        blk = start // head.bs
        if blk in head.holes and head.dirty[blk] == head.row.epoch:
            return
        clean = blk not in head.dirty  # then the tree says what it holds
        if clean and await self.tree.lookup(head.row.root, head.row.root_level, blk) is None:
            return
        await self._write_locked(head, start, memoryview(self._zeros(end - start)))

    async def _freeze(self, head: Head, blk: int) -> None:
        """Save a block that a pending snapshot still needs before it is overwritten: copy to
        the frozen file, make the copy durable, then record it (copy-on-write)."""
        written = head.dirty[blk]
        target = next((s.epoch for s in head.pending if s.epoch >= written), None)
        if target is None or blk in head.frozen.get(target, {}):
            head.dirty[blk] = head.row.epoch
            return
        data = os.pread(head.cache_fd, head.blen(blk), blk * head.bs)
        slot = head.free_slots.pop() if head.free_slots else head.next_slot
        if slot == head.next_slot:
            head.next_slot += 1
        os.pwrite(head.frozen_fd, data, slot * head.bs)
        await trio.to_thread.run_sync(os.fdatasync, head.frozen_fd)
        with self.catalog.transaction():
            self.catalog.add_frozen(head.row.id, target, blk, slot)
            self.catalog.set_dirty(head.row.id, [(blk, head.row.epoch)])
        head.frozen.setdefault(target, {})[blk] = slot
        head.dirty[blk] = head.row.epoch
        head.unsynced.discard(blk)
        self.frozen_bytes += head.bs

    async def _wait_dirty_room(self) -> None:
        """Backpressure: past the dirty limit a writer flushes (or waits for the flush)
        instead of failing."""
        limit = self.config.cache_size * self.config.dirty_fraction
        while self.dirty_bytes + self.frozen_bytes >= limit:
            self.kick()
            if not await self.flush_once():
                await trio.sleep(0.05)

    async def fsync(self, name: str) -> None:
        """Return once everything written to the volume survives a crash of the daemon or of
        the machine: the cache file is synced, then its dirty map committed."""
        await self._persist_dirty(self.head(name))

    async def _persist_dirty(self, head: Head) -> None:
        todo, head.unsynced = head.unsynced, set()
        try:
            await trio.to_thread.run_sync(os.fdatasync, head.cache_fd)
            with self.catalog.transaction():
                self.catalog.set_dirty(
                    head.row.id, [(b, head.dirty[b]) for b in todo if b in head.dirty]
                )
        except BaseException:
            head.unsynced |= todo
            raise

    # ------------------------------------------------------------------ snapshots

    async def create_snapshot(
        self, volume: str, name: str, temporary: bool = False, uid: int = 0
    ) -> SnapshotRow:
        """O(1): sync the cache file and the dirty map, then freeze the epoch. The data is
        neither copied nor hashed; the flusher uploads it and marks the snapshot available."""
        self.writable()
        head = self.head(volume)
        self._check_access(head.row.owner, uid, f"volume {volume!r}")
        check_name(name, "snapshot name")
        if self.catalog.snapshot(volume, name) is not None:
            raise AlreadyExists(f"snapshot {volume}@{name} already exists")
        await self._persist_dirty(head)
        if self.catalog.snapshot(volume, name) is not None:
            raise AlreadyExists(f"snapshot {volume}@{name} already exists")
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
            )
            self.catalog.update_volume(row.id, epoch=row.epoch + 1)
        row.epoch += 1
        snap = self.catalog.snapshot(volume, name)
        assert snap is not None and snap.id == sid
        head.pending.append(snap)
        self.kick()
        return snap

    async def wait_available(self, volume: str, name: str) -> SnapshotRow:
        while True:
            snap = self.snapshot_row(volume, name)
            if snap.state == "available":
                return snap
            if snap.state != "creating":
                raise SnapfsError(f"snapshot {volume}@{name} is {snap.state}")
            await self.flush_once()

    async def delete_snapshot(self, volume: str, name: str, uid: int = 0) -> None:
        self.writable()
        snap = self.snapshot_row(volume, name)
        self._check_access(snap.owner, uid, f"snapshot {volume}@{name}")
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
            await self._decref(deltas, K_NODE + snap.root)
        with self.catalog.transaction():
            self.catalog.apply_refs(deltas, {})
            self.catalog.delete_snapshot(snap.id)
            self._bump_seq()
        await self._publish()
        await self._collect()

    async def rollback(self, volume: str, name: str, uid: int = 0) -> None:
        self.writable()
        head = self.head(volume)
        self._check_access(head.row.owner, uid, f"volume {volume!r}")
        if head.opens:
            raise Busy(f"volume {volume!r} is open: close it (detach its loop device) first")
        snap = await self.wait_available(volume, name)
        while head.pending:
            await self.flush_once()
        async with head.write_lock, self.commit_lock:
            deltas: dict[bytes, int] = {}
            if snap.root is not None:
                deltas[K_NODE + snap.root] = 1
            if head.row.root is not None:
                await self._decref(deltas, K_NODE + head.row.root)
            with self.catalog.transaction():
                self.catalog.apply_refs(deltas, {})
                self.catalog.clear_dirty(head.row.id, list(head.dirty))
                self.catalog.update_volume(
                    head.row.id, root=snap.root, root_level=snap.root_level, size=snap.size
                )
                self._bump_seq()
            self.dirty_bytes -= len(head.dirty) * head.bs
            head.dirty.clear()
            head.gen.clear()
            head.touched.clear()
            head.unsynced.clear()
            for key in [k for k in self.lru if k[0] == head.row.id]:
                self.lru_bytes -= self.lru.pop(key)
            head.row.root, head.row.root_level = snap.root, snap.root_level
            head.dirty_new.clear()
            head.holes.clear()
            await self._count_mapped(head)
            head.row.size = snap.size
            os.ftruncate(head.cache_fd, 0)
            os.ftruncate(head.cache_fd, snap.size)
            await self._publish()
            await self._collect()

    async def read_snapshot(self, snap: SnapshotRow, offset: int, size: int) -> bytes:
        end = min(offset + size, snap.size)
        if offset >= end:
            return b""
        bs = snap.block_size
        self.readahead.note(
            ("snap", snap.id),
            offset // bs,
            (end - 1) // bs,
            bs,
            -(-snap.size // bs),
            lambda blocks: self._prefetch_snap(snap, blocks),
        )
        out: list[bytes] = []
        pos = offset
        while pos < end:
            blk, boff = divmod(pos, bs)
            n = min(bs - boff, end - pos)
            oid = await self.tree.lookup(snap.root, snap.root_level, blk)
            if oid is None:
                out.append(self._zeros(n))
            else:
                data = await self._snap_chunk(oid)
                out.append(data[boff : boff + n])
            pos += n
        return out[0] if len(out) == 1 else b"".join(out)

    async def _prefetch_snap(self, snap: SnapshotRow, blocks: list[int]) -> None:
        """Read-ahead of a snapshot: its chunks into the chunk LRU, in ranged GETs."""
        oids = set()
        for blk in blocks:
            oid = await self.tree.lookup(snap.root, snap.root_level, blk)
            if oid is not None and oid not in self._snap_cache and oid not in self._snap_fetching:
                oids.add(oid)
        events = {oid: trio.Event() for oid in oids}
        self._snap_fetching.update(events)
        try:
            for oid, data in (await self.chunks.get_many(CHUNK, list(oids))).items():
                self.fetched += 1
                self._snap_cache_put(oid, data)
        finally:
            for oid, event in events.items():
                del self._snap_fetching[oid]
                event.set()

    def _snap_cache_put(self, oid: bytes, data: bytes) -> None:
        if oid not in self._snap_cache:
            self._snap_cache_bytes += len(data)
        self._snap_cache[oid] = data
        while self._snap_cache_bytes > self._snap_cache_limit and len(self._snap_cache) > 1:
            self._snap_cache_bytes -= len(self._snap_cache.popitem(last=False)[1])

    async def _snap_chunk(self, oid: bytes) -> bytes:
        """A chunk read through a snapshot, from a small LRU of chunks (snapshot reads do
        not go through a volume's cache file); concurrent readers share one fetch."""
        while True:
            data = self._snap_cache.get(oid)
            if data is not None:
                self._snap_cache.move_to_end(oid)
                return data
            event = self._snap_fetching.get(oid)
            if event is None:
                break
            await event.wait()
        event = self._snap_fetching[oid] = trio.Event()
        try:
            data = await self.chunks.get(CHUNK, oid)
            self.fetched += 1
            self._snap_cache_put(oid, data)
            return data
        finally:
            del self._snap_fetching[oid]
            event.set()

    async def diff(self, volume: str, a: str, b: str) -> list[int]:
        sa, sb = await self.wait_available(volume, a), await self.wait_available(volume, b)
        return await self.tree.diff(sa.root, sa.root_level, sb.root, sb.root_level)

    # ------------------------------------------------------------------ flushing

    async def sync(self) -> None:
        """Upload everything written before the call, complete every pending snapshot and
        publish the catalog. Errors of the store propagate after its retries."""
        if self.lease_lost:
            raise ReadOnly(f"cannot sync: {self.lease_lost}")
        target = self.gen
        while await self.flush_once(upto_gen=target):
            pass
        async with self.commit_lock:
            await self._publish()
            await self._collect()

    async def flush_once(self, upto_gen: int | None = None, min_age: float = 0.0) -> bool:
        """One flush cycle: the oldest pending snapshot of a volume, else a batch of dirty
        blocks of the heads: only those written up to `upto_gen`, when given, and only
        those left alone for `min_age` seconds (the background flusher lets hot blocks be
        rewritten in the cache instead of uploading every version). Returns whether it
        found work."""
        if self.read_only or self.lease_lost:
            return False
        async with self.commit_lock:
            for head in list(self.heads.values()):
                if head.pending:
                    await self._commit(head, head.pending[0])
                    self._backlog = True
                    return True
            budget = self.config.batch_bytes
            did = False
            settled = trio.current_time() - min_age
            for head in list(self.heads.values()):
                blocks = []
                for blk in head.dirty:
                    if budget <= 0:
                        break
                    if min_age and head.touched.get(blk, 0.0) > settled:
                        continue
                    if upto_gen is None or head.gen[blk] <= upto_gen:
                        blocks.append(blk)
                        budget -= head.bs
                if blocks:
                    await self._commit(head, None, blocks)
                    did = True
            self._backlog = budget <= 0
            return did

    async def run_flusher(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background task: every `flush_delay` (at once when kicked), flush the blocks left
        alone for `flush_delay`. Cycles follow each other without a pause only while there
        is a backlog (a full batch or a pending snapshot): under steady writes, blocks that
        settle meanwhile wait for the next tick instead of making a commit each (every
        commit has fixed costs: barriers, a catalog transaction and a publish).
        Store errors are logged and retried with backoff; cancellation stops it between
        cycles (the final flush is `close()`'s, shielded)."""
        task_status.started()
        backoff = 1.0
        while True:
            with trio.move_on_after(self.config.flush_delay):
                await self._kick.wait()
            self._kick = trio.Event()
            try:
                while await self.flush_once(min_age=self.config.flush_delay) and self._backlog:
                    await trio.lowlevel.checkpoint()
                if self.catalog.get_meta("published") != self.catalog.get_meta("seq"):
                    async with self.commit_lock:
                        await self._publish()
                        await self._collect()
                if not self.lease_lost and self.chunks.sparse_packs(self.config.gc_threshold):
                    await self.gc()  # background gc: work follows the garbage
                if self.sweep_needed and not self.lease_lost:
                    await self.sweep_orphans()
                backoff = 1.0
            except Exception as exc:  # the daemon must outlive any failure of a cycle
                self.flush_errors += 1
                self.last_error = str(exc) or exc.__class__.__name__
                if isinstance(exc, SnapfsError):
                    log.warning("flush failed, retrying in %.0fs: %s", backoff, exc)
                else:
                    log.exception("flush failed unexpectedly, retrying in %.0fs", backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _commit(self, head: Head, snap: SnapshotRow | None, blocks: list[int] | None = None):
        """Upload blocks, derive the new tree, make it durable, then commit the catalog in one
        transaction and publish it. Called with commit_lock held. On error nothing is
        recorded: what was uploaded stays as unreferenced pack space."""
        try:
            await self._commit_inner(head, snap, blocks)
        except BaseException:
            self.chunks.discard_staged()
            self.sweep_needed = True
            raise

    async def _commit_inner(
        self, head: Head, snap: SnapshotRow | None, blocks: list[int] | None = None
    ):
        """Upload blocks, derive the new tree, make it durable, then commit the catalog in one
        transaction and publish it. Called with commit_lock held."""
        bs = head.bs
        vid = head.row.id
        if snap is not None:
            target = snap.epoch
            frozen = head.frozen.get(target, {})
            cache_blocks = [b for b, e in head.dirty.items() if e <= target and b not in frozen]
        else:
            target = head.row.epoch
            frozen = {}
            cache_blocks = blocks or []
        # (blk, fd, offset, gen): read, hashed, staged and uploaded a slice at a time, so that
        # a commit holds about slice_bytes of blocks in memory however big it is.
        reads: list[tuple[int, int, int, int | None]]
        reads = [(blk, head.cache_fd, blk * bs, head.gen[blk]) for blk in cache_blocks]
        reads += [(blk, head.frozen_fd, slot * bs, None) for blk, slot in frozen.items()]
        zero = self._zeros(bs)

        def load(todo, saved: dict[int, int]) -> list[tuple[int, bytes]]:
            out = []
            for blk, fd, offset, gen in todo:
                if gen is not None and blk in saved:  # overwritten since, saved before that
                    fd, offset = head.frozen_fd, saved[blk] * bs
                data = os.pread(fd, head.blen(blk), offset)
                out.append((blk, data + bytes(bs - len(data)) if len(data) < bs else data))
            return out

        def hash_all(blocks: list[tuple[int, bytes]]) -> list[tuple[int, bytes | None, bytes]]:
            return [(blk, None if data == zero else digest(data), data) for blk, data in blocks]

        def load_and_hash(todo) -> list[tuple[int, bytes | None, bytes]]:
            return hash_all(load(todo, {}))

        changes: dict[int, bytes | None] = {}
        uploads: dict[bytes, None] = {}  # chunk ids this commit stores (an ordered set)
        per_slice = max(1, self.config.slice_bytes // bs)
        for first in range(0, len(reads), per_slice):
            todo = reads[first : first + per_slice]
            if snap is None:
                # A head commit reads in the thread: a write racing with it bumps the block's
                # generation, so the block stays dirty.
                hashed = await trio.to_thread.run_sync(load_and_hash, todo)
            else:
                # A snapshot needs exactly the content it froze: read here, with no await
                # since the check. A block overwritten since the commit began was copied to
                # the frozen file before that.
                loaded = load(todo, head.frozen.get(target, {}))
                hashed = await trio.to_thread.run_sync(hash_all, loaded)
                del loaded
            for blk, oid, data in hashed:
                changes[blk] = oid
                if oid is None:
                    continue
                if oid in uploads or self.catalog.has_ref(K_CHUNK + oid):
                    self.deduplicated += 1
                    continue
                uploads[oid] = None
                self.uploaded_bytes += self.chunks.stage(CHUNK, oid, data)
                self.uploaded_objects += 1
            del hashed
            await self.chunks.upload_sealed()

        old_root, old_level = head.row.root, head.row.root_level
        update = await self.tree.update(
            old_root,
            head.row.root_level,
            max(levels_for(head.nblocks), head.row.root_level),
            changes,
        )
        new_nodes = {
            oid: data
            for oid, data in update.new_nodes.items()
            if not self.catalog.has_ref(K_NODE + oid)
        }
        for oid, data in new_nodes.items():
            self.uploaded_bytes += self.chunks.stage(NODE, oid, data)
            self.uploaded_objects += 1
        try:
            await self.chunks.flush()
            await self.store.barrier()
        except BaseException:
            self.chunks.discard_staged()
            raise

        deltas: dict[bytes, int] = {}
        sizes: dict[bytes, int] = {}
        for oid in uploads:
            sizes[K_CHUNK + oid] = bs + 1
            deltas.setdefault(K_CHUNK + oid, 0)
        for oid, data in new_nodes.items():
            sizes[K_NODE + oid] = len(data) + 1
            deltas.setdefault(K_NODE + oid, 0)
            level, entries = await self.tree.node(oid)
            kind = K_NODE if level else K_CHUNK
            for child in entries.values():
                deltas[kind + child] = deltas.get(kind + child, 0) + 1
        keep_snapshot = snap is not None and snap.state != "deleting"
        if update.root is not None:
            deltas[K_NODE + update.root] = deltas.get(K_NODE + update.root, 0) + 1 + keep_snapshot
        if old_root is not None:
            await self._decref(deltas, K_NODE + old_root)

        mapped_delta = 0
        for blk, oid in changes.items():
            was = await self.tree.lookup(old_root, old_level, blk)
            mapped_delta += (oid is not None) - (was is not None)
        # From here to the end of the transaction: no await.
        cleaned = [
            blk
            for blk, _fd, _offset, gen in reads
            if gen is not None
            and head.gen.get(blk) == gen
            and head.dirty.get(blk, 1 << 62) <= target
        ]
        with self.catalog.transaction():
            self.chunks.record()
            self.catalog.apply_refs(deltas, sizes)
            self.catalog.update_volume(vid, root=update.root, root_level=update.level)
            if snap is not None:
                if keep_snapshot:
                    self.catalog.update_snapshot(
                        snap.id, root=update.root, root_level=update.level, state="available"
                    )
                else:
                    self.catalog.delete_snapshot(snap.id)
                self.catalog.clear_frozen(vid, target)
            self.catalog.clear_dirty(vid, cleaned)
            if update.root != old_root or (snap is not None and not snap.temporary):
                self._bump_seq()
        head.row.root, head.row.root_level = update.root, update.level
        head.mapped += mapped_delta
        for blk, oid in changes.items():
            if blk in head.dirty:  # written again meanwhile, or a snapshot's older version
                if blk in head.holes:
                    head.holes[blk] = oid is not None
                elif oid is None:
                    head.dirty_new.add(blk)
                else:
                    head.dirty_new.discard(blk)
        for blk in cleaned:
            del head.dirty[blk]
            del head.gen[blk]
            head.touched.pop(blk, None)
            head.dirty_new.discard(blk)
            head.holes.pop(blk, None)
            head.unsynced.discard(blk)
            self.dirty_bytes -= bs
            if changes.get(blk) is None:
                punch_hole(head.cache_fd, blk * bs, head.blen(blk))
            else:
                self._lru_add(head, blk)
        if snap is not None:
            slots = head.frozen.pop(target, {})
            head.free_slots.extend(slots.values())
            self.frozen_bytes -= len(slots) * bs
            head.pending.pop(0)
            if not head.pending and not head.frozen:
                os.ftruncate(head.frozen_fd, 0)
                head.free_slots, head.next_slot = [], 0
        self._evict()
        await self._publish()
        await self._collect()

    async def _decref(self, deltas: dict[bytes, int], key: bytes) -> None:
        """Drop one reference to `key` in `deltas`; when its count reaches zero, drop the
        references it holds (cascading down the tree). Increments must already be in."""
        deltas[key] = deltas.get(key, 0) - 1
        if key[:1] == K_NODE and self.catalog.ref(key) + deltas[key] == 0:
            level, entries = await self.tree.node(key[1:])
            kind = K_NODE if level else K_CHUNK
            for child in entries.values():
                await self._decref(deltas, kind + child)

    async def _publish(self) -> None:
        """Publish the catalog as the next write-once object. If that seq is taken, another
        writer owns the store now: stop publishing and deleting for good."""
        seq = int(self.catalog.get_meta("seq", 0))
        if self.read_only or int(self.catalog.get_meta("published", 0)) == seq:
            return
        if self.lease_lost:
            raise ReadOnly(f"not publishing: {self.lease_lost}")
        try:
            await publish.write_catalog(self.store, publish.catalog_doc(self.catalog, seq))
        except AlreadyExists:
            self.lost(f"catalog {seq} was published by another writer")
            raise ReadOnly(f"not publishing: {self.lease_lost}") from None
        with self.catalog.transaction():
            self.catalog.set_meta("published", seq)

    async def _collect(self) -> None:
        """Once a catalog without them is out: drop dead blobs from the index (their packs
        lose live bytes), then delete packs with nothing live left. Both steps are queued in
        the `garbage` table first, so a crash in between only repeats them."""
        if self.read_only or self.lease_lost:
            return
        if self.catalog.get_meta("published") != self.catalog.get_meta("seq"):
            return
        garbage = self.catalog.garbage()
        blobs = [k for k in garbage if k[:1] in (K_CHUNK, K_NODE)]
        if blobs:
            with self.catalog.transaction():
                empty = self.chunks.release(blobs)
                self.catalog.forget_garbage(blobs)
                self.catalog.add_garbage(K_PACK + pid for pid in empty)
        packs = [k for k in self.catalog.garbage() if k[:1] == K_PACK]
        if packs:
            await self.chunks.delete_packs([k[1:] for k in packs])
            with self.catalog.transaction():
                self.catalog.forget_garbage(packs)

    async def gc(self, threshold: float | None = None) -> dict:
        """Rewrite packs whose live share fell below `threshold` (their live blobs move to new
        packs, then the old packs go), and fold the index fragments into a checkpoint when
        they have piled up. The work follows the garbage, not the data kept."""
        self.writable()
        threshold = self.config.gc_threshold if threshold is None else threshold
        async with self.commit_lock:
            await self._publish()
            await self._collect()
            before = self.chunks.statistics()
            sparse = self.chunks.sparse_packs(threshold)
            moved = 0
            try:
                for pid, _size, _live in sparse:
                    for key, body in await self.chunks.read_live(pid):
                        self.chunks.stage_body(key, body)
                        moved += len(body)
                    await self.chunks.upload_sealed()
                await self.chunks.flush()
                await self.store.barrier()
            except BaseException:
                self.chunks.discard_staged()
                self.sweep_needed = True
                raise
            with self.catalog.transaction():
                self.chunks.record()
                self.chunks.forget_packs([pid for pid, _s, _l in sparse])
                self.catalog.add_garbage(K_PACK + pid for pid, _s, _l in sparse)
            await self._collect()
            if self.chunks.statistics().fragments > 32:
                old = await self.chunks.checkpoint()
                await self.store.barrier()
                with self.catalog.transaction():
                    self.chunks.record()
                    self.chunks.forget_fragments(old)
                for fkey in old:
                    await self.store.delete(fkey)
            after = self.chunks.statistics()
            return {
                "rewritten_packs": len(sparse),
                "moved_bytes": moved,
                "store_bytes_before": before.pack_bytes,
                "store_bytes_after": after.pack_bytes,
                "live_bytes": after.live_bytes,
                "packs": after.packs,
            }

    async def sweep_orphans(self) -> int:
        """Delete the packs and index fragments that no committed catalog knows: what a
        flush or gc cycle uploaded before it failed (store error, crash, cancellation).
        The flusher runs it once after such a failure or an unclean shutdown. Packs still
        waiting for deletion after a publish are not orphans (an older published catalog
        may need them until then). Returns how many objects went."""
        self.writable()
        async with self.commit_lock:
            await self._publish()
            await self._collect()
            keep = self.chunks.known_packs()
            keep.update(k[1:] for k in self.catalog.garbage() if k[:1] == K_PACK)
            doomed = [k for k in await self.store.list("p/") if _pack_id(k) not in keep]
            fragments = self.chunks.fragment_keys()
            doomed += [k for k in await self.store.list("i/") if k not in fragments]
            for key in doomed:
                await self.store.delete(key)
            if doomed:
                log.info("removed %d objects that a failed cycle left in the store", len(doomed))
            self.orphans_removed += len(doomed)
            self.sweep_needed = False
            return len(doomed)

    # ------------------------------------------------------------------ checks and stats

    async def _check_store(self, expected) -> tuple[list[str], list[bytes]]:
        """Every referenced blob is indexed and its pack is in the store; and which packs
        in the store nothing indexes (left by a crashed cycle)."""
        missing = []
        packs = set()
        for key in expected:
            loc = self.chunks.location(key)
            if loc is None:
                missing.append(f"{key_to_store_key(key)}: not in the index")
            else:
                packs.add(loc[0])
        listed = {bytes.fromhex(k.rsplit("/", 1)[1]) for k in await self.store.list("p/")}
        missing += [f"{pack_key(pid)}: missing from the store" for pid in packs - listed]
        known = self.chunks.known_packs()
        return missing, sorted(listed - known)

    async def check(self, repair: bool = False, verify_store: bool = True) -> CheckReport:
        """Recompute every refcount from the roots and compare; check the store has every
        referenced object. With repair, write the recomputed counts."""
        async with self.commit_lock:
            roots = [(h.row.root, h.bs) for h in self.heads.values()]
            roots += [
                (s.root, s.block_size) for s in self.catalog.snapshots() if s.state == "available"
            ]
            expected = await expected_refs(self.tree, roots)
            actual = self.catalog.all_refs()
            report = CheckReport(objects=len(expected))
            for key in sorted(set(expected) | set(actual)):
                if expected.get(key, (0, 0))[0] != actual.get(key, (0, 0))[0]:
                    report.wrong_counts.append(
                        f"{key_to_store_key(key)}: counted {actual.get(key, (0, 0))[0]}, "
                        f"referenced {expected.get(key, (0, 0))[0]}"
                    )
            if verify_store:
                report.missing, orphans = await self._check_store(expected)
                report.orphan_packs = len(orphans)
                if repair and orphans:
                    await self.chunks.delete_packs(orphans)
                    report.repaired = True
            if not self.catalog.garbage():
                for pid, live, counted in self.chunks.live_mismatches():
                    report.wrong_counts.append(
                        f"{pack_key(pid)}: live bytes {live}, blobs indexed in it {counted}"
                    )
            if repair and report.wrong_counts:
                with self.catalog.transaction():
                    self.catalog.replace_refs(expected)
                    self.chunks.recount_live()
                report.repaired = True
            return report

    def statistics(self) -> EngineStatistics:
        packs = self.chunks.statistics()
        return EngineStatistics(
            volumes=len(self.heads),
            snapshots=len(self.catalog.snapshots()),
            dirty_bytes=self.dirty_bytes,
            cached_bytes=self.lru_bytes + self.dirty_bytes,
            frozen_bytes=self.frozen_bytes,
            stored_bytes=self.catalog.referenced_bytes(),
            stored_data_bytes=self.catalog.referenced_bytes(K_CHUNK),
            stored_objects=self.catalog.ref_count_rows(),
            uploaded_bytes=self.uploaded_bytes,
            discarded_bytes=self.discarded_bytes,
            orphans_removed=self.orphans_removed,
            uploaded_objects=self.uploaded_objects,
            deduplicated_blocks=self.deduplicated,
            fetched_blocks=self.fetched,
            catalog_seq=int(self.catalog.get_meta("seq", 0)),
            published_seq=int(self.catalog.get_meta("published", 0)),
            flush_errors=self.flush_errors,
            last_error=self.last_error,
            packs=packs.packs,
            pack_bytes=packs.pack_bytes,
            live_bytes=packs.live_bytes,
            index_fragments=packs.fragments,
            lease_lost=self.lease_lost,
        )

    @staticmethod
    def _check_access(owner: int, uid: int, what: str) -> None:
        if uid not in (0, owner):
            raise PermissionDenied(f"{what} belongs to another user")


def _pack_id(key: str) -> bytes | None:
    try:
        return bytes.fromhex(key.rsplit("/", 1)[1])
    except ValueError:
        return None  # not a name snapfs writes: left alone


def check_block_size(block_size: int) -> None:
    if block_size < 4096 or block_size > (16 << 20) or block_size & (block_size - 1):
        raise InvalidArgument(f"invalid block size {block_size}: a power of two from 4K to 16M")


def check_volume_size(size: int) -> None:
    if size <= 0 or size % 512:
        raise InvalidArgument(f"invalid volume size {size}: a positive multiple of 512 bytes")
    if size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"invalid volume size {format_size(size)}: at most 1P")


def snapshot_info(snap: SnapshotRow) -> dict:
    return {
        "volume": snap.volume,
        "name": snap.name,
        "state": snap.state,
        "size": snap.size,
        "block_size": snap.block_size,
        "created": snap.created,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.created)),
        "temporary": bool(snap.temporary),
        "owner": snap.owner,
        "root": snap.root.hex() if snap.root else None,
    }
