"""The volumes: which exist, their heads, and the operations that change a volume's root or
its snapshots (create, clone, resize, rename, delete; snapshot, delete, rollback) or read
its trees (diff, allocated, changed since).

owns: the heads (name → `Head`; only this component adds or removes one) and the opens of
volume and snapshot files (rollback and delete refuse while open).
does not own: a head's blocks and saves (`Head`), the commit that a snapshot's upload or a
rollback's pending snapshots need (`Committer`), the refcounts (`Refcounts`), publishing
and whether this writer may change anything (`Fence`), what a drop frees (`Collector`).

Concurrency (trio: code between two awaits is atomic): `commit_lock` serialises every
change of roots and refcounts; all refcount arithmetic that needs to read tree nodes is done
before the SQLite transaction, which then runs without an await. `Head.write_lock`
serialises writes to one volume (and a rollback or rename with them).
"""

import logging
from collections.abc import Callable

import trio

from snapfs.access import check_owner
from snapfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound, SnapfsError
from snapfs.tree import TreeReader
from snapfs.units import MAX_VOLUME_SIZE, check_name, check_volume_name, format_size
from snapfs.volume.base import DEFAULT_BLOCK_SIZE
from snapfs.volume.cache import CacheSpace
from snapfs.volume.catalog import Catalog, SnapshotRow, VolumeRow, check_guid
from snapfs.volume.check import K_NODE
from snapfs.volume.collector import Collector
from snapfs.volume.fence import Fence
from snapfs.volume.files import Files
from snapfs.volume.flusher import Committer
from snapfs.volume.head import Head, find_head, find_snapshot
from snapfs.volume.refcounts import Refcounts

log = logging.getLogger("snapfs.engine")


class Volumes:
    def __init__(
        self,
        heads: dict[str, Head],
        catalog: Catalog,
        refs: Refcounts,
        fence: Fence,
        space: CacheSpace,
        files: Files,
        cache_dir: str,
        committer: Committer,
        collector: Collector,
        kick: Callable[[], None],
    ) -> None:
        self.heads = heads
        self.catalog = catalog
        self.refs = refs
        self.tree: TreeReader = refs.tree
        self.fence = fence
        self.space = space
        self.files = files
        self.cache_dir = cache_dir
        self.committer = committer
        self.collector = collector
        self.commit_lock = committer.commit_lock
        self.kick = kick
        self.snap_opens: dict[int, int] = {}

    def head(self, name: str) -> Head:
        return find_head(self.heads, name)

    def snapshot_row(self, volume: str, name: str) -> SnapshotRow:
        return find_snapshot(self.catalog, self.heads, volume, name)

    # ------------------------------------------------------------------ volumes

    async def create_volume(
        self,
        name: str,
        size: int,
        block_size: int | None = None,
        uid: int = 0,
        source: tuple[str, str] | None = None,
    ) -> VolumeRow:
        self.fence.writable()
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
            await self.count_mapped(self.add_head(row))
            await self.committer.publish()
        return row

    async def resize_volume(self, name: str, size: int, uid: int = 0) -> VolumeRow:
        self.fence.writable()
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
        self.fence.writable()
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
        self.fence.writable()
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

    async def count_mapped(self, head: Head) -> None:
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
        self.fence.writable()
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
            self.fence.writable()  # lost the store: it stays creating here for ever
            if not await self.committer.flush_once():
                await trio.sleep(0.05)  # another task's cycle holds the work: let it run

    async def delete_snapshot(self, volume: str, name: str, uid: int = 0) -> None:
        self.fence.writable()
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
            await self.drop_snapshot(snap)

    async def drop_snapshot(self, snap: SnapshotRow) -> None:
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
        self.fence.writable()
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
            await self.count_mapped(head)
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

    def add_head(self, row: VolumeRow) -> Head:
        head = Head(row, self.cache_dir, self.files, self.space, self.catalog)
        for blk, epoch in self.catalog.dirty(row.id).items():
            head.blocks.load_dirty(blk, epoch, head.next_gen())
        head.saves.load()
        self.heads[row.name] = head
        return head

    def drop_head(self, row: VolumeRow) -> None:
        """A followed volume is gone (or taken again with another block size): its head
        and cache files go."""
        head = self.heads.pop(row.name, None)
        if head is None:
            head = Head(row, self.cache_dir, self.files, self.space, self.catalog)
        head.close()
        head.remove_files()

    def drop_stale_saves(self, head: Head) -> None:
        """Copy-on-write saves of snapshots that are no longer pending (left by an older
        version that could leak them): nothing reads them, they only took dirty room."""
        stale = head.saves.drop_stale({s.epoch for s in head.pending})
        if stale:
            log.warning("%s: dropped the saves of %d stale epochs", head.row.name, stale)

    # ------------------------------------------------------------------ rows and opens

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


def check_block_size(block_size: int) -> None:
    if block_size < 4096 or block_size > (16 << 20) or block_size & (block_size - 1):
        raise InvalidArgument(f"invalid block size {block_size}: a power of two from 4K to 16M")


def check_volume_size(size: int) -> None:
    if size <= 0 or size % 512:
        raise InvalidArgument(f"invalid volume size {size}: a positive multiple of 512 bytes")
    if size > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"invalid volume size {format_size(size)}: at most 1P")
