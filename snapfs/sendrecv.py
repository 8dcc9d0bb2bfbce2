"""`snapfs send` and `snapfs receive`: the CLI side of streams (format: snapfs/stream.py).

Both talk to a running daemon through `call` (one ctl line → its result: `main` gives the
ctl client's, snapfs/ctlclient.py) and move the data through the mount's files, never
through ctl:

- send asks for the snapshot's identity (`snapshot show`) and its blocks (`diff VOL@SNAP`
  for a full stream, `diff VOL@BASE VOL@SNAP` for an incremental one), reads those ranges
  from `snapshots/VOL/SNAP` and writes the stream. All-zero blocks become zero records in
  an incremental stream and are left out of a full one.
- receive copies the whole stream into a spool file (an unlinked temp file in $TMPDIR)
  while it verifies every record and the trailer, and checks the target; only then does it
  change anything (roll back with --force, create or grow the volume), write the records
  into `volumes/VOL` and take the snapshot with the source's guid. So a damaged, cut or
  mismatched stream changes nothing. If writing fails after that (the daemon, the cache
  dir), receive undoes what it did: deletes the volume it created, or rolls the volume
  back to the base.
"""

import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from snapfs.ctlclient import ctl, find_mount
from snapfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound, SnapfsError
from snapfs.progress import Progress, wanted
from snapfs.stream import DATA, Header, StreamReader, StreamWriter, Totals
from snapfs.units import check_name, format_size, split_snapshot_ref

Call = Callable[[str], Any]
PIECE = 1 << 20  # bytes read from a snapshot file at a time (or one block, when larger)
SEND_USAGE = "usage: snapfs send VOL@SNAP [--from VOL@BASE] [-o FILE] [--no-progress]"
RECEIVE_USAGE = "usage: snapfs receive VOL[@SNAP] [-i FILE] [--force] [--no-progress]"


class StreamFailed(SnapfsError):
    """Reading or writing a stream's file, pipe or volume failed (one line)."""


def _ctl(call: Call, *words: str) -> Any:
    return call(shlex.join(words))


def _parse(words: list[str], usage: str, options: tuple, flags: tuple) -> tuple[str, dict]:
    """One positional argument, `options` that take a value, `flags` that do not."""
    positional: list[str] = []
    opts: dict[str, Any] = {}
    it = iter(words)
    for word in it:
        if word in options:
            value = next(it, None)
            if value is None:
                raise InvalidArgument(f"{word} needs a value; {usage}")
            opts[word] = value
        elif word in flags:
            opts[word] = True
        elif word.startswith("-") and word != "-":
            raise InvalidArgument(f"unknown option {word[:40]!r}; {usage}")
        else:
            positional.append(word)
    if len(positional) != 1:
        raise InvalidArgument(usage)
    return positional[0], opts


def main(words: list[str], mount: str | None, as_json: bool) -> int:
    """`snapfs send ...` or `snapfs receive ...` through the daemon of `mount` (found as
    for every command when None)."""
    where = find_mount(mount)
    return run(words, lambda line: ctl(where, line), where, as_json)


