"""What the simulation expects of a volume: every version each block has had, and when.

Each write (or discard, or rollback) gives each block it touches a new *version*: its whole
content, the step its call began and the step it was acknowledged (None while in flight, or
for ever when the call failed or a crash cut it off). Steps are one counter for the whole
world, so "acknowledged before the snapshot began" is a plain comparison. From that:

- a read with no write of its own volume in flight must give the newest version;
- a snapshot taken over steps [start, end] holds, per block, the version current when it
  began or any version whose call overlapped it (a write in flight may or may not be in),
  and as a whole the volume at one instant: the calls it holds are a prefix of the
  volume's calls;
- after a crash a block holds the newest version made durable (acknowledged before an
  fsync, a snapshot of the volume or a sync began) or any later one, acknowledged or not,
  or a mix of them sector by sector (a write not synced may be torn);
  after a takeover, a published version or a later one, whole.

The world resolves every uncertainty by reading (after a failed call, a crash, or the first
read of a snapshot), so each version's content is always one definite block: the base of a
partial write is never in doubt.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Version:
    data: bytes
    start: int
    end: int | None = None  # acknowledged at this step; None: in flight, failed or cut off
    whole: bool = True  # False: its call failed, so it may have happened in part
    sure: bool = True  # False: it may not have happened at all (a failed call, not settled)
    atomic: bool = False  # its call (a rollback) changes every block at once, or none


def _overwritten(v: Version, versions: list[Version], before: int) -> bool:
    """Another version of the block surely replaced `v` before step `before`: its call
    began after v's returned, and it surely happened and returned before `before`. (Calls
    of one client are in order; two clients' overlapping calls on a block are in either.)"""
    return v.end is not None and any(
        w.sure and w.end is not None and v.end < w.start and w.end < before for w in versions
    )


def _live(versions: list[Version], before: int) -> list[Version]:
    """The versions the block may hold at step `before`, or that a later call may still
    leave it holding: those not surely replaced by then."""
    return [v for v in versions if not _overwritten(v, versions, before)]


