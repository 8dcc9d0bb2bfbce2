"""The block cache: which blocks of which volume the cache files hold, and how much room
they take (docs/design.md, "Cache").

`CacheSpace` (one per engine)
    owns: the clean LRU of every volume, the pinned blocks, and the byte totals (clean,
          dirty, copy-on-write saves) against the cache size.
    does not own: the records of dirty blocks (each `VolumeCache`), the saves themselves
          (`CowSaves`), the bytes in the files.
`VolumeCache` (one per volume head)
    owns: its dirty records (`Dirty`), the clean-or-dirty state of each of its blocks, and
          the cache file's ranges for them (filled when fetched, punched when evicted).
    does not own: the committed tree (the engine), the write lock (the head).

Invariants (`check`, which `assert_invariants` and fsck use): a block is dirty or
clean-cached, never both, and within its volume; each byte total equals the sum it stands
for; a dirty record is of its volume's past, and has its `dirty` row once `synced` (and a
row is only for a dirty block); a pinned block (a write waits for it) is not evicted.
Nothing outside this module writes these fields.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapfs.volume.catalog import VolumeRow
    from snapfs.volume.files import BlockFile


class Dirty:
    """One dirty block of a volume: the cache file holds a newer version than the committed
    tree. Its facts live in one record, so they cannot disagree (a block is dirty exactly
    while it has one)."""

    __slots__ = ("epoch", "gen", "hole", "new", "since", "synced", "touched")

    def __init__(self, epoch: int, gen: int, now: float = 0.0) -> None:
        self.epoch = epoch  # the volume's epoch at its last write
        self.gen = gen  # the engine's write generation then (a write during an upload)
        self.touched = now  # trio time of its last write (0: dirty since before this mount)
        self.since = now  # trio time it became dirty, as far as the store is concerned
        self.synced = False  # its dirty row is committed (the rows are what a crash keeps)
        # Discarded (its cache range punched, it reads as zeros): whether the committed tree
        # maps it (the next flush unmaps it); None for written data.
        self.hole: bool | None = None
        self.new = False  # written data the committed tree does not map (allocated space)

    def __repr__(self) -> str:
        return f"Dirty(epoch={self.epoch}, gen={self.gen}, synced={self.synced}, hole={self.hole})"


class CacheSpace:
    def __init__(self, size: int, dirty_fraction: float) -> None:
        self.size = size
        self.dirty_fraction = dirty_fraction
        self._lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # (vid, blk) → bytes
        self._volumes: dict[int, VolumeCache] = {}
        self._pinned: set[tuple[int, int]] = set()
        self.clean_bytes = 0
        self.dirty_bytes = 0
        self.saved_bytes = 0

    # ------------------------------------------------------------------ what it says

    def dirty_room(self) -> bool:
        """Whether writers may make more blocks dirty (or saved) without a flush first."""
        return self.dirty_bytes + self.saved_bytes < self.size * self.dirty_fraction

    def present_keys(self) -> list[tuple[int, int]]:
        """The clean blocks, oldest first (saved at a clean unmount)."""
        return list(self._lru)

    def volume_ids(self) -> set[int]:
        return set(self._volumes)

    def clean_count(self, vid: int) -> int:
        return sum(1 for v, _b in self._lru if v == vid)

    def statistics(self) -> dict:
        return {
            "dirty_bytes": self.dirty_bytes,
            "cached_bytes": self.clean_bytes + self.dirty_bytes,
            "frozen_bytes": self.saved_bytes,
        }

    # ------------------------------------------------------------------ changes

    def saves_changed(self, delta_bytes: int) -> None:
        """Copy-on-write saves were made (> 0) or released (< 0): they take room too."""
        self.saved_bytes += delta_bytes

    @contextlib.contextmanager
    def pinned(self, vid: int, blk: int) -> Iterator[None]:
        """Keep the block cached while the caller (a write that fetched it) needs it: a
        full cache would throw it out as soon as it came in, and the write would fetch it
        for ever."""
        key = (vid, blk)
        self._pinned.add(key)
        try:
            yield
        finally:
            self._pinned.discard(key)

    def evict(self, limit: int | None = None) -> None:
        """Drop the least recently used clean blocks, except pinned ones, until everything
        fits `limit` (the cache size)."""
        limit = self.size if limit is None else limit
        over = self.clean_bytes + self.dirty_bytes + self.saved_bytes - limit
        kept = []
        while self._lru and over > 0:
            key, size = self._lru.popitem(last=False)
            if key in self._pinned:
                kept.append((key, size))
                continue
            self.clean_bytes -= size
            over -= size
            volume = self._volumes.get(key[0])
            if volume is not None:
                volume.punch(key[1])
        for key, size in reversed(kept):  # back in front, in their order
            self._lru[key] = size
            self._lru.move_to_end(key, last=False)

    # ------------------------------------------------------------------ checks

    def check(self, heads: set[int] | None = None, saved: int | None = None) -> list[str]:
        """Its invariants, as findings (one line each, naming the block or the total):
        each total is the sum it stands for (`saved`: the bytes the heads' saves hold),
        a clean block is of a volume it knows (`heads`: the engine's), within it and not
        dirty; then each volume's own check of its records."""
        found = self._check_totals(saved)
        if heads is not None and set(self._volumes) != heads:
            found.append(
                f"cache: knows volume ids {sorted(self._volumes)}, the heads {sorted(heads)}"
            )
        for vid, blk in self._lru:
            volume = self._volumes.get(vid)
            if volume is None:
                found.append(f"volume id {vid} block {blk}: clean-cached, no such volume")
            elif blk in volume.dirty:
                found.append(f"volume {volume.row.name} block {blk}: dirty and clean-cached")
            elif not 0 <= blk < volume.nblocks():
                found.append(f"volume {volume.row.name} block {blk}: cached beyond the end")
        return found

    def _check_totals(self, saved: int | None) -> list[str]:
        totals = [
            ("clean", self.clean_bytes, sum(self._lru.values()), "its clean blocks"),
            (
                "dirty",
                self.dirty_bytes,
                sum(len(v.dirty) * v.bs for v in self._volumes.values()),
                "its dirty records",
            ),
            ("saved", self.saved_bytes, saved, "the copy-on-write saves"),
        ]
        return [
            f"cache: {what} bytes {total}, {sum_of} hold {actual}"
            for what, total, actual, sum_of in totals
            if actual is not None and total != actual
        ]

    def assert_invariants(self, heads: set[int] | None = None, saved: int | None = None) -> None:
        found = self.check(heads, saved)
        for volume in self._volumes.values():
            found += volume.check()
        assert not found, "; ".join(found)


class VolumeCache:
    def __init__(self, space: CacheSpace, row: VolumeRow, file: BlockFile) -> None:
        self.space = space
        self.row = row  # the head's row: its id, block size and size (not changed here)
        self.vid, self.bs = row.id, row.block_size
        self.file = file
        self.dirty: dict[int, Dirty] = {}  # blk → its record, while the file is newer
        space._volumes[self.vid] = self

    def nblocks(self) -> int:
        return -(-self.row.size // self.bs)

    def blen(self, blk: int) -> int:
        return min(self.bs, self.row.size - blk * self.bs)

    # ------------------------------------------------------------------ what it says

    def present(self, blk: int) -> bool:
        """Dirty or clean-cached: the cache file holds the block's content."""
        return blk in self.dirty or (self.vid, blk) in self.space._lru

    def cached_clean(self, blk: int) -> bool:
        return (self.vid, blk) in self.space._lru

    def touch(self, blk: int) -> None:
        """A read used the block: it goes to the young end of the LRU (if clean)."""
        key = (self.vid, blk)
        if key in self.space._lru:
            self.space._lru.move_to_end(key)

    # ------------------------------------------------------------------ changes

    def mark_dirty(self, blk: int, epoch: int, gen: int, now: float) -> Dirty:
        """The block was written (or discarded) in `epoch`: its record, made when the block
        was clean (it leaves the clean LRU and counts as dirty)."""
        dirty = self.dirty.get(blk)
        if dirty is None:
            self._drop_clean(blk)
            self.space.dirty_bytes += self.bs
            dirty = self.dirty[blk] = Dirty(epoch, gen, now)
        else:
            dirty.epoch, dirty.gen, dirty.touched = epoch, gen, now
            dirty.synced = False
        return dirty

    def mark_written(self, blk: int, epoch: int, gen: int, now: float, new: bool) -> None:
        """Data was written to the block; `new`: the committed tree does not map it."""
        dirty = self.mark_dirty(blk, epoch, gen, now)
        dirty.hole, dirty.new = None, new

    def mark_discarded(self, blk: int, epoch: int, gen: int, now: float, mapped: bool) -> None:
        """The block was discarded (its range punched); `mapped`: the tree maps it."""
        dirty = self.mark_dirty(blk, epoch, gen, now)
        dirty.hole, dirty.new = mapped, False

    def move_to_epoch(self, blk: int, epoch: int, synced: bool = False) -> None:
        """No snapshot needs the block's older version (or it was saved): it belongs to
        `epoch` now, and its row says so when `synced`."""
        dirty = self.dirty[blk]
        dirty.epoch = epoch
        dirty.synced = dirty.synced or synced

    def unsynced(self) -> list[int]:
        """The dirty blocks whose row is not committed yet."""
        return [blk for blk, dirty in self.dirty.items() if not dirty.synced]

    def mark_synced(self, blocks: Iterable[int]) -> None:
        """Their rows are committed (those still dirty)."""
        for blk in blocks:
            dirty = self.dirty.get(blk)
            if dirty is not None:
                dirty.synced = True

    def rebase(self, blk: int, mapped: bool) -> None:
        """A commit changed the tree under a block that stays dirty (written again, or a
        snapshot's older version went): what is dirty dates from its last write, and
        whether the tree maps it is `mapped` now."""
        dirty = self.dirty.get(blk)
        if dirty is None:
            return
        dirty.since = dirty.touched
        if dirty.hole is not None:
            dirty.hole = mapped
        else:
            dirty.new = not mapped

    def load_dirty(self, blk: int, epoch: int, gen: int) -> None:
        """At mount: a dirty row the catalog kept (dirty since before this mount)."""
        self.mark_dirty(blk, epoch, gen, 0.0).synced = True

    def mark_clean(self, blk: int, mapped: bool) -> None:
        """A commit stored the block: it is clean now, cached (or a hole: punched)."""
        del self.dirty[blk]
        self.space.dirty_bytes -= self.bs
        if mapped:
            self.add_clean(blk)
        else:
            self.file.punch(blk * self.bs, self.blen(blk))

    def fill(self, blk: int, data: bytes | None) -> None:
        """A fetched block (None: a hole) goes into the file as a clean block."""
        if data is None:
            self.file.punch(blk * self.bs, self.blen(blk))
        else:
            self.file.pwrite(memoryview(data)[: self.blen(blk)], blk * self.bs)
        self.add_clean(blk)

    def add_clean(self, blk: int) -> None:
        key = (self.vid, blk)
        lru = self.space._lru
        if key not in lru:
            self.space.clean_bytes += self.bs
        lru[key] = self.bs
        lru.move_to_end(key)

    def forget(self) -> None:
        """Every block goes back to what the tree says (rollback, a new tree from the
        store): dirty records and clean blocks are dropped (the caller empties the file)."""
        self.space.dirty_bytes -= len(self.dirty) * self.bs
        self.dirty.clear()
        self.forget_clean()

    def forget_clean(self) -> None:
        for key in [k for k in self.space._lru if k[0] == self.vid]:
            self.space.clean_bytes -= self.space._lru.pop(key)

    def close(self) -> None:
        """The volume is gone (deleted, or the engine closes): it takes no room."""
        self.forget()
        self.space._volumes.pop(self.vid, None)

    def punch(self, blk: int) -> None:
        self.file.punch(blk * self.bs, self.blen(blk))

    def _drop_clean(self, blk: int) -> None:
        size = self.space._lru.pop((self.vid, blk), None)
        if size is not None:
            self.space.clean_bytes -= size

    # ------------------------------------------------------------------ checks

    def check(self, rows: dict[int, int] | None = None, gen: int | None = None) -> list[str]:
        """Its records' invariants, as findings naming the block: within the volume, of its
        past (epoch, and write generation below `gen`), not discarded and new at once; and
        with `rows` (its `dirty` rows in the catalog, blk → epoch): a row only for a dirty
        block, and one for every dirty block whose row was committed (`synced`)."""
        found = []
        for blk, dirty in self.dirty.items():
            why = self._wrong_record(blk, dirty, gen)
            if why is None and rows is not None and dirty.synced and blk not in rows:
                why = "dirty since a committed change, no dirty row"
            if why is not None:
                found.append(f"volume {self.row.name} block {blk}: {why}")
        found += [
            f"volume {self.row.name} block {blk}: a dirty row (epoch {epoch}), the block is clean"
            for blk, epoch in sorted((rows or {}).items())
            if blk not in self.dirty
        ]
        return found

    def _wrong_record(self, blk: int, dirty: Dirty, gen: int | None) -> str | None:
        if not 0 <= blk < self.nblocks():
            return "dirty beyond the end"
        if dirty.new and dirty.hole is not None:
            return "discarded yet new"
        if dirty.epoch > self.row.epoch:
            return f"dirty in epoch {dirty.epoch}, after the volume's {self.row.epoch}"
        if gen is not None and dirty.gen > gen:
            return f"written in generation {dirty.gen}, after the engine's {gen}"
        return None
