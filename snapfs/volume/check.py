"""The invariant oracle: refcounts recomputed from the roots, and the store checked against
them. `snapfs fsck` uses it; so do the tests, at the end of each scenario; and a fresh cache
dir rebuilds its refcounts with it (store-only restore).
"""

from dataclasses import dataclass, field

from snapfs.chunks import CHUNK, NODE
from snapfs.tree import TreeReader, encode_node

K_CHUNK = CHUNK.encode()
K_NODE = NODE.encode()
K_PACK = b"p"  # in the garbage queue: a pack to delete from the store
K_FRAG = b"i"  # ... an index fragment (its digest)
K_CATALOG = b"g"  # ... a catalog object (its seq, 8 bytes big-endian)


def ref_key(kind: bytes, oid: bytes) -> bytes:
    return kind + oid


def key_to_store_key(key: bytes) -> str:
    """How a blob key is named in messages: kind/hex."""
    return f"{key[:1].decode()}/{key[1:].hex()}"


async def expected_refs(
    tree: TreeReader, roots: list[tuple[bytes | None, int]]
) -> dict[bytes, tuple[int, int]]:
    """{key: (count, stored size)} for every object reachable from `roots`
    ((root, block_size) pairs, one per volume head or snapshot)."""
    counts: dict[bytes, int] = {}
    sizes: dict[bytes, int] = {}

    async def visit(oid: bytes, block_size: int) -> None:
        level, entries = await tree.node(oid)
        sizes[ref_key(K_NODE, oid)] = len(encode_node(level, entries)) + 1
        kind = K_NODE if level else K_CHUNK
        for child in entries.values():
            key = ref_key(kind, child)
            first = key not in counts
            counts[key] = counts.get(key, 0) + 1
            if level == 0:
                sizes[key] = block_size + 1
            elif first:
                await visit(child, block_size)

    for root, block_size in roots:
        if root is None:
            continue
        key = ref_key(K_NODE, root)
        first = key not in counts
        counts[key] = counts.get(key, 0) + 1
        if first:
            await visit(root, block_size)
    return {k: (c, sizes[k]) for k, c in counts.items()}


@dataclass
class CheckReport:
    objects: int = 0
    wrong_counts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # read back, not matching its digest
    orphan_packs: int = 0
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.wrong_counts and not self.missing and not self.corrupt

    def as_dict(self) -> dict:
        return {
            "objects": self.objects,
            "clean": self.clean,
            "repaired": self.repaired,
            "wrong_counts": self.wrong_counts[:50],
            "missing": self.missing[:50],
            "corrupt": self.corrupt[:50],
            "orphan_packs": self.orphan_packs,
        }
