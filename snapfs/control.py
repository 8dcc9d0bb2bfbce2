"""The command language shared by the ctl file and the CLI.

A command is one line of shell-quoted words, the same words a user gives the `snapfs` CLI:

    snapshot create db@nightly --temporary
    volume create db2 --size 40G --from db@nightly

`parse()` turns a line into (spec, params) or raises InvalidArgument with one line saying
why; `execute()` runs it against the engine as a given uid and returns a JSON-able result.
"""

import logging
import os
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from snapfs.access import check_owner, check_root, visible
from snapfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound, PermissionDenied
from snapfs.units import IMPORTING, check_name, parse_seconds, parse_size, split_snapshot_ref
from snapfs.volume.bank import restore_backup
from snapfs.volume.catalog import ReferenceRow, SnapshotRow, check_guid
from snapfs.volume.engine import Engine

log = logging.getLogger("snapfs.control")

MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class Spec:
    words: tuple[str, ...]
    args: tuple[str, ...] = ()  # positional parameter names; a trailing '?' makes it optional
    options: dict[str, Callable[[str], Any]] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    help: str = ""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise InvalidArgument(f"invalid threshold {text[:20]!r}: a fraction in (0, 1]")
    return value


def _volume(text: str) -> str:
    return check_name(text, "volume name")


SPECS = [
    Spec(
        ("volume", "create"),
        ("name",),
        {
            "size": parse_size,
            "block-size": lambda t: parse_size(t, "block size"),
            "from": split_snapshot_ref,
        },
        help="create a volume (--size, or --from VOL@SNAP to clone)",
    ),
    Spec(("volume", "list"), help="list volumes"),
    Spec(("volume", "show"), ("name",), help="show one volume"),
    Spec(("volume", "resize"), ("name",), {"size": parse_size}, help="grow a volume"),
    Spec(
        ("volume", "delete"),
        ("name",),
        flags=("recursive",),
        help="delete a volume (--recursive: with its snapshots)",
    ),
    Spec(
        ("snapshot", "create"),
        ("ref",),
        {"guid": check_guid},
        flags=("temporary",),
        help="take a snapshot (--guid HEX: with that identity, as receive does)",
    ),
    Spec(("snapshot", "list"), ("volume?",), help="list snapshots"),
    Spec(("snapshot", "show"), ("ref",), help="show one snapshot"),
    Spec(("snapshot", "delete"), ("ref",), help="delete a snapshot"),
    Spec(("snapshot", "rollback"), ("ref",), help="roll a volume back to a snapshot"),
    Spec(
        ("snapshot", "unmanage"),
        ("ref",),
        help="forget a snapshot, keeping its data under a reference (prints its id)",
    ),
    Spec(
        ("snapshot", "manage"),
        ("volume", "reference"),
        {"name": lambda t: check_name(t, "snapshot name")},
        help="adopt a reference as a snapshot of VOLUME (--name NAME)",
    ),
    Spec(("snapshot", "unmanaged", "list"), help="list references (unmanaged snapshots)"),
    Spec(("snapshot", "unmanaged", "show"), ("reference",), help="show one reference"),
    Spec(
        ("snapshot", "unmanaged", "delete"),
        ("reference",),
        help="drop a reference: frees what nothing else needs",
    ),
    Spec(
        ("restore",),
        ("name",),
        {"bank": str, "as": _volume},
        help="",  # `snapfs restore` (snapfs/backup.py) sends it; in the CLI's usage text
    ),
    Spec(
        ("cancel", "restore"),
        ("volume",),
        help="stop the restore into VOLUME (what it copied stays: run it again to go on)",
    ),
    Spec(
        ("diff",),
        ("a", "b?"),
        help="blocks changed between two snapshots of a volume (VOL@A VOL@B), since a "
        "snapshot (VOL@A VOL), or allocated in one (VOL@A)",
    ),
    Spec(("sync",), help="upload everything dirty and publish the catalog"),
    Spec(("stats",), help="daemon statistics"),
    Spec(
        ("fsck",),
        flags=("repair", "verify-data"),
        help="recompute refcounts and check the store (--verify-data: read every object)",
    ),
    Spec(
        ("gc",),
        options={"threshold": lambda t: _fraction(t)},
        help="rewrite packs whose live share fell below --threshold (default 0.5)",
    ),
    Spec(("evict",), help="drop clean cached blocks (root only)"),
    Spec(("status",), help="daemon status"),
    # `snapfs import` and `snapfs export` (snapfs/images.py) send these; not commands of their own
    Spec(("image", "begin"), ("volume",), {"size": parse_size, "block-size": parse_size}),
    Spec(
        ("image", "finish"),
        ("volume", "hidden"),
        {"snapshot": lambda t: check_name(t, "snapshot name")},
    ),
    Spec(("image", "abort"), ("volume",)),
    Spec(("image", "extents"), ("ref",)),
    Spec(
        ("umount",),
        options={"within": lambda t: parse_seconds(t, "umount timeout", 3600)},
        help="",  # `snapfs umount` sends it before unmounting; not a command of its own
    ),
]
_BY_WORDS = {s.words: s for s in SPECS}


