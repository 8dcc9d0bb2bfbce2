"""A copy-on-write radix tree mapping block number → chunk id.

Like a page table: each node has up to 256 slots; a leaf (level 0) maps the low 8 bits of a
block number to a chunk id, a node at level L maps bits 8L..8L+7 to a child node. Absent slots
are holes. Nodes are immutable and content-addressed; an update copies the path from each
changed leaf to the root, so a root digest is a complete, exact snapshot, and two roots share
every subtree they have in common. `diff` skips equal subtrees by digest: O(changes).

    node = msgpack [FORMAT=1, level:int, {slot:int → id:bytes(32)}]   (slots ascending)

An empty tree is the root `None`. Growing a volume adds levels on top (the old root becomes
slot 0 of a new root), so the data of a volume never moves when it grows.
"""

from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from snapfs import codec
from snapfs.chunks import NODE, ChunkStore, digest
from snapfs.errors import IntegrityError

BITS = 8
FANOUT = 1 << BITS
FORMAT = 1


def levels_for(nblocks: int) -> int:
    """Level of the root of a tree that can address `nblocks` blocks."""
    level = 0
    while FANOUT ** (level + 1) < nblocks:
        level += 1
    return level


def encode_node(level: int, entries: dict[int, bytes]) -> bytes:
    return codec.pack([FORMAT, level, {k: entries[k] for k in sorted(entries)}])


def decode_node(data: bytes, oid: bytes) -> tuple[int, dict[int, bytes]]:
    what = f"tree node {oid.hex()}"
    obj = codec.unpack(data, what)
    if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == FORMAT):
        raise IntegrityError(f"{what}: not a format-{FORMAT} node")
    level, entries = obj[1], obj[2]
    if not isinstance(level, int) or not isinstance(entries, dict):
        raise IntegrityError(f"{what}: malformed")
    return level, entries


def _reached(root: bytes | None, made: dict[bytes, tuple[int, dict[int, bytes]]]) -> set[bytes]:
    """The nodes of `made` (id → decoded node) that `root` reaches through nodes of `made`."""
    reached: set[bytes] = set()
    stack = [root]
    while stack:
        oid = stack.pop()
        if oid in made and oid not in reached:
            reached.add(oid)
            node_level, entries = made[oid]
            if node_level:
                stack.extend(entries.values())
    return reached


@dataclass
class Update:
    """Result of an update: the new root and the nodes it created (id → encoded bytes),
    children before parents. Some of them may already exist in the store."""

    root: bytes | None
    level: int
    new_nodes: dict[bytes, bytes] = field(default_factory=dict)


