"""Reference counts of the stored objects (docs/design.md, "The flush cycle", step 6, and
"Streaming decrements").

`Refcounts` (one per engine)
    owns: the `refs` table: for every chunk and tree node that a root reaches, how many
          references it has (a volume head or a snapshot root counts one; a node counts
          one for each child) and its size; the `drops` queue: nodes whose count reached
          zero and whose children still hold the count they gave them; and the rules that a
          chunk whose count reaches zero turns into a garbage row (collect then drops the
          blob from the index, and the fence deletes its pack after the grace), and a node
          whose count reaches zero keeps a row of count 0 and is queued, until `expand`
          decrements its children (then it is garbage) or it is counted again (then it
          leaves the queue: its children's counts were never taken back).
    does not own: the trees (`TreeReader`, read to expand the queue), the garbage's
          deletion (`_collect` and the fence), the transaction (the caller's), when the
          queue is expanded (`_collect`, a bounded number of batches at a time).

A change is planned as a dict of deltas (key → ±n): `plan_add` and `plan_drop` (the root's
own decrement; what is under it is the queue's), then `apply` inside the caller's
transaction, with no await in between. The queue is expanded the same way, a batch at a
time: `plan_expand` (reads the nodes) then `apply_expand` in one transaction, which takes
the nodes off the queue with their children's decrements: a crash between batches only
repeats or continues the work. The walk of a dropped tree is thus spread over batches of
`drop_batch` nodes, and no change holds a whole tree's decrements in memory.

Invariants (`check`, which `assert_invariants` and fsck use): every count is positive but a
queued node's, which is 0; a queued key is a node; no object has a row and a garbage row at
once. fsck also compares every count with the one recomputed from the roots and the queue
(`differences`); the engine checks that no root is queued.
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

    def statistics(self) -> dict:
        return {
            "stored_bytes": self.referenced_bytes(),
            "stored_data_bytes": self.referenced_bytes(K_CHUNK),
            "stored_objects": self.rows(),
        }

    # ------------------------------------------------------------------ planning

    @staticmethod
    def plan_add(deltas: dict[bytes, int], key: bytes, n: int = 1) -> None:
        deltas[key] = deltas.get(key, 0) + n

    @staticmethod
    def plan_drop(deltas: dict[bytes, int], key: bytes) -> None:
        """Drop one reference to `key`. A node whose count reaches zero is queued by
        `apply`: what it holds is dropped later, by `plan_expand`."""
        deltas[key] = deltas.get(key, 0) - 1

    def queued(self, limit: int | None = None) -> list[bytes]:
        """The nodes waiting for their children's decrements (`limit` of them)."""
        return self.catalog.drops(limit)

    async def plan_expand(self, limit: int) -> tuple[list[bytes], dict[bytes, int]]:
        """Up to `limit` queued nodes and the decrements of their children (reads the
        nodes; writes nothing). Called with commit_lock held: nothing may count or queue
        between this and `apply_expand`. A node that cannot be read raises (and stays)."""
        keys = self.queued(limit)
        deltas: dict[bytes, int] = {}
        for key in keys:
            level, entries = await self.tree.node(key[1:])
            kind = K_NODE if level else K_CHUNK
            for child in entries.values():
                self.plan_add(deltas, kind + child, -1)
        return keys, deltas

    def apply_expand(self, keys: list[bytes], deltas: dict[bytes, int]) -> None:
        """Inside the caller's transaction: the children's decrements (a chunk reaching zero
        is garbage, a node is queued in turn), and the expanded nodes leave the queue as
        garbage."""
        self.catalog.apply_refs(deltas, {})
        self.catalog.expanded(keys)

    # ------------------------------------------------------------------ changes

    def apply(self, deltas: dict[bytes, int], sizes: dict[bytes, int] | None = None) -> None:
        """Inside the caller's transaction: add the deltas (creating rows with `sizes`);
        rows that reach zero become garbage rows. A count below zero is a bug (raises)."""
        self.catalog.apply_refs(deltas, sizes or {})

    def replace(self, refs: dict[bytes, tuple[int, int]]) -> None:
        """Inside the caller's transaction: the counts recomputed from the roots (a restore)
        or from the roots and the queue (fsck --repair: a queued node 0); a queue entry
        without a zero count leaves the queue. A size of 0 (unknown) keeps the row's."""
        self.catalog.replace_refs(refs)

    # ------------------------------------------------------------------ checks

    def check(self) -> list[str]:
        """Its invariants, as findings naming the object: every count is positive but a
        queued node's, which is 0; a queued key is a node; no object has a row and a
        garbage row at once."""
        rows = self.all()
        queued = set(self.queued())
        found = [
            f"{key_to_store_key(key)}: a refcount row of {count}"
            + (" and queued" if key in queued else "")
            for key, (count, _size) in sorted(rows.items())
            if count < 0 or (count == 0) != (key in queued)
        ]
        found += [
            f"{key_to_store_key(key)}: queued without a refcount row"
            for key in sorted(queued - set(rows))
        ]
        found += [
            f"{key_to_store_key(key)}: queued, not a tree node"
            for key in sorted(queued)
            if key[:1] != K_NODE
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