def parse(line: str) -> tuple[Spec, dict[str, Any]]:
    if len(line) > MAX_LINE:
        raise InvalidArgument(f"command line longer than {MAX_LINE} bytes")
    if "\x00" in line:
        raise InvalidArgument("command line contains a NUL byte")
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise InvalidArgument(f"cannot parse command line: {exc}") from None
    if not words:
        raise InvalidArgument("empty command")
    spec = next(
        (_BY_WORDS[tuple(words[:n])] for n in (3, 2, 1) if tuple(words[:n]) in _BY_WORDS), None
    )
    if spec is None:
        shown = " ".join(words[:2])[:60]
        raise InvalidArgument(f"unknown command {shown!r}")
    rest = words[len(spec.words) :]
    params: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name in spec.flags and not eq:
                params[name.replace("-", "_")] = True
            elif name in spec.options:
                if not eq:
                    i += 1
                    if i >= len(rest):
                        raise InvalidArgument(f"option --{name} needs a value")
                    value = rest[i]
                params[name.replace("-", "_")] = spec.options[name](value)
            else:
                raise InvalidArgument(f"unknown option {word[:40]!r} for '{' '.join(spec.words)}'")
        else:
            positional.append(word)
        i += 1
    names = list(spec.args)
    required = [n for n in names if not n.endswith("?")]
    if len(positional) < len(required) or len(positional) > len(names):
        usage = " ".join(n.upper().rstrip("?") for n in names)
        raise InvalidArgument(f"usage: {' '.join(spec.words)} {usage}".rstrip())
    for name, value in zip(names, positional, strict=False):
        params[name.rstrip("?")] = value
    return spec, params


Handler = Callable[..., Awaitable[Any]]