@dataclass
class VolumeModel:
    name: str
    size: int
    bs: int
    blocks: list[list[Version]] = field(default_factory=list)
    durable: int = -1  # versions acknowledged before this step survive a crash
    published: int = -1  # ... and are in the store's newest catalog (a takeover keeps them)
    acked: bool = True  # the call that created the volume returned
    deleting: bool = False  # a delete call is under way (or was cut off)
    resizing: int | None = None  # a resize to this size is under way (or was cut off)
    touched: set[int] = field(default_factory=set)  # blocks ever written, discarded or grown
    shared: int = 0  # blocks 0..shared-1: every client writes them, whole blocks only

    @classmethod
    def new(cls, name: str, size: int, bs: int, content: bytes | None, step: int):
        content = content if content is not None else bytes(size)
        content += bytes(size - len(content))
        vol = cls(name, size, bs)
        vol.blocks = [[Version(content[i : i + bs], step, step)] for i in range(0, size, bs)]
        vol.durable = vol.published = step + 1
        vol.touched = {b for b, vs in enumerate(vol.blocks) if any(vs[0].data)}
        return vol

    def current(self, blk: int) -> bytes:
        return self.blocks[blk][-1].data

    def content(self, offset: int = 0, length: int | None = None) -> bytes:
        end = self.size if length is None else offset + length
        first, last = offset // self.bs, -(-end // self.bs)
        data = b"".join(self.current(b) for b in range(first, last))
        return data[offset - first * self.bs : end - first * self.bs]

    def blen(self, blk: int) -> int:
        return min(self.bs, self.size - blk * self.bs)

    def grow(self, size: int, step: int) -> None:
        """A resize to `size` returned: the tail block and the new blocks read zeros."""
        last = len(self.blocks) - 1
        if self.blen(last) < self.bs:
            tail = self.current(last)
            version = Version(
                tail + bytes(min(self.bs, size - last * self.bs) - len(tail)), step, step
            )
            self.blocks[last].append(version)
            self.touched.add(last)
        self.size = size
        for blk in range(len(self.blocks), -(-size // self.bs)):
            self.blocks.append([Version(bytes(self.blen(blk)), step, step)])
            self.touched.add(blk)

    def begin(self, offset: int, data: bytes, step: int) -> list[tuple[int, Version]]:
        """A write of `data` at `offset` began: one new version per block it touches."""
        out = []
        pos = 0
        while pos < len(data):
            blk, boff = divmod(offset + pos, self.bs)
            n = min(self.bs - boff, len(data) - pos)
            base = self.current(blk)
            version = Version(base[:boff] + data[pos : pos + n] + base[boff + n :], step)
            self.blocks[blk].append(version)
            self.touched.add(blk)
            out.append((blk, version))
            pos += n
        return out

    def replace_all(self, content: bytes, step: int) -> list[tuple[int, Version]]:
        out = []
        for blk, versions in enumerate(self.blocks):
            version = Version(content[blk * self.bs : (blk + 1) * self.bs], step, atomic=True)
            versions.append(version)
            self.touched.add(blk)
            out.append((blk, version))
        return out

    def settle(self, blk: int, data: bytes, why: str, now: int) -> None:
        """The block was read as `data` after an uncertain event: it must be one of the
        versions after the last one known to have happened; it is the only one now."""
        versions = self.blocks[blk]
        last_known = max((i for i, v in enumerate(versions) if v.end is not None), default=0)
        candidates = versions[last_known:]
        for v in reversed(candidates):
            if v.data == data:  # it happened; the others after the last known did not
                keep = versions[: last_known + 1] + ([v] if v is not versions[last_known] else [])
                self.blocks[blk] = keep
                if v.end is None:
                    v.end = now
                return
        raise AssertionError(
            f"{self.name} block {blk} after {why}: read {_show(data)}, expected one of "
            f"{[_show(v.data) for v in candidates]}"
        )

    def crash_candidates(self, blk: int, mark: int | None = None) -> list[Version]:
        return _live(self.blocks[blk], self.durable if mark is None else mark)

    def after_crash(self, blk: int, data: bytes, now: int, takeover: bool = False) -> None:
        """After a crash the block holds a durable version or a later one; after another
        writer took the store over, a published version or a later one. What it holds is
        the block's newest version from now on; the versions since the published mark
        stay, since a later takeover may go back to any of them (a crash publishes
        nothing, the flusher may have published any of them before it)."""
        mark = self.published if takeover else self.durable
        candidates = self.crash_candidates(blk, mark)
        if any(v.data == data for v in candidates) or (
            not takeover and _torn_of(data, [v.data for v in candidates])
        ):
            # The flusher may have published any version since the published mark: a
            # later takeover may go back to any of them.
            base = [] if takeover else self.crash_candidates(blk, self.published)
            self.blocks[blk] = [*base, Version(data, now, now)]
            return
        what = "published" if takeover else "durable"
        raise AssertionError(
            f"{self.name} block {blk} after a {'takeover' if takeover else 'crash'}: read "
            f"{_show(data)}, expected one of "
            f"{[(_show(v.data), v.start, v.end) for v in self.crash_candidates(blk, mark)]} "
            f"({what} since step {mark}; all versions "
            f"{[(_show(v.data), v.start, v.end) for v in self.blocks[blk]]}): "
            f"an acknowledged, {'synced' if takeover else 'fsynced'} write was lost"
        )

    def snapshot_candidates(self, blk: int, start: int, end: int | None) -> list[Version]:
        """The versions current when the snapshot (or read) began, then every later one
        whose call began before it returned."""
        return [v for v in _live(self.blocks[blk], start) if end is None or v.start < end]

    def prune(self, keep_from: int) -> None:
        """Forget versions that nothing can ask for again: superseded by a version
        acknowledged before `keep_from` (the oldest unresolved snapshot's start and the
        durable point)."""
        keep_from = min(keep_from, self.durable, self.published)
        for blk, versions in enumerate(self.blocks):
            if len(versions) > 1:
                self.blocks[blk] = _live(versions, keep_from)

    def settle_shared(self, blk: int, data: bytes, why: str, now: int) -> None:
        """A block several clients write whole (in either order when their calls overlap)
        read as `data` with no call on it in flight: one of the versions it may hold now;
        calls that never returned and do not show did not happen."""
        versions = self.blocks[blk]
        live = _live(versions, now)
        if not any(v.data == data for v in live):
            raise AssertionError(
                f"{self.name} block {blk} after {why}: read {_show(data)}, expected one of "
                f"{[(_show(v.data), v.start, v.end) for v in live]}"
            )
        for v in versions:
            if v.end is None:  # cut off: it may have happened, then before now
                v.end, v.sure, v.whole = now, v.data == data, False
        # What it holds now, said again: it replaces every version that returned before.
        versions.append(Version(data, now, now))


@dataclass
class SnapModel:
    volume: str
    name: str
    start: int
    end: int | None = None  # the create call returned at this step
    temporary: bool = False
    deleting: bool = False  # a delete call is under way
    published: bool = False  # a sync began after it was taken and returned
    content: bytes | None = None  # once read
    # per block, fixed when the call returned: the versions it may hold, oldest first
    candidates: list[list[Version]] | None = None

    def fix_candidates(self, vol: VolumeModel) -> None:
        self.candidates = [
            vol.snapshot_candidates(b, self.start, self.end) for b in range(len(vol.blocks))
        ]

    def resolve(self, data: bytes, bs: int) -> None:
        if self.content is not None:
            assert data == self.content, f"snapshot {self.volume}@{self.name} changed"
            return
        assert self.candidates is not None
        assert -(-len(data) // bs) == len(self.candidates), f"{self.volume}@{self.name}: size"
        for blk, options in enumerate(self.candidates):
            got = data[blk * bs : (blk + 1) * bs]
            assert any(got == o.data for o in options), (
                f"snapshot {self.volume}@{self.name} block {blk}: read {_show(got)}, "
                f"expected one of {[_show(o.data) for o in options]}"
            )
        self.check_cut(data, bs)
        self.check_atomic(data, bs)
        self.content = data
        self.candidates = None

    def check_cut(self, data: bytes, bs: int) -> None:
        """The snapshot is the volume at one instant, not only block by block: if a call
        is in it (in part: the engine makes a call atomic against other writes, not
        against a snapshot), every call acknowledged before that call began is in it
        whole. Per block, the version it holds is in; a version whose call began after
        that one's returned is out (it would have replaced it). No call out may have been
        acknowledged before a call in began. (A call that failed may have happened in
        part: never counted out; a block whose content two versions share is left out.)"""
        latest_in: tuple[int, int] | None = None  # (start, block) of the latest call in
        earliest_out: tuple[int, int] | None = None  # (end, block) of the first acked out
        for blk, versions in enumerate(self.candidates):
            if len(versions) < 2:
                continue
            got = data[blk * bs : (blk + 1) * bs]
            held = [v for v in versions if v.data == got]
            if len(held) != 1:
                continue
            v = held[0]
            if latest_in is None or v.start > latest_in[0]:
                latest_in = (v.start, blk)
            for w in versions:
                out = v.end is not None and w.start > v.end and w.end is not None
                if out and w.whole and w.sure and (earliest_out is None or w.end < earliest_out[0]):
                    earliest_out = (w.end, blk)
        if latest_in is not None and earliest_out is not None and earliest_out[0] < latest_in[0]:
            raise AssertionError(
                f"snapshot {self.volume}@{self.name} is no cut of the volume at one instant: "
                f"block {latest_in[1]} holds the call that began at step {latest_in[0]}, "
                f"block {earliest_out[1]} lacks one acknowledged before, at step "
                f"{earliest_out[0]}"
            )

    def check_atomic(self, data: bytes, bs: int) -> None:
        """A rollback replaces the whole volume at one instant: a snapshot holds all of it
        or none of it, even one taken while the rollback call was under way. Per block
        where the two differ: the rollback's version, or one from before it."""
        held: dict[int, tuple[list[int], list[int]]] = {}  # rollback start → (in, out)
        for blk, versions in enumerate(self.candidates):
            got = data[blk * bs : (blk + 1) * bs]
            for v in versions:
                if not (v.atomic and v.whole):
                    continue
                before = {w.data for w in versions if w.start < v.start}
                if v.data in before:
                    continue  # the rollback may not change this block: it tells nothing
                if got == v.data:
                    held.setdefault(v.start, ([], []))[0].append(blk)
                elif got in before:
                    held.setdefault(v.start, ([], []))[1].append(blk)
        for start, (rolled, kept) in held.items():
            if rolled and kept:
                raise AssertionError(
                    f"snapshot {self.volume}@{self.name} holds part of the rollback that began "
                    f"at step {start}: blocks {rolled[:4]} rolled back, {kept[:4]} not"
                )


SECTOR = 512


def _torn_of(data: bytes, options: list[bytes]) -> bool:
    """A write not yet synced when the node crashed may survive in part: each 512-byte
    sector of the block holds that sector of one of the versions it may hold."""
    return all(
        any(o[i : i + SECTOR] == data[i : i + SECTOR] for o in options)
        for i in range(0, len(data), SECTOR)
    )


def _show(block: bytes) -> str:
    """A short name for a block's content: the sim writes blocks made of 8-byte tags."""
    if not any(block):
        return "zeros"
    tags = sorted({block[i : i + 8] for i in range(0, len(block), 8)} - {bytes(8)})
    return "+".join(t.decode(errors="replace").strip() for t in tags[:4]) + (
        "+..." if len(tags) > 4 else ""
    )
