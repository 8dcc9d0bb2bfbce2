"""Copy-on-write saves of one volume (docs/design.md, "Snapshots: O(1), exact").

`CowSaves` (one per volume head)
    owns: the saves file (`vol-N.frozen`), its slots (which block of which pending
          snapshot's epoch sits in which slot; the free ones) and the `frozen` rows that make
          them durable.
    does not own: which snapshots are pending (the head), whether a block still needs a
          save (the data path decides), the room saves take (`CacheSpace`, told here).

A block that a pending snapshot still needs is copied to a slot before it is overwritten;
the copy is durable (fdatasync) before its row is, and its row before the overwrite. The
snapshot's commit reads the save instead of the cache; then the epoch's saves are released.

Invariants (`check`, which `assert_invariants` and fsck use): no two saves share a slot, a
used slot is not free and lies within the file; saves exist only for epochs of pending
snapshots (else leaked), for blocks of the volume; the rows in SQLite equal the saves in
memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapfs.volume.cache import CacheSpace
    from snapfs.volume.catalog import Catalog
    from snapfs.volume.files import BlockFile


class CowSaves:
    def __init__(
        self,
        file: BlockFile,
        catalog: Catalog,
        vid: int,
        bs: int,
        space: CacheSpace,
        sync: Callable[[BlockFile], Awaitable[None]],
    ) -> None:
        self.file = file
        self._sync = sync  # the head's fdatasync (a failure fails the volume's later syncs)
        self.catalog = catalog
        self.vid, self.bs = vid, bs
        self.space = space
        self._slots: dict[int, dict[int, int]] = {}  # snapshot epoch → {blk → slot}
        self._free: list[int] = []
        self._next = 0  # slots below it are in the file

    # ------------------------------------------------------------------ what it says

    def slots(self, epoch: int) -> dict[int, int]:
        """The saves of one snapshot epoch, {blk → slot} (a copy)."""
        return dict(self._slots.get(epoch, {}))

    def has(self, epoch: int, blk: int) -> bool:
        return blk in self._slots.get(epoch, ())

    def count(self) -> int:
        return sum(map(len, self._slots.values()))

    def epochs(self) -> list[int]:
        return list(self._slots)

    # ------------------------------------------------------------------ changes

    def load(self) -> None:
        """At mount: the saves the rows record."""
        for epoch, blk, slot in self.catalog.frozen(self.vid):
            self._slots.setdefault(epoch, {})[blk] = slot
        used = {s for saves in self._slots.values() for s in saves.values()}
        self._next = max(used, default=-1) + 1
        self._free = [s for s in range(self._next) if s not in used]
        self.space.saves_changed(len(used) * self.bs)

    async def write(self, data: bytes) -> int:
        """Copy a block's content to a free slot and make it durable; returns the slot,
        reserved until `record` or `give_back`."""
        slot = self._free.pop() if self._free else self._next
        if slot == self._next:
            self._next += 1
        self.file.pwrite(data, slot * self.bs)
        try:
            await self._sync(self.file)
        except BaseException:
            self.give_back(slot)
            raise
        return slot

    def give_back(self, slot: int) -> None:
        """A reserved slot that is not needed (the snapshot's commit overtook the save)."""
        if slot < self._next:  # else the file was emptied meanwhile
            self._free.append(slot)

    def record(self, epoch: int, blk: int, slot: int) -> None:
        """Inside the caller's transaction, with no await before `recorded`: the save's row."""
        self.catalog.add_frozen(self.vid, epoch, blk, slot)

    def recorded(self, epoch: int, blk: int, slot: int) -> None:
        """After that transaction: the save counts (it takes room in the cache)."""
        self._slots.setdefault(epoch, {})[blk] = slot
        self.space.saves_changed(self.bs)

    def clear_rows(self, epoch: int) -> None:
        """Inside the transaction that committed (or dropped) the snapshot of `epoch`."""
        self.catalog.clear_frozen(self.vid, epoch)

    def release(self, epoch: int, pending: bool) -> None:
        """After that transaction: the epoch's saves go; the file is emptied when no
        snapshot is `pending` any more."""
        slots = self._slots.pop(epoch, {})
        self._free.extend(slots.values())
        self.space.saves_changed(-len(slots) * self.bs)
        if not pending and not self._slots:
            self.file.truncate(0)
            self._free, self._next = [], 0

    def drop_stale(self, pending: set[int]) -> int:
        """Saves of epochs no snapshot is pending for (left by an older version that could
        leak them): nothing reads them, they only took room. Returns how many epochs."""
        stale = [e for e in self._slots if e not in pending]
        if stale:
            with self.catalog.transaction():
                for epoch in stale:
                    self.clear_rows(epoch)
            for epoch in stale:
                self.release(epoch, pending=True)
        return len(stale)

    def close(self) -> None:
        """The volume leaves the engine: its saves take no room any more."""
        self.space.saves_changed(-self.count() * self.bs)
        self._slots.clear()
        self.file.close()

    # ------------------------------------------------------------------ checks

    def check(self, pending: list[int], nblocks: int, name: str) -> list[str]:
        """Its invariants, as findings naming the save (or the slot): each save (in memory
        or as a `frozen` row) is for an epoch in `pending` and a block below `nblocks`, and
        its row and memory agree; no two saves share a slot, a used slot is not free and
        lies in the file. A save no pending snapshot needs is a leaked save."""
        rows = {(e, b): s for e, b, s in self.catalog.frozen(self.vid)}
        saves = {(e, b): s for e, held in self._slots.items() for b, s in held.items()}
        found = []
        for epoch, blk in sorted(set(rows) | set(saves)):
            row, mem = rows.get((epoch, blk)), saves.get((epoch, blk))
            why = self._wrong_save(epoch, blk, row, mem, pending, nblocks)
            if why:
                slot = row if mem is None else mem
                found.append(
                    f"volume {name}: save of block {blk}, epoch {epoch}, slot {slot}: {why}"
                )
        return found + self._check_slots(list(saves.values()), name)

    @staticmethod
    def _wrong_save(
        epoch: int, blk: int, row: int | None, mem: int | None, pending: list[int], nblocks: int
    ) -> str | None:
        if epoch not in pending:
            return "leaked (no pending snapshot needs it)"
        if not 0 <= blk < nblocks:
            return f"beyond the volume's {nblocks} blocks"
        if row is None:
            return "in memory, no frozen row"
        if mem is None:
            return "a frozen row, not in memory"
        if row != mem:
            return f"its frozen row says slot {row}"
        return None

    def _check_slots(self, used: list[int], name: str) -> list[str]:
        shared = Counter(used)
        found = [f"volume {name}: slot {s} holds two saves" for s, n in shared.items() if n > 1]
        found += [
            f"volume {name}: slot {s} is used and free" for s in sorted(set(used) & set(self._free))
        ]
        found += [
            f"volume {name}: slot {s} lies beyond the saves file ({self._next} slots)"
            for s in sorted(set(used))
            if not 0 <= s < self._next
        ]
        return found

    def assert_invariants(self, pending: list[int], nblocks: int, name: str) -> None:
        found = self.check(pending, nblocks, name)
        assert not found, "; ".join(found)
