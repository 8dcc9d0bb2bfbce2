"""The data path: reads (with read-ahead), writes, discards and fsync (see docs/design.md)."""

import logging
import os
from collections.abc import Callable

import trio
import trio.lowlevel

from snapfs.chunks import CHUNK, ChunkStore
from snapfs.errors import (
    BeyondEnd,
    InvalidArgument,
    NotFound,
    SnapfsError,
)
from snapfs.tree import TreeReader
from snapfs.volume.base import EngineConfig, zeros
from snapfs.volume.cache import CacheSpace
from snapfs.volume.catalog import SnapshotRow
from snapfs.volume.chunkcache import ChunkCache
from snapfs.volume.fence import Fence
from snapfs.volume.flusher import Committer
from snapfs.volume.head import Head, find_head
from snapfs.volume.inflight import InFlight
from snapfs.volume.readahead import ReadAhead

log = logging.getLogger("snapfs.engine")


class DataPath:
    """Reads, writes, discards and fsync of volume heads, and reads of snapshots.

    owns: the read-ahead, the chunk cache of snapshot reads and their fetches in flight,
    and its counters (blocks fetched, bytes discarded).
    does not own: a head's blocks, saves and write generation (`Head`), the room in the
    cache (`CacheSpace`), the tree and the store (`TreeReader`, `ChunkStore`), whether
    this engine may write (`Fence`), the flush a writer waits for (`Committer`)."""

    def __init__(
        self,
        heads: dict[str, Head],
        chunks: ChunkStore,
        tree: TreeReader,
        fence: Fence,
        space: CacheSpace,
        config: EngineConfig,
        committer: Committer,
        kick: Callable[[], None],
    ) -> None:
        self.heads = heads
        self.chunks = chunks
        self.tree = tree
        self.fence = fence
        self.space = space
        self.committer = committer
        self.kick = kick
        self.readahead = ReadAhead(config.readahead_bytes, config.uploads)
        self.snap_cache = ChunkCache(2 * config.readahead_bytes + (4 << 20))
        self._snap_fetching = InFlight()
        self.fetched = 0
        self.discarded_bytes = 0

    def statistics(self) -> dict:
        return {"fetched_blocks": self.fetched, "discarded_bytes": self.discarded_bytes}

    def check(self) -> list[str]:
        return self.snap_cache.check()

    async def read(self, name: str, offset: int, size: int) -> bytes:
        got = await self.read_ref(name, offset, size)
        if isinstance(got, tuple):
            fd, pos, length = got
            return os.pread(fd, length, pos)
        return got

    async def read_ref(self, name: str, offset: int, size: int) -> bytes | tuple[int, int, int]:
        """Like read, but a range that is all in the cache (the common case) comes back as
        (fd, offset, length) of the cache file instead of bytes, for the FUSE layer to
        splice into its reply. The caller must read it before its next await: a write,
        discard or eviction may change those bytes after that."""
        head = find_head(self.heads, name)
        end = min(offset + size, head.row.size)
        if offset >= end:
            return b""
        bs = head.bs
        self.readahead.note(
            ("vol", head.row.id),
            offset // bs,
            (end - 1) // bs,
            bs,
            head.nblocks,
            lambda blocks: self._prefetch_blocks(head, blocks),
            lambda b: not (head.blocks.present(b) or b in head.fetching),
        )
        out: list[bytes] = []  # joined once at the end
        blocks = head.blocks
        pos = offset
        while pos < end:
            blk, boff = divmod(pos, bs)
            n = min(bs - boff, end - pos)
            if blocks.present(blk):
                # Extend over the following present blocks: one pread for the run.
                run_end = pos + n
                while run_end < end:
                    nb = run_end // bs
                    if not blocks.present(nb):
                        break
                    run_end = min((nb + 1) * bs, end)
                for b in range(blk, (run_end - 1) // bs + 1):
                    blocks.touch(b)
                if pos == offset and run_end == end:  # the common case: no copies
                    return (head.cache.fd, pos, end - pos)
                out.append(head.cache.pread(run_end - pos, pos))
                pos = run_end
                continue
            data = await self._fetch_block(head, blk)
            out.append(data[boff : boff + n] if data is not None else zeros(n))
            pos += n
        return out[0] if len(out) == 1 else b"".join(out)

    async def _prefetch_blocks(self, head: Head, blocks: list[int]) -> None:
        """Read-ahead: fetch blocks that are not present, with as few GETs as possible, into
        the cache (the rules of `_fetch_block`; its readers wait for these fetches)."""
        if head is not self.heads.get(head.row.name):
            return
        todo = [
            b
            for b in blocks
            if b < head.nblocks and not head.blocks.present(b) and b not in head.fetching
        ]
        with head.fetching.claim(todo):
            root, level = head.row.root, head.row.root_level
            oids = {b: await self.tree.lookup(root, level, b) for b in todo}
            datas = await self.chunks.get_many(CHUNK, [o for o in oids.values() if o])
            if head.row.root != root or head is not self.heads.get(head.row.name):
                return
            for b, oid in oids.items():
                if not head.blocks.present(b):
                    self._cache_clean(head, b, None if oid is None else datas[oid])
            self.space.evict()

    async def _fetch_block(self, head: Head, blk: int) -> bytes | None:
        """Content of a block that was not present (None for a hole), cached on the way."""
        while True:
            if head.blocks.present(blk):
                return head.cache.pread(head.blen(blk), blk * head.bs)
            if not await head.fetching.wait(blk):
                break
        with head.fetching.claim([blk]):
            root, level = head.row.root, head.row.root_level
            oid = await self.tree.lookup(root, level, blk)
            data = None if oid is None else await self.chunks.get(CHUNK, oid)
            # Cached only if nothing changed meanwhile: no write, no commit, and the volume
            # is still there (a delete, or a refresh of a read-only engine, closed its files).
            current = head is self.heads.get(head.row.name)
            if current and not head.blocks.present(blk) and head.row.root == root:
                self._cache_clean(head, blk, data)
                self.space.evict()
            return data

    def _cache_clean(self, head: Head, blk: int, data: bytes | None) -> None:
        """Put a fetched block (None: a hole) into the cache file as a clean block."""
        if data is not None:
            self.fetched += 1
        head.blocks.fill(blk, data)

    async def write(self, name: str, offset: int, data: bytes) -> int:
        head = find_head(self.heads, name)
        self.fence.writable()  # read-only, or this writer lost the store: EROFS
        if offset < 0 or offset + len(data) > head.row.size:
            raise BeyondEnd(f"write beyond the end of volume {name!r}")
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
        first, last = offset // bs, (offset + len(view) - 1) // bs
        epoch, dirty = head.row.epoch, head.dirty
        if all(
            (d := dirty.get(b)) is not None and d.epoch >= epoch and d.hole is None
            for b in range(first, last + 1)
        ):
            # Hot data (every block already dirty in this epoch): nothing to fetch, freeze
            # or account, so one pwrite for the whole range.
            head.cache.pwrite(view, offset)
            now = trio.current_time()
            for blk in range(first, last + 1):
                head.blocks.mark_dirty(blk, epoch, head.next_gen(), now)
            return
        pos = 0
        while pos < len(view):
            blk, boff = divmod(offset + pos, bs)
            n = min(bs - boff, len(view) - pos)
            with self.space.pinned(head.row.id, blk):  # fetched for this write: kept
                unmapped = await self._settle_for_write(head, blk, n < head.blen(blk))
            # No await from here until the block is marked dirty.
            head.cache.pwrite(view[pos : pos + n], offset + pos)
            was = head.dirty.get(blk)
            if was is None:
                new = unmapped
            elif was.hole is not None:
                new = not was.hole  # a discarded block that the tree does not map
            else:
                new = was.new
            gen = head.next_gen()
            head.blocks.mark_written(blk, head.row.epoch, gen, trio.current_time(), new)
            pos += n

    async def _settle_for_write(self, head: Head, blk: int, partial: bool) -> bool:
        """Bring a block into a state where it can be written with no further await: dirty
        in this epoch, or clean (cached when the write is partial, for read-modify-write),
        with any content a pending snapshot needs saved first. Every await may let a commit
        land (a dirty block turns clean) or an eviction (a cached block goes), so the state
        is looked at again after each one. Returns, for a block that is not dirty, whether
        the committed tree leaves it unmapped. Called with the write lock held: nobody else
        makes a block dirty meanwhile, and a clean block's mapping cannot change."""
        while True:
            written = head.dirty.get(blk)
            if written is not None:
                if written.epoch >= head.row.epoch:
                    return False
                await self._freeze(head, blk)
                continue
            unmapped = await self.tree.lookup(head.row.root, head.row.root_level, blk) is None
            if partial and not head.blocks.cached_clean(blk):
                await self._fetch_block(head, blk)  # a fetch that a commit overtook: again
                await trio.lowlevel.checkpoint()  # a loop reaches a checkpoint, always
                continue
            return unmapped

    async def discard(self, name: str, offset: int, length: int) -> None:
        """Discard (TRIM, fallocate PUNCH_HOLE): the range reads as zeros at once. Whole
        blocks become holes: the cache gives their space back, their dirty data is dropped
        instead of uploaded, and the next flush maps them to nothing. Partial blocks at the
        edges are zeroed. A snapshot taken before keeps the old data (copy-on-write, as for
        a write). Durable like a write: at the next fsync, snapshot or flush."""
        head = find_head(self.heads, name)
        self.fence.writable()
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
            root = head.row.root
            mapped = {
                blk async for blk, _oid in self.tree.items(root, head.row.root_level, first, last)
            }
            known = (root, mapped) if head.row.root == root else (b"", set())
            candidates = set(mapped)
            if last - first <= 2 * len(head.dirty):
                candidates.update(b for b in range(first, last) if b in head.dirty)
            else:
                candidates.update(b for b in head.dirty if first <= b < last)
            todo = sorted(candidates)
            for i in range(0, len(todo), 1024):  # the dirty limit holds for discards too
                chunk = todo[i : i + 1024]
                mapped = await self._settle_for_discard(name, head, chunk, known)
                # No await from here to the end of the chunk: blocks are marked dirty first,
                # then their cache ranges are punched in runs.
                run: list[int] = []
                for blk in chunk:
                    was = head.dirty.get(blk)
                    if was is not None and was.hole is not None and was.epoch == head.row.epoch:
                        continue  # already discarded since the last snapshot
                    if run and blk != run[-1] + 1:
                        self._punch_run(head, run)
                    run.append(blk)
                    head.blocks.mark_discarded(
                        blk, head.row.epoch, head.next_gen(), trio.current_time(), blk in mapped
                    )
                self._punch_run(head, run)
        self.discarded_bytes += end - offset

    async def _settle_for_discard(
        self, name: str, head: Head, chunk: list[int], known: tuple[bytes | None, set[int]]
    ) -> set[int]:
        """Wait for dirty room, freeze what a pending snapshot needs, and return which blocks
        of the chunk the committed tree maps, in a state where nothing changed since (a
        flush or a new snapshot during these awaits makes it start over). `known` is the
        mapping read for the whole range at some root: reused while that root holds."""
        while True:
            await self._wait_dirty_room()
            if head is not self.heads.get(name):
                raise NotFound(f"volume {name!r} not found")
            for blk in chunk:
                if blk in head.dirty and head.dirty[blk].epoch < head.row.epoch:
                    await self._freeze(head, blk)
            root, epoch = head.row.root, head.row.epoch
            if root == known[0]:
                mapped = known[1]  # a flush changes the root: nothing to read again
            else:
                mapped = {
                    blk
                    async for blk, _oid in self.tree.items(
                        root, head.row.root_level, chunk[0], chunk[-1] + 1
                    )
                }
            stale = any(b in head.dirty and head.dirty[b].epoch < epoch for b in chunk)
            if head.row.root == root and head.row.epoch == epoch and not stale:
                return mapped

    @staticmethod
    def _punch_run(head: Head, run: list[int]) -> None:
        """Punch the cache ranges of consecutive blocks in one call; empties `run`."""
        if run:
            start = run[0] * head.bs
            head.cache.punch(start, min((run[-1] + 1) * head.bs, head.row.size) - start)
            run.clear()

    async def _zero_range(self, head: Head, start: int, end: int) -> None:
        """Zero part of a block, unless it reads as zeros already (a hole nobody wrote)."""
        if start >= end:
            return
        blk = start // head.bs
        was = head.dirty.get(blk)
        if was is not None and was.hole is not None:  # discarded, not written since: zeros
            return
        clean = blk not in head.dirty  # then the tree says what it holds
        if clean and await self.tree.lookup(head.row.root, head.row.root_level, blk) is None:
            return
        await self._write_locked(head, start, memoryview(zeros(end - start)))

    async def _freeze(self, head: Head, blk: int) -> None:
        """Save a block that a pending snapshot still needs before it is overwritten: copy to
        the frozen file, make the copy durable, then record it (copy-on-write). The commit of
        that snapshot may land during the sync: then the block went to the snapshot and the
        clean cache, and the save is dropped instead (the caller looks at the block again)."""
        dirty = head.dirty[blk]
        written = dirty.epoch
        target = next((s.epoch for s in head.pending if s.epoch >= written), None)
        if target is None or head.saves.has(target, blk):
            head.blocks.move_to_epoch(blk, head.row.epoch)
            return
        data = head.cache.pread(head.blen(blk), blk * head.bs)
        slot = await head.saves.write(data)
        if (
            head.dirty.get(blk) is not dirty
            or dirty.epoch != written
            or all(s.epoch != target for s in head.pending)
        ):
            head.saves.give_back(slot)  # overtaken by the commit: nothing to save
            return
        with head.catalog.transaction():
            head.saves.record(target, blk, slot)
            head.catalog.set_dirty(head.row.id, [(blk, head.row.epoch)])
        head.saves.recorded(target, blk, slot)
        head.blocks.move_to_epoch(blk, head.row.epoch, synced=True)

    async def _wait_dirty_room(self) -> None:
        """Backpressure: past the dirty limit a writer flushes (or waits for the flush)
        instead of failing. A store that fails makes it wait and try again, as the
        background flusher does; a writer that lost the store fails at once (EROFS): its
        dirty blocks can never leave."""
        while not self.space.dirty_room():
            self.fence.writable()
            self.kick()
            try:
                if await self.committer.flush_once():
                    continue
            except SnapfsError as exc:
                log.warning("waiting for dirty room: %s", exc)
            await trio.sleep(0.05)

    async def fsync(self, name: str) -> None:
        """Return once everything written to the volume survives a crash of the daemon or of
        the machine: the cache file is synced, then its dirty map committed. A writer that
        lost the store still keeps what it has on disk (for `snapfs recover`), then fails:
        nothing it holds can reach the store any more."""
        await find_head(self.heads, name).persist_dirty()
        self.fence.writable()

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
                out.append(zeros(n))
            else:
                data = await self._snap_chunk(oid)
                out.append(data[boff : boff + n])
            pos += n
        return out[0] if len(out) == 1 else b"".join(out)

    async def _prefetch_snap(self, snap: SnapshotRow, blocks: list[int]) -> None:
        """Read-ahead of a snapshot: its chunks into the chunk cache, in ranged GETs."""
        found = {await self.tree.lookup(snap.root, snap.root_level, blk) for blk in blocks}
        # Filtered after the last await: a reader may have claimed one meanwhile.
        oids = {o for o in found if o and o not in self.snap_cache and o not in self._snap_fetching}
        with self._snap_fetching.claim(oids):
            for oid, data in (await self.chunks.get_many(CHUNK, list(oids))).items():
                self.fetched += 1
                self.snap_cache.put(oid, data)

    async def _snap_chunk(self, oid: bytes) -> bytes:
        """A chunk read through a snapshot, from the chunk cache (snapshot reads do
        not go through a volume's cache file); concurrent readers share one fetch."""
        while True:
            data = self.snap_cache.get(oid)
            if data is not None:
                return data
            if not await self._snap_fetching.wait(oid):
                break
        with self._snap_fetching.claim([oid]):
            data = await self.chunks.get(CHUNK, oid)
            self.fetched += 1
            self.snap_cache.put(oid, data)
            return data
