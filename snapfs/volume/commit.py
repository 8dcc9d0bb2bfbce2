"""One flush commit as values (docs/design.md, "The flush cycle").

A commit goes select → stage → plan → apply → publish:

`select` (here, pure: no await)
    which blocks of which head a commit takes, up to which epoch: a `Selection`.
`stage` (`Committer._stage`: reads the cache file or the saves, hashes, uploads full packs)
    → `Staged`: block → chunk id (None for zeros) and the chunks this commit stores.
`plan` (here: awaits only to read tree nodes, writes nothing anywhere)
    → `CommitPlan`: the new root, the nodes to store, the refcount deltas and the sizes
    of the new objects, the blocks that may turn clean with their write generations, the
    saves to release. Then the flusher stores the plan's nodes and makes everything
    durable (`Committer._store_nodes`), and asks the fence whether it still owns the store.
`apply` (`Committer._apply`, a plain `def`: no await is possible)
    one catalog transaction (index rows, refs, volume and snapshot rows, dirty and frozen
    rows, the change counter), then memory (root, marks clean, saves released). A plan is
    applied once.
`publish` (`Committer.publish`, then `Collector.collect`, through the fence).

owns: nothing that outlives a commit: these are the values one commit passes on.
does not own: the dirty records (`VolumeCache`), the saves (`CowSaves`), the counts
    (`Refcounts`), the tree nodes (`TreeReader`); they are read here, changed by `apply`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snapfs.tree import decode_node, levels_for
from snapfs.volume.check import K_CHUNK, K_NODE
from snapfs.volume.refcounts import Refcounts

if TYPE_CHECKING:
    from snapfs.tree import TreeReader
    from snapfs.volume.cache import Dirty
    from snapfs.volume.catalog import SnapshotRow, VolumeRow
    from snapfs.volume.head import Head


@dataclass(frozen=True)
class Selection:
    """What one commit takes: blocks of one head dirty up to `epoch`."""

    snap: SnapshotRow | None  # the pending snapshot this commit completes; None: the head
    epoch: int  # the snapshot's epoch, or the head's own
    cached: tuple[tuple[int, int], ...]  # (blk, write generation) read from the cache file
    saved: tuple[tuple[int, int], ...]  # (blk, slot) read from the saves file


def select(head: Head, snap: SnapshotRow | None, blocks: Iterable[int] = ()) -> Selection:
    """A snapshot commit takes every block dirty up to its epoch, from its save when the
    block was overwritten since; a head commit takes `blocks`.

    The cut: the committed tree never holds a block version newer than the epoch of a
    snapshot still pending on the volume (that snapshot's commit builds on the tree), so a
    head commit never runs while one is pending."""
    assert snap is not None or not head.pending, f"{head.row.name}: commit under a cut"
    epoch = head.row.epoch if snap is None else snap.epoch
    saved = {} if snap is None else head.saves.slots(epoch)
    if snap is not None:
        blocks = [b for b, d in head.dirty.items() if d.epoch <= epoch and b not in saved]
    cached = tuple((blk, head.dirty[blk].gen) for blk in blocks)
    return Selection(snap, epoch, cached, tuple(saved.items()))


@dataclass(frozen=True)
class Staged:
    """What staging found and stored: the tree changes and the new chunks (uploaded, or
    staged in the chunk store's last pack, which `_store_nodes` flushes)."""

    changes: dict[int, bytes | None]  # blk → chunk id; None: all zeros (a hole)
    uploads: tuple[bytes, ...]  # chunk ids with no refs row before this commit, in order


@dataclass(eq=False)
class CommitPlan:
    """Everything one commit changes, computed before any of it is made: `apply` takes it
    once, in one transaction with no await."""

    volume: int  # the head's volume id
    snap: SnapshotRow | None
    epoch: int
    keep_snapshot: bool  # the snapshot becomes available (False: it was deleted meanwhile)
    old_root: bytes | None  # the tree it was planned on (apply checks it is still the head's)
    root: bytes | None
    level: int
    nodes: dict[bytes, bytes]  # new tree nodes the store does not hold (id → encoded)
    deltas: dict[bytes, int]  # refcount deltas (increments first, then the old root's drop)
    sizes: dict[bytes, int]  # stored sizes of the objects this commit adds
    changes: dict[int, bytes | None]  # the tree's changes (blk → chunk id or None)
    candidates: tuple[tuple[int, int], ...]  # (blk, write generation) that may turn clean
    mapped_delta: int  # change in the number of blocks the tree maps
    bump: bool  # the published catalog changes (the change counter moves)
    applied: bool = False

    def take(self) -> None:
        """`apply` uses a plan once."""
        assert not self.applied, "a commit plan is applied once"
        self.applied = True

    def cleaned(self, dirty: dict[int, Dirty]) -> list[int]:
        """The candidates that turn clean, given the dirty records now: not written again
        since they were read (write generation), nor in a later epoch."""
        return [
            blk
            for blk, gen in self.candidates
            if (record := dirty.get(blk)) is not None
            and record.gen == gen
            and record.epoch <= self.epoch
        ]


async def plan(
    tree: TreeReader, refs: Refcounts, row: VolumeRow, selection: Selection, staged: Staged
) -> CommitPlan:
    """The tree update and the refcount deltas that put `staged` on the head's tree (`row`:
    its root, level and size). Reads tree nodes (through `tree`) and counts (`refs`);
    stores and records nothing. Called with commit_lock held: the counts and the root
    cannot change before the plan is applied."""
    old_root, old_level = row.root, row.root_level
    nblocks = -(-row.size // row.block_size)
    update = await tree.update(
        old_root, old_level, max(levels_for(nblocks), old_level), staged.changes
    )
    nodes = {oid: data for oid, data in update.new_nodes.items() if not refs.has(K_NODE + oid)}
    snap = selection.snap
    keep = snap is not None and snap.state != "deleting"
    deltas, sizes = increments(row.block_size, staged.uploads, nodes)
    if update.root is not None:
        refs.plan_add(deltas, K_NODE + update.root, 1 + keep)
    if old_root is not None:
        refs.plan_drop(deltas, K_NODE + old_root)
    mapped_delta = 0
    for blk, oid in staged.changes.items():
        was = await tree.lookup(old_root, old_level, blk)
        mapped_delta += (oid is not None) - (was is not None)
    return CommitPlan(
        volume=row.id,
        snap=snap,
        epoch=selection.epoch,
        keep_snapshot=keep,
        old_root=old_root,
        root=update.root,
        level=update.level,
        nodes=nodes,
        deltas=deltas,
        sizes=sizes,
        changes=staged.changes,
        candidates=selection.cached,
        mapped_delta=mapped_delta,
        bump=update.root != old_root or (snap is not None and not snap.temporary),
    )


def increments(
    bs: int, uploads: Iterable[bytes], nodes: dict[bytes, bytes]
) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """Refcount increments of what a commit stores (a new node counts its children) and the
    sizes of the new objects; the roots' own counts are the caller's."""
    deltas: dict[bytes, int] = {}
    sizes: dict[bytes, int] = {}
    for oid in uploads:
        sizes[K_CHUNK + oid] = bs + 1
        deltas.setdefault(K_CHUNK + oid, 0)
    for oid, data in nodes.items():
        sizes[K_NODE + oid] = len(data) + 1
        deltas.setdefault(K_NODE + oid, 0)
        level, entries = decode_node(data, oid)
        kind = K_NODE if level else K_CHUNK
        for child in entries.values():
            Refcounts.plan_add(deltas, kind + child)
    return deltas, sizes