class Controller:
    """Runs parsed commands against the engine on behalf of a uid."""

    def __init__(self, engine: Engine, status: dict[str, Any]) -> None:
        self.engine = engine
        self.status = status
        # volume → (the restore's copy, who started it); its progress is in status
        self._restores: dict[str, tuple[trio.CancelScope, int]] = {}

    async def execute(self, line: str, uid: int) -> Any:
        spec, params = parse(line)
        handler: Handler = getattr(self, "do_" + "_".join(spec.words))
        return await handler(uid=uid, **params)

    async def do_volume_create(self, uid, name, size=None, block_size=None, **kw):
        source: tuple[str, str] | None = kw.get("from")
        if source is None and size is None:
            raise InvalidArgument("volume create needs --size SIZE or --from VOL@SNAP")
        if source is not None and size is None:
            size = (await self.engine.wait_available(*source)).size
        _volume(name)
        row = await self.engine.create_volume(name, size, block_size, uid=uid, source=source)
        return self.engine.volume_info(row.name)

    async def do_volume_list(self, uid):
        return [
            self.engine.volume_info(v.name)
            for v in self.engine.volumes()
            if visible(v.owner, uid) and not v.name.startswith(IMPORTING)
        ]

    async def do_volume_show(self, uid, name):
        vol = self.engine.volume(_volume(name))
        check_owner(vol.owner, uid, f"volume {name!r}")
        return self.engine.volume_info(name)

    async def do_volume_resize(self, uid, name, size=None):
        if size is None:
            raise InvalidArgument("volume resize needs --size SIZE")
        await self.engine.resize_volume(_volume(name), size, uid=uid)
        return self.engine.volume_info(name)

    async def do_volume_delete(self, uid, name, recursive=False):
        await self.engine.delete_volume(_volume(name), recursive=recursive, uid=uid)
        return {"deleted": name}

    async def do_snapshot_create(self, uid, ref, temporary=False, guid=None):
        vol, snap = split_snapshot_ref(ref)
        row = await self.engine.create_snapshot(vol, snap, temporary, uid=uid, guid=guid)
        return snapshot_info(row)

    async def do_snapshot_list(self, uid, volume=None):
        if volume is not None:
            _volume(volume)
            known = any(v.name == volume for v in self.engine.volumes())
            if not known and not self.engine.snapshots(volume):
                raise InvalidArgument(f"volume {volume!r} not found")
        return [
            snapshot_info(s)
            for s in self.engine.snapshots(volume)
            if s.state != "deleting" and visible(s.owner, uid)
        ]

    async def do_snapshot_show(self, uid, ref):
        snap = self.engine.snapshot_row(*split_snapshot_ref(ref))
        check_owner(snap.owner, uid, f"snapshot {ref}")
        info = snapshot_info(snap)
        info["parent_of"] = [v.name for v in self.engine.volumes() if v.parent == ref]
        return info

    async def do_snapshot_delete(self, uid, ref):
        await self.engine.delete_snapshot(*split_snapshot_ref(ref), uid=uid)
        return {"deleted": ref}

    async def do_snapshot_rollback(self, uid, ref):
        vol, snap = split_snapshot_ref(ref)
        await self.engine.rollback(vol, snap, uid=uid)
        return self.engine.volume_info(vol)

    async def do_snapshot_unmanage(self, uid, ref):
        return reference_info(await self.engine.unmanage(*split_snapshot_ref(ref), uid=uid))

    async def do_snapshot_manage(self, uid, volume, reference, name=None):
        row = await self.engine.manage(_volume(volume), reference, name, uid=uid)
        return snapshot_info(row)

    async def do_snapshot_unmanaged_list(self, uid):
        return [reference_info(r) for r in self.engine.references() if visible(r.owner, uid)]

    async def do_snapshot_unmanaged_show(self, uid, reference):
        ref = self.engine.reference(reference)
        check_owner(ref.owner, uid, f"reference {ref.id}")
        return reference_info(ref)

    async def do_snapshot_unmanaged_delete(self, uid, reference):
        await self.engine.delete_reference(reference, uid=uid)
        return {"deleted": reference}

    async def do_restore(self, uid, name, bank=None, **kw):
        """Copy a backup from a bank into this mount's store and make a volume of it, in
        this daemon (it is the store's writer; volume/bank.py). Root's or the mounting
        user's: the daemon opens the bank with its own rights and credentials."""
        if not visible(os.getuid(), uid):
            raise PermissionDenied("restore is for root and the user who mounted")
        volume = kw.get("as")
        if bank is None or volume is None:
            raise InvalidArgument("usage: restore NAME --bank BANK_URL --as VOL")
        running = self.status.setdefault("restores", {})
        if volume in running:
            raise Busy(f"a restore into {volume!r} is under way")
        running[volume] = {"backup": name, "copied_bytes": 0}
        cancel = trio.CancelScope()
        self._restores[volume] = (cancel, uid)

        def copied(n: int) -> None:
            running[volume]["copied_bytes"] += n

        try:
            return await restore_backup(self.engine, bank, name, volume, uid, copied, cancel)
        finally:
            del running[volume], self._restores[volume]

    async def do_cancel_restore(self, uid, volume):
        """Stop the restore into `volume` (the CLI sends it on Ctrl-C): its copy stops at
        once, what it copied stays for the next restore; a copy already complete still
        makes the volume. Its starter's or root's."""
        if volume not in self._restores:
            raise NotFound(f"no restore into {volume!r} is under way")
        cancel, starter = self._restores[volume]
        check_owner(starter, uid, f"the restore into {volume!r}")
        cancel.cancel()
        log.info("restore into %s: cancelled", volume)
        return {"cancelled": volume}

    async def do_diff(self, uid, a, b=None):
        """VOL@A VOL@B: blocks whose content differs; VOL@A VOL: blocks of the volume that
        may differ from the snapshot (dirty ones count); VOL@A: the snapshot's allocated
        blocks. The cost follows the blocks reported, not the size."""
        va, sa = split_snapshot_ref(a)
        vb = _volume(b) if b is not None and "@" not in b else None
        sb = None
        if b is not None and vb is None:
            vb, sb = split_snapshot_ref(b)
        if vb not in (None, va):
            raise InvalidArgument("diff compares two snapshots of the same volume")
        snap = self.engine.snapshot_row(va, sa)
        check_owner(snap.owner, uid, f"snapshot {a}")
        if b is None:
            blocks = await self.engine.allocated(va, sa)
        elif sb is None:
            blocks = await self.engine.changed_since(va, sa)
        else:
            blocks = await self.engine.diff(va, sa, sb)
        bs = snap.block_size
        extents: list[list[int]] = []
        for blk in blocks:
            if extents and extents[-1][0] + extents[-1][1] == blk * bs:
                extents[-1][1] += bs
            else:
                extents.append([blk * bs, bs])
        return {
            "block_size": bs,
            "changed_blocks": len(blocks),
            "changed_bytes": len(blocks) * bs,
            "extents": [{"offset": o, "length": n} for o, n in extents],
        }

    async def do_sync(self, uid):
        await self.engine.sync()
        return asdict(self.engine.statistics())

    async def do_stats(self, uid):
        return asdict(self.engine.statistics())

    async def do_fsck(self, uid, repair=False, verify_data=False):
        check_root(uid, "fsck")
        return (await self.engine.check(repair=repair, verify_data=verify_data)).as_dict()

    async def do_gc(self, uid, threshold=None):
        check_root(uid, "gc")
        return await self.engine.gc(threshold)

    async def do_evict(self, uid):
        check_root(uid, "evict", "it drops the cached blocks of every user")
        self.engine.evict_all()
        return {"cached_bytes": self.engine.statistics().cached_bytes}

    async def do_umount(self, uid, within=60.0):
        """Before an unmount: sync for at most `within` seconds; if that cannot be done the
        daemon will keep its cache at the unmount instead of flushing. Root's or the
        mounting user's."""
        if not visible(os.getuid(), uid):  # the mount is the mounting user's
            raise PermissionDenied("umount is for root and the user who mounted")
        prepare = self.status.get("prepare_umount")
        if prepare is None:
            raise InvalidArgument("umount: not a mount")
        return await prepare(within)

    async def do_image_begin(self, uid, volume, size=None, block_size=None):
        """An import starts: refuse an existing volume, drop what an interrupted import of
        the same name left, create the hidden volume it writes into (see IMPORTING)."""
        if size is None:
            raise InvalidArgument("image begin needs --size SIZE")
        if any(v.name == _volume(volume) for v in self.engine.volumes()):
            raise AlreadyExists(f"volume {volume!r} already exists (--into writes into it)")
        await self.do_image_abort(uid, volume)
        hidden = f"{IMPORTING}{volume}~{secrets.token_hex(4)}"
        row = await self.engine.create_volume(hidden, size, block_size, uid=uid)
        return {"name": hidden, "size": row.size, "block_size": row.block_size}

    async def do_image_finish(self, uid, volume, hidden, snapshot=None):
        """The import is written: its hidden volume takes its name (one transaction), then
        the snapshot is taken if one was asked for."""
        if not hidden.startswith(f"{IMPORTING}{_volume(volume)}~"):
            raise InvalidArgument(f"{hidden[:60]!r} is not an import of {volume!r}")
        await self.engine.rename_volume(hidden, volume, uid=uid)
        if snapshot is not None:
            await self.engine.create_snapshot(volume, snapshot, uid=uid)
        return self.engine.volume_info(volume)

    async def do_image_abort(self, uid, volume):
        """Delete the hidden volumes of imports of `volume` (none: nothing to do). Busy
        while an import still has one open."""
        prefix = f"{IMPORTING}{_volume(volume)}~"
        hidden = [v.name for v in self.engine.volumes() if v.name.startswith(prefix)]
        for name in hidden:
            try:
                await self.engine.delete_volume(name, recursive=True, uid=uid)
            except Busy:
                raise Busy(f"an import of {volume!r} is running (its volume is open)") from None
        return {"aborted": hidden}

    async def do_image_extents(self, uid, ref):
        """What an export reads: the snapshot's size, block size and mapped byte ranges."""
        vol, name = split_snapshot_ref(ref)
        snap = self.engine.snapshot_row(vol, name)
        check_owner(snap.owner, uid, f"snapshot {ref}")
        extents = await self.engine.snapshot_extents(vol, name)
        return {
            "size": snap.size,
            "block_size": snap.block_size,
            "extents": [[offset, length] for offset, length in extents],
        }

    async def do_status(self, uid):
        return {k: v for k, v in self.status.items() if not callable(v)}


def snapshot_info(snap: SnapshotRow) -> dict:
    """A snapshot as the commands show it."""
    return {
        "volume": snap.volume,
        "name": snap.name,
        "state": snap.state,
        "size": snap.size,
        "block_size": snap.block_size,
        "created": snap.created,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.created)),
        "temporary": bool(snap.temporary),
        "owner": snap.owner,
        "root": snap.root.hex() if snap.root else None,
        "guid": snap.guid,
    }


def reference_info(ref: ReferenceRow) -> dict:
    """A reference as the commands show it."""
    return {
        "id": ref.id,
        "name": ref.name,
        "description": ref.description,
        "state": ref.state,
        "size": ref.size,
        "block_size": ref.block_size,
        "source": ref.source,
        "guid": ref.guid,
        "owner": ref.owner,
        "created": ref.created,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ref.created)),
        "root": ref.root.hex() if ref.root else None,
    }
