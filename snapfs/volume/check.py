"""The invariant oracle: refcounts recomputed from the roots, and the store checked against
them. `snapfs fsck` uses it (with the components' own `check()`s, see
`Checker.check`); so do the tests, at the end of each scenario; and a fresh cache dir
rebuilds its refcounts with it (store-only restore).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from snapfs.chunks import CHUNK, NODE
from snapfs.errors import IntegrityError, ObjectNotFound
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


@dataclass(frozen=True)
class Root:
    """Something that keeps a tree alive, named as a finding names it: "volume db",
    "snapshot db@nightly", "reference 0123abcd… (nightly)"."""

    name: str
    node: bytes | None
    block_size: int
    queued: bool = False  # a node on the queue of dropped trees: its own count is 0


class Walk:
    """One walk over the trees of `roots`: every object each reaches, counted as refcounts
    count (a root counts one, a node one per child), each subtree visited once.

    Strict (a restore): a node that cannot be read raises. Not strict (fsck): it is
    remembered in `unreadable` (node key → (the error, the root being walked)) and the walk
    goes on with the rest. `want`: the keys whose first root to remember in `needed_by`
    (fsck's second walk, made only when something is wrong)."""

    def __init__(
        self, tree: TreeReader, strict: bool = True, want: Collection[bytes] = frozenset()
    ):
        self.tree, self.strict, self.want = tree, strict, want
        self.counts: dict[bytes, int] = {}
        self.sizes: dict[bytes, int] = {}
        self.unreadable: dict[bytes, tuple[Exception, Root]] = {}
        self.needed_by: dict[bytes, Root] = {}

    def refs(self) -> dict[bytes, tuple[int, int]]:
        """{key: (count, stored size)}; an unreadable node's size is unknown (0)."""
        return {k: (c, self.sizes.get(k, 0)) for k, c in self.counts.items()}

    async def run(self, roots: list[Root]) -> Walk:
        for root in roots:
            if root.node is not None and self._count(ref_key(K_NODE, root.node), root):
                await self._visit(root.node, root)
        for root in roots:  # after the walk: a count of 0 must not make a subtree new
            if root.queued and root.node is not None:
                self.counts[ref_key(K_NODE, root.node)] -= 1
        return self

    def _count(self, key: bytes, root: Root) -> bool:
        """Count one reference to `key`; whether it is the first (its subtree is new)."""
        count = self.counts.get(key, 0)
        self.counts[key] = count + 1
        if not count and key in self.want:
            self.needed_by[key] = root
        return not count

    async def _visit(self, oid: bytes, root: Root) -> None:
        try:
            level, entries = await self.tree.node(oid)
        except (ObjectNotFound, IntegrityError) as exc:
            if self.strict:
                raise
            self.unreadable[ref_key(K_NODE, oid)] = (exc, root)
            return
        self.sizes[ref_key(K_NODE, oid)] = len(encode_node(level, entries)) + 1
        kind = K_NODE if level else K_CHUNK
        for child in entries.values():
            key = ref_key(kind, child)
            first = self._count(key, root)
            if level == 0:
                if not root.queued:  # a queued node's block size is unknown
                    self.sizes[key] = root.block_size + 1
            elif first:
                await self._visit(child, root)


async def expected_refs(
    tree: TreeReader, roots: list[tuple[bytes | None, int]], strict: bool = True
) -> dict[bytes, tuple[int, int]]:
    """{key: (count, stored size)} for every object reachable from `roots`
    ((root, block_size) pairs, one per volume head or snapshot). Raises ObjectNotFound or
    IntegrityError when a node cannot be read; not `strict` (a restore for fsck), its
    subtree is left out and the walk goes on."""
    walk = await Walk(tree, strict).run([Root("", node, bs) for node, bs in roots])
    return walk.refs()


SHOWN = 50  # findings of each kind a report carries (the count says how many in all)


@dataclass
class CheckReport:
    """What fsck found, one line per finding, each naming the object (and, for a stored
    object, the first root that needs it)."""

    objects: int = 0
    wrong_counts: list[str] = field(default_factory=list)  # refcounts vs the roots
    missing: list[str] = field(default_factory=list)  # referenced, not in the store
    corrupt: list[str] = field(default_factory=list)  # read back, not matching its digest
    state: list[str] = field(default_factory=list)  # the local components' own checks
    not_checked: list[str] = field(default_factory=list)  # checks that do not apply here
    orphan_packs: int = 0
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (self.wrong_counts or self.missing or self.corrupt or self.state)

    def findings(self) -> int:
        return sum(map(len, (self.wrong_counts, self.missing, self.corrupt, self.state)))

    def as_dict(self) -> dict:
        return {
            "objects": self.objects,
            "clean": self.clean,
            "repaired": self.repaired,
            "findings": self.findings(),
            "wrong_counts": self.wrong_counts[:SHOWN],
            "missing": self.missing[:SHOWN],
            "corrupt": self.corrupt[:SHOWN],
            "state": self.state[:SHOWN],
            "not_checked": self.not_checked,
            "orphan_packs": self.orphan_packs,
        }