def run(words: list[str], call: Call, mount: str, as_json: bool) -> int:
    """`snapfs send ...` or `snapfs receive ...` (words[0]); an OSError is one line."""
    command = cmd_send if words[0] == "send" else cmd_receive
    try:
        return command(words[1:], call, mount, as_json)
    except OSError as exc:
        raise StreamFailed(f"{words[0]} failed: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------- send


def cmd_send(words: list[str], call: Call, mount: str, as_json: bool) -> int:
    ref, opts = _parse(words, SEND_USAGE, ("--from", "-o"), ("--progress", "--no-progress"))
    vol, name = split_snapshot_ref(ref)
    base = opts.get("--from")
    if base is not None and split_snapshot_ref(base)[0] != vol:
        raise InvalidArgument("--from names a snapshot of another volume")
    path = opts.get("-o")
    if path is None and os.isatty(sys.stdout.fileno()):
        raise InvalidArgument("refusing to write a binary stream to a terminal: use -o FILE")
    snap = _ctl(call, "snapshot", "show", ref)
    base_guid = None if base is None else _ctl(call, "snapshot", "show", base)["guid"]
    header = Header(name, snap["size"], snap["block_size"], snap["guid"], base_guid)
    diff = _ctl(call, "diff", base, ref) if base else _ctl(call, "diff", ref)
    show = wanted(as_json, "--no-progress" in opts)
    progress = Progress(f"send {ref}", diff["changed_bytes"], show)
    source = os.path.join(mount, "snapshots", vol, name)
    totals = _send_to(path, source, header, diff["extents"], progress)
    summary = {"snapshot": ref, "base": base, "guid": header.guid, **totals.__dict__, "file": path}
    if path is not None:
        _report(summary, as_json, f"sent {ref}" + (f" (from {base})" if base else ""))
    return 0


def _send_to(path: str | None, source: str, header: Header, extents, progress) -> Totals:
    """Write the stream to `path` (removed again if sending fails) or to stdout."""
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as exc:
        raise StreamFailed(f"cannot read {source}: {exc.strerror}") from None
    try:
        if path is None:
            return _send(fd, sys.stdout.buffer, header, extents, progress)
        with _opened(path, "wb") as out:
            try:
                return _send(fd, out, header, extents, progress)
            except BaseException:
                os.unlink(path)
                raise
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        raise StreamFailed("the reader of the stream went away (broken pipe)") from None
    except OSError as exc:
        raise StreamFailed(f"send failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
        progress.close()


def _send(fd: int, out: BinaryIO, header: Header, extents, progress: Progress) -> Totals:
    writer = StreamWriter(out, header)
    bs = header.block_size
    piece = max(PIECE, bs)  # both powers of two: pieces stay block-aligned
    for extent in extents:
        offset = extent["offset"]
        end = min(offset + extent["length"], header.size)
        while offset < end:
            data = _pread(fd, min(piece, end - offset), offset)
            _send_piece(writer, offset, data, bs)
            progress.add(len(data))
            offset += len(data)
    return writer.finish()


def _send_piece(writer: StreamWriter, offset: int, data: bytes, bs: int) -> None:
    """Runs of data blocks become data records; runs of zero blocks become zero records in
    an incremental stream and nothing in a full one (its volume starts as holes)."""
    zero = bytes(bs)
    start = 0
    while start < len(data):
        is_zero = data[start : start + bs] == zero[: len(data) - start]
        end = start + bs
        while end < len(data) and (data[end : end + bs] == zero[: len(data) - end]) == is_zero:
            end += bs
        end = min(end, len(data))
        if not is_zero:
            writer.data(offset + start, data[start:end])
        elif writer.header.base is not None:
            writer.zeros(offset + start, end - start)
        start = end


def _pread(fd: int, n: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            raise StreamFailed(f"the snapshot file ended at {offset + got}, before {offset + n}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _opened(path: str, mode: str):
    try:
        return open(path, mode)
    except OSError as exc:
        raise StreamFailed(f"cannot open {path}: {exc.strerror}") from None


def _report(summary: dict, as_json: bool, what: str) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"{what}: {summary['records']} records, {format_size(summary['data_bytes'])} of data, "
        f"stream {format_size(summary['stream_bytes'])}, guid {summary['guid']}"
    )


# ---------------------------------------------------------------------- receive


@dataclass(frozen=True)
class Plan:
    """What receive will do to the target, decided before anything is changed."""

    volume: str
    name: str
    base: str | None = None  # the name of the base snapshot on the target
    rollback: bool = False  # --force, and the volume changed since the base
    grow: int | None = None  # the stream's size, larger than the base's


class _Tee:
    """Reads from `src`, copying every byte into `copy` (the spool)."""

    def __init__(self, src: BinaryIO, copy: BinaryIO) -> None:
        self.src, self.copy = src, copy

    def read(self, n: int) -> bytes:
        data = self.src.read(n)
        self.copy.write(data)
        return data


def cmd_receive(words: list[str], call: Call, mount: str, as_json: bool) -> int:
    flags = ("--force", "--progress", "--no-progress")
    target, opts = _parse(words, RECEIVE_USAGE, ("-i",), flags)
    vol, _, name = target.partition("@")
    check_name(vol, "volume name")
    if name:
        check_name(name, "snapshot name")
    show = wanted(as_json, "--no-progress" in opts)
    with _input(opts.get("-i")) as src, tempfile.TemporaryFile(prefix="snapfs-receive-") as spool:
        reader = StreamReader(_Tee(src, spool))
        plan = _plan(call, vol, name or reader.header.name, reader.header, "--force" in opts)
        progress = Progress(f"receive {vol}: verify", None, show)
        try:
            for _record in reader.records():
                progress.add(reader.pos - progress.done)
        finally:
            progress.close()
        spool.seek(0)
        applying = Progress(f"receive {vol}: apply", reader.pos, show)
        totals = _apply(call, mount, plan, StreamReader(spool), applying)
    header = reader.header
    summary = {"snapshot": f"{vol}@{plan.name}", "base": plan.base, "guid": header.guid}
    _report({**summary, **totals.__dict__}, as_json, f"received {vol}@{plan.name}")
    return 0


def _input(path: str | None) -> BinaryIO:
    if path is not None:
        return _opened(path, "rb")
    if os.isatty(sys.stdin.fileno()):
        raise InvalidArgument("refusing to read a stream from a terminal: use -i FILE")
    return os.fdopen(os.dup(sys.stdin.fileno()), "rb")


def _plan(call: Call, vol: str, name: str, header: Header, force: bool) -> Plan:
    """Check the target against the stream's header (nothing is changed here)."""
    volumes = {v["name"]: v for v in _ctl(call, "volume", "list")}
    if header.base is None:
        if vol in volumes:
            raise AlreadyExists(f"volume {vol!r} exists: a full stream creates its volume")
        return Plan(vol, name)
    row = volumes.get(vol)
    if row is None:
        raise NotFound(f"volume {vol!r} not found: an incremental stream needs its base there")
    snaps = _ctl(call, "snapshot", "list", vol)
    newest = snaps[-1] if snaps else None
    if newest is None or newest["guid"] != header.base:
        has = f"{vol}@{newest['name']} ({newest['guid']})" if newest else "no snapshot"
        raise InvalidArgument(f"the stream's base is {header.base}; {vol}'s newest is {has}")
    _check_fits(vol, name, header, row, snaps)
    base = f"{vol}@{newest['name']}"
    changed = _ctl(call, "diff", base, vol)["changed_blocks"] or row["size"] != newest["size"]
    if changed and not force:
        raise Busy(f"volume {vol!r} changed since {base}: --force rolls it back first")
    grow = header.size if header.size > newest["size"] else None
    return Plan(vol, name, newest["name"], bool(changed), grow)


def _check_fits(vol: str, name: str, header: Header, row: dict, snaps: list[dict]) -> None:
    if row["block_size"] != header.block_size:
        raise InvalidArgument(
            f"volume {vol!r} has {format_size(row['block_size'])} blocks, the stream "
            f"{format_size(header.block_size)}"
        )
    if header.size < snaps[-1]["size"]:
        raise InvalidArgument(f"the stream's volume is smaller than {vol!r}: cannot shrink")
    if row["state"] != "available":
        raise Busy(f"volume {vol!r} is open: close it (detach its loop device) first")
    for snap in snaps:
        if snap["name"] == name:
            raise AlreadyExists(f"snapshot {vol}@{name} already exists")
        if snap["guid"] == header.guid:
            raise AlreadyExists(f"received already, as {vol}@{snap['name']}")


def _apply(call: Call, mount: str, plan: Plan, reader: StreamReader, progress) -> Totals:
    """Make the target ready, write the records, take the snapshot; undo on failure."""
    header, vol = reader.header, plan.volume
    if plan.rollback:
        _ctl(call, "snapshot", "rollback", f"{vol}@{plan.base}")
    if plan.base is None:
        size, bs = str(header.size), str(header.block_size)
        _ctl(call, "volume", "create", vol, "--size", size, "--block-size", bs)
    elif plan.grow is not None:
        _ctl(call, "volume", "resize", vol, "--size", str(plan.grow))
    try:
        totals = _write(os.path.join(mount, "volumes", vol), reader, progress)
        _ctl(call, "snapshot", "create", f"{vol}@{plan.name}", "--guid", header.guid)
    except BaseException as exc:
        undone = _undo(call, plan)
        if not isinstance(exc, Exception):
            raise
        raise StreamFailed(f"receive failed while writing {vol} ({exc}); {undone}") from None
    finally:
        progress.close()
    return totals


def _write(path: str, reader: StreamReader, progress: Progress) -> Totals:
    fd = os.open(path, os.O_WRONLY)
    try:
        zeros = bytes(PIECE)
        for record in reader.records():
            at = reader.pos
            if record.kind == DATA:
                _pwrite(fd, record.data, record.offset)
            else:
                for off in range(record.offset, record.offset + record.length, PIECE):
                    n = min(PIECE, record.offset + record.length - off)
                    _pwrite(fd, zeros[:n], off)
            progress.add(at - progress.done)
        progress.add(reader.pos - progress.done)  # the trailer
        os.fsync(fd)
    finally:
        os.close(fd)
    assert reader.totals is not None
    return reader.totals


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _undo(call: Call, plan: Plan) -> str:
    """Best effort: leave the target as it was before receive."""
    vol = plan.volume
    try:
        if plan.base is None:
            _ctl(call, "volume", "delete", vol, "--recursive")
            return f"volume {vol!r} deleted again"
        _ctl(call, "snapshot", "rollback", f"{vol}@{plan.base}")
        return f"volume {vol!r} rolled back to {vol}@{plan.base}"
    except Exception as exc:
        return f"undoing it failed too ({exc})"
