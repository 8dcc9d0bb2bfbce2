"""Reference counts of the stored objects (docs/design.md, "The flush cycle", step 6).

`Refcounts` (one per engine)
    owns: the `refs` table: for every chunk and tree node that a root reaches, how many
          references it has (a volume head or a snapshot root counts one; a node counts
          one for each child) and its size; and the rule that a count that reaches zero
          turns its row into a garbage row (collect then drops the blob from the index,
          and the fence deletes its pack after the grace).
    does not own: the trees (`TreeReader`, read to cascade a drop), the garbage's
          deletion (`_collect` and the fence), the transaction (the caller's).

A change is planned as a dict of deltas (key → ±n): `plan_add` and `plan_drop` (which
cascades down a tree whose count reaches zero; every increment of the same change must be
planned first), then `apply` inside the caller's transaction, with no await in between.

Invariants (`check`, which `assert_invariants` and fsck use): every count is positive (a
zero count is no row); no object has a row and a garbage row at once. fsck also compares
every count with the one recomputed from the roots (`differences`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapfs.volume.check import K_CHUNK, K_NODE, key_to_store_key

if TYPE_CHECKING:
    from snapfs.tree import TreeReader
    from snapfs.volume.catalog import Catalog


class Refcounts:
    def __init__(self, catalog: Catalog, tree: TreeReader) -> None:
        self.catalog = catalog
        self.tree = tree

    # ------------------------------------------------------------------ what it says

    def has(self, key: bytes) -> bool:
        """Whether the object is stored and referenced (a commit need not upload it)."""
        return self.catalog.has_ref(key)

    def count(self, key: bytes) -> int:
        return self.catalog.ref(key)

    def all(self) -> dict[bytes, tuple[int, int]]:
        """key → (count, size), for fsck."""
        return self.catalog.all_refs()

    def referenced_bytes(self, kind: bytes | None = None) -> int:
        return self.catalog.referenced_bytes(kind)

    def rows(self) -> int:
        return self.catalog.ref_count_rows()

    # ------------------------------------------------------------------ planning

    @staticmethod
    def plan_add(deltas: dict[bytes, int], key: bytes, n: int = 1) -> None:
        deltas[key] = deltas.get(key, 0) + n

    async def plan_drop(self, deltas: dict[bytes, int], key: bytes) -> None:
        """Drop one reference to `key`; when its count reaches zero, drop the references it
        holds (cascading down the tree). The increments of the change must be in."""
        deltas[key] = deltas.get(key, 0) - 1
        if key[:1] == K_NODE and self.count(key) + deltas[key] == 0:
            level, entries = await self.tree.node(key[1:])
            kind = K_NODE if level else K_CHUNK
            for child in entries.values():
                await self.plan_drop(deltas, kind + child)

    # ------------------------------------------------------------------ changes

    def apply(self, deltas: dict[bytes, int], sizes: dict[bytes, int] | None = None) -> None:
        """Inside the caller's transaction: add the deltas (creating rows with `sizes`);
        rows that reach zero become garbage rows. A count below zero is a bug (raises)."""
        self.catalog.apply_refs(deltas, sizes or {})

    def replace(self, refs: dict[bytes, tuple[int, int]]) -> None:
        """Inside the caller's transaction: the counts recomputed from the roots (a restore,
        fsck --repair)."""
        self.catalog.replace_refs(refs)

    # ------------------------------------------------------------------ checks

    def check(self) -> list[str]:
        """Its invariants, as findings naming the object: every count is positive (a zero
        count is no row), no object has a row and a garbage row at once."""
        rows = self.all()
        found = [
            f"{key_to_store_key(key)}: a refcount row of {count}"
            for key, (count, _size) in sorted(rows.items())
            if count <= 0
        ]
        garbage = {k for k in self.catalog.garbage() if k[:1] in (K_CHUNK, K_NODE)}
        found += [
            f"{key_to_store_key(key)}: counted {rows[key][0]} and queued as garbage"
            for key in sorted(garbage & set(rows))
        ]
        return found

    def differences(self, expected: dict[bytes, tuple[int, int]]) -> dict[bytes, tuple[int, int]]:
        """The counts that differ from `expected` (recomputed from the roots, see
        `check.Walk`): key → (counted, referenced)."""
        actual = self.all()
        wrong = {}
        for key in set(expected) | set(actual):
            counted, referenced = actual.get(key, (0, 0))[0], expected.get(key, (0, 0))[0]
            if counted != referenced:
                wrong[key] = (counted, referenced)
        return wrong

    def assert_invariants(self) -> None:
        found = self.check()
        assert not found, "; ".join(found[:5])