class TreeReader:
    """Reads and derives trees through a ChunkStore, with an LRU of decoded nodes."""

    def __init__(self, chunks: ChunkStore, cached_nodes: int = 8192) -> None:
        self.chunks = chunks
        self._cache: OrderedDict[bytes, tuple[int, dict[int, bytes]]] = OrderedDict()
        self._limit = cached_nodes

    def remember(self, oid: bytes, node: tuple[int, dict[int, bytes]]) -> None:
        self._cache[oid] = node
        self._cache.move_to_end(oid)
        if len(self._cache) > self._limit:
            self._cache.popitem(last=False)

    async def node(self, oid: bytes) -> tuple[int, dict[int, bytes]]:
        node = self._cache.get(oid)
        if node is None:
            node = decode_node(await self.chunks.get(NODE, oid), oid)
            self.remember(oid, node)
        else:
            self._cache.move_to_end(oid)
        return node

    async def lookup(self, root: bytes | None, level: int, blk: int) -> bytes | None:
        if root is None or blk >> (BITS * (level + 1)):
            return None
        oid = root
        while True:
            node_level, entries = await self.node(oid)
            child = entries.get((blk >> (BITS * node_level)) & (FANOUT - 1))
            if child is None or node_level == 0:
                return child
            oid = child

    async def update(
        self,
        root: bytes | None,
        level: int,
        new_level: int,
        changes: dict[int, bytes | None],
    ) -> Update:
        """Apply {blk: chunk id or None (hole)} to the tree; grow it to `new_level` first."""
        out = Update(root, level)
        made: dict[bytes, tuple[int, dict[int, bytes]]] = {}

        def make(node_level: int, entries: dict[int, bytes]) -> bytes | None:
            if not entries:
                return None
            data = encode_node(node_level, entries)
            oid = digest(data)
            out.new_nodes[oid] = data
            made[oid] = (node_level, dict(entries))
            self.remember(oid, made[oid])
            return oid

        while level < new_level:
            level += 1
            root = make(level, {0: root}) if root is not None else None

        async def apply(oid: bytes | None, node_level: int, items: list[tuple[int, bytes | None]]):
            entries = dict((await self.node(oid))[1]) if oid is not None else {}
            shift = BITS * node_level
            if node_level == 0:
                for blk, value in items:
                    slot = blk & (FANOUT - 1)
                    if value is None:
                        entries.pop(slot, None)
                    else:
                        entries[slot] = value
                return make(0, entries)
            groups: dict[int, list[tuple[int, bytes | None]]] = {}
            for blk, value in items:
                groups.setdefault((blk >> shift) & (FANOUT - 1), []).append((blk, value))
            for slot, group in groups.items():
                child = await apply(entries.get(slot), node_level - 1, group)
                if child is None:
                    entries.pop(slot, None)
                else:
                    entries[slot] = child
            return make(node_level, entries)

        if changes:
            limit = FANOUT ** (level + 1)
            bad = [b for b in changes if b < 0 or b >= limit]
            if bad:
                raise ValueError(f"block {bad[0]} outside a level-{level} tree")
            root = await apply(root, level, sorted(changes.items()))
        out.root, out.level = root, level
        # Growing wraps the old root in new nodes that `apply` may then replace: only the
        # new nodes the new root reaches are part of it (the others would count their
        # children, the old root among them, once too often).
        reached = _reached(root, made)
        out.new_nodes = {oid: data for oid, data in out.new_nodes.items() if oid in reached}
        return out

    async def items(
        self, root: bytes | None, level: int, lo: int = 0, hi: int | None = None
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Every mapped (block, chunk id) with lo <= block < hi, in block order. Subtrees
        outside the range are not read."""
        if root is None:
            return
        stack = [(root, 0)]
        while stack:
            oid, base = stack.pop()
            node_level, entries = await self.node(oid)
            if node_level == 0:
                for slot in sorted(entries):
                    if lo <= base + slot and (hi is None or base + slot < hi):
                        yield base + slot, entries[slot]
            else:
                shift = BITS * node_level
                for slot in sorted(entries, reverse=True):
                    start = base + (slot << shift)
                    if start + (1 << shift) > lo and (hi is None or start < hi):
                        stack.append((entries[slot], start))

    async def diff(self, a: bytes | None, a_level: int, b: bytes | None, b_level: int) -> list[int]:
        """Blocks whose mapping differs between two trees, sorted. Equal subtrees are skipped
        by digest, so the cost follows the number of changes. A lower tree is read as the
        slot-0 subtree of a taller one, which is exactly what growing a volume makes."""
        changed: list[int] = []

        async def children(oid: bytes | None, own: int, at: int) -> dict[int, tuple[bytes, int]]:
            if oid is None:
                return {}
            if own < at:
                return {0: (oid, own)}
            _, entries = await self.node(oid)
            return {slot: (child, at - 1) for slot, child in entries.items()}

        async def walk(x: bytes | None, xl: int, y: bytes | None, yl: int, at: int, base: int):
            if x == y and (x is None or xl == yl):
                return
            if at == 0:
                ex = (await self.node(x))[1] if x is not None else {}
                ey = (await self.node(y))[1] if y is not None else {}
                changed.extend(
                    base + s for s in sorted(set(ex) | set(ey)) if ex.get(s) != ey.get(s)
                )
                return
            cx, cy = await children(x, xl, at), await children(y, yl, at)
            shift = BITS * at
            for slot in sorted(set(cx) | set(cy)):
                x2, xl2 = cx.get(slot, (None, at - 1))
                y2, yl2 = cy.get(slot, (None, at - 1))
                await walk(x2, xl2, y2, yl2, at - 1, base + (slot << shift))

        await walk(a, a_level, b, b_level, max(a_level, b_level), 0)
        return changed

    async def node_ids(
        self, root: bytes | None
    ) -> AsyncIterator[tuple[bytes, int, dict[int, bytes]]]:
        """Every node of a tree once per reference path (callers dedupe by id)."""
        if root is None:
            return
        stack = [root]
        while stack:
            oid = stack.pop()
            node_level, entries = await self.node(oid)
            yield oid, node_level, entries
            if node_level > 0:
                stack.extend(entries.values())
