"""`snapfs export` and `snapfs import`: a snapshot to an image file, an image file to a volume.

Owns the command-line side of moving images in and out; the daemon only lists a snapshot's
mapped extents and creates, renames or deletes the hidden volume an import writes into
(the `image ...` ctl commands in control.py). Image formats are qemu-img's business: this
module never parses or writes qcow2 itself.

- Export reads the snapshot's read-only file (`MNT/snapshots/VOL/SNAP`; with `--store URL`
  an in-process read-only engine instead), only the extents its tree maps, and writes a
  sparse raw file beside FILE: all-zero blocks are skipped, the size set with ftruncate.
  qcow2 is that raw file converted by `qemu-img convert`. The result is renamed onto FILE
  at the end, so FILE is never half written.
- Import asks `qemu-img info` for the format and virtual size, creates the hidden volume
  IMPORTING + VOL + "~" + TAG (never listed; names users type cannot start with '.'), lets
  `qemu-img convert -n --target-is-zero` write into it (zeros are skipped: holes stay
  holes) and then renames it to VOL in one catalog transaction, taking VOL@SNAP if asked.
  Interrupted (kill -9, Ctrl-C) it leaves only the hidden volume, which the next import of
  the same name deletes before it starts again. qemu-img dies with us (PR_SET_PDEATHSIG).
  `--into` writes into an existing volume in place, as dd would: not atomic.

Errors are one line (CliError, SnapfsError); nothing here prints a traceback.
"""

import contextlib
import ctypes
import json
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

from snapfs.ctlclient import CliError, ctl, find_mount
from snapfs.errors import SnapfsError
from snapfs.progress import Progress, wanted
from snapfs.units import check_name, format_size, parse_size, split_snapshot_ref
from snapfs.volume.base import DEFAULT_BLOCK_SIZE

EXPORT_FORMATS = ("raw", "qcow2")
CHUNK = 4 << 20  # bytes read from the snapshot per call
BUSY_WAIT = 10.0  # seconds a new import waits for a killed one's file to be released
RATE_ENV = "SNAPFS_TEST_IMPORT_RATE"  # tests: qemu-img's -r (bytes/s), to kill an import mid-way
USAGE_EXPORT = (
    "usage: snapfs export VOL@SNAP FILE [--format raw|qcow2] [--store STORE_URL] [--no-progress]"
)
USAGE_IMPORT = (
    "usage: snapfs import FILE VOL[@SNAP] [--format FMT] [--size SIZE] [--block-size SIZE]"
    " [--into] [--no-progress]"
)


def parse_words(args: list[str], options: set[str], flags: set[str], usage: str, count: int = 2):
    """args → (positional, {option: value}, {flag}); one line (the usage) when wrong, or
    when there are not `count` positional words."""
    positional: list[str] = []
    values: dict[str, str] = {}
    seen: set[str] = set()
    i = 0
    while i < len(args):
        word = args[i]
        name, eq, value = word[2:].partition("=")
        if not word.startswith("--"):
            positional.append(word)
        elif name in flags and not eq:
            seen.add(name)
        elif name in options:
            if not eq:
                i += 1
                if i >= len(args):
                    raise CliError(f"option --{name} needs a value")
                value = args[i]
            values[name] = value
        else:
            raise CliError(f"unknown option {word[:40]!r}; {usage}")
        i += 1
    if len(positional) != count:
        raise CliError(usage)
    return positional, values, seen


# ---------------------------------------------------------------------- qemu-img


def _die_with_parent() -> None:
    """In the qemu-img child: die when the snapfs process does (kill -9 included), so no
    orphan keeps writing into an import's hidden volume."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def qemu_img(args: list[str], progress: Progress | None = None) -> str:
    """Run qemu-img; its stdout, or CliError with its last stderr line. With `progress`,
    -p's "(P/100%)" reports are turned into our own progress line."""
    cmd = ["qemu-img", *args]
    if progress is not None and progress.enabled:
        cmd[2:2] = ["-p"]
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError:
            raise CliError("qemu-img is not installed (apt-get install qemu-utils)") from None
        try:
            out = _read_output(proc, progress)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # a no-op after a normal exit; Ctrl-C or an error: stop it now
            proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines() or ["failed"]
            raise CliError(f"qemu-img {args[0]}: {lines[-1].removeprefix('qemu-img: ')}")
    return out


def _read_output(proc: subprocess.Popen, progress: Progress | None) -> str:
    assert proc.stdout is not None
    chunks: list[bytes] = []
    while chunk := os.read(proc.stdout.fileno(), 65536):
        chunks.append(chunk)
        reports = re.findall(rb"\((\d+(?:\.\d+)?)/100%\)", chunk)
        if progress is not None and progress.total is not None and reports:
            progress.update(int(float(reports[-1]) * progress.total / 100))
    proc.wait()
    return b"".join(chunks).decode(errors="replace")


def image_info(path: str, fmt: str | None) -> tuple[str, int]:
    """(format, virtual size) of an image qemu-img can read; CliError (one line) else."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path} is a directory, not an image")
    args = ["info", "--output=json", *(["-f", fmt] if fmt else []), path]
    try:
        info = json.loads(qemu_img(args))
    except ValueError:
        raise CliError(f"qemu-img info gave no answer for {path}") from None
    size = int(info.get("virtual-size") or 0)
    if size <= 0:
        raise CliError(f"{path} is an empty image (virtual size 0)")
    return str(info.get("format") or fmt), size


# ---------------------------------------------------------------------- export

Reader = Callable[[int, int], Awaitable[bytes]]


async def write_sparse(fd: int, read: Reader, extents, bs: int, progress: Progress) -> int:
    """Copy the mapped extents through `read` into `fd` at the same offsets, skipping
    all-zero blocks (they stay holes); returns the bytes written."""
    zero = bytes(bs)
    done = written = 0
    for offset, length in extents:
        end = offset + length
        while offset < end:
            n = min(CHUNK - CHUNK % bs or bs, end - offset)
            data = memoryview(await read(offset, n))
            if len(data) != n:
                raise CliError(f"short read at offset {offset} ({len(data)} of {n} bytes)")
            written += _write_nonzero(fd, data, offset, bs, zero)
            offset += n
            done += n
            progress.update(done)
    return written


def _write_nonzero(fd: int, data: memoryview, offset: int, bs: int, zero: bytes) -> int:
    """pwrite each run of blocks of `data` that are not all zero; returns the bytes."""
    written = 0
    start = None
    for pos in range(0, len(data) + bs, bs):
        block = data[pos : pos + bs]
        if block and block != zero[: len(block)]:
            start = pos if start is None else start
            continue
        if start is not None:
            written += os.pwrite(fd, data[start:pos], offset + start)
            start = None
    return written


def temp_beside(path: str, tag: str) -> str:
    """A fresh temp name in FILE's directory (same file system: the rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {path}: no such directory {folder}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise CliError(f"{path} exists and is not a regular file")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=tag, dir=folder)
    os.close(fd)
    return tmp


async def export_raw(tmp: str, info: dict, read: Reader, progress: Progress) -> int:
    """Write the sparse raw image into `tmp`: set the size, then the non-zero blocks."""
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.ftruncate(fd, info["size"])
        written = await write_sparse(fd, read, info["extents"], info["block_size"], progress)
        os.fsync(fd)
    finally:
        os.close(fd)
    progress.close()
    return written


def export_format(path: str, given: str | None) -> str:
    fmt = given or ("qcow2" if path.lower().endswith(".qcow2") else "raw")
    if fmt not in EXPORT_FORMATS:
        raise CliError(f"unknown export format {fmt[:20]!r}: raw or qcow2")
    return fmt


def cmd_export(args: list[str], mount: str | None, as_json: bool) -> int:
    """snapfs export VOL@SNAP FILE [--format raw|qcow2] [--store URL]: FILE is written
    beside itself under a temp name and renamed at the end."""
    (ref, path), opts, flags = parse_words(
        args, {"format", "store"}, {"progress", "no-progress"}, USAGE_EXPORT
    )
    vol, snap = split_snapshot_ref(ref)
    fmt = export_format(path, opts.get("format"))
    show = wanted(as_json, "no-progress" in flags)
    tmp = temp_beside(path, ".raw")
    try:
        if "store" in opts:
            info, written = trio.run(export_from_store, opts["store"], vol, snap, tmp, show)
        else:
            info, written = export_from_mount(find_mount(mount), ref, tmp, show)
        if fmt == "qcow2":
            to_qcow2(tmp, path, info["size"], show)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    result = {"snapshot": ref, "file": path, "format": fmt, "size": info["size"]}
    result["written"] = written
    print(
        json.dumps(result)
        if as_json
        else f"exported {ref} to {path} ({fmt}, {format_size(info['size'])}, "
        f"{format_size(written)} of data)"
    )
    return 0


def export_from_mount(mnt: str, ref: str, tmp: str, show: bool) -> tuple[dict, int]:
    """Through the running daemon: its extents list, then its read-only snapshot file."""
    info = ctl(mnt, shlex.join(["image", "extents", ref]))
    assert isinstance(info, dict)
    vol, snap = ref.split("@")
    src = os.open(os.path.join(mnt, "snapshots", vol, snap), os.O_RDONLY)

    async def read(offset: int, n: int) -> bytes:
        return os.pread(src, n, offset)

    try:
        progress = Progress(f"export {ref}", _mapped(info), show)
        return info, trio.run(export_raw, tmp, info, read, progress)
    finally:
        os.close(src)


def _mapped(info: dict) -> int:
    return sum(length for _offset, length in info["extents"])


def to_qcow2(raw: str, path: str, size: int, show: bool) -> None:
    """The sparse raw export converted by qemu-img into a temp beside FILE, then renamed."""
    tmp = temp_beside(path, ".qcow2")
    try:
        progress = Progress(f"convert to qcow2 {os.path.basename(path)}", size, show)
        qemu_img(["convert", "-f", "raw", "-O", "qcow2", raw, tmp], progress)
        progress.close()
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def export_from_store(url: str, vol: str, snap: str, tmp: str, show: bool):
    """No mount: a read-only engine in a temporary cache dir takes the store's newest
    catalog (as `snapfs fsck STORE_URL` does) and reads the snapshot with read-ahead."""
    from snapfs.store import open_store
    from snapfs.volume.engine import Engine, EngineConfig

    store = open_store(url)
    try:
        with tempfile.TemporaryDirectory(prefix="snapfs-export-") as cache:
            engine = await Engine.open(store, cache, EngineConfig(), read_only=True)
            try:
                row = engine.snapshot_row(vol, snap)
                extents = await engine.snapshot_extents(vol, snap)
                info = {"size": row.size, "block_size": row.block_size, "extents": extents}

                async def read(offset: int, n: int) -> bytes:
                    return await engine.read_snapshot(row, offset, n)

                progress = Progress(f"export {vol}@{snap}", _mapped(info), show)
                return info, await export_raw(tmp, info, read, progress)
            finally:
                await engine.close()
    finally:
        await store.aclose()


# ---------------------------------------------------------------------- import


def split_target(target: str) -> tuple[str, str | None]:
    """'VOL' or 'VOL@SNAP', both checked."""
    if "@" in target:
        return split_snapshot_ref(target)
    return check_name(target, "volume name"), None


def import_size(opts: dict, virtual: int) -> tuple[int, int | None]:
    """(volume size, block size or None): --size, else the image's virtual size rounded up
    to the block size; never smaller than the image."""
    bs = parse_size(opts["block-size"], "block size") if "block-size" in opts else None
    if "size" in opts:
        size = parse_size(opts["size"])
        if size < virtual:
            raise CliError(
                f"--size {opts['size']} is smaller than the image ({format_size(virtual)}, "
                f"{virtual} bytes)"
            )
        return size, bs
    step = bs or DEFAULT_BLOCK_SIZE
    return -(-virtual // step) * step, bs


def ctl_retry_busy(mnt: str, words: list[str]) -> object:
    """A ctl command that may meet the file of a just-killed import not yet released by
    the kernel (Busy): tried again for BUSY_WAIT seconds."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            return ctl(mnt, shlex.join(words))
        except CliError as exc:
            if "is running" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def convert_into(src: str, fmt: str, target: str, fresh: bool, progress: Progress) -> None:
    """qemu-img writes the image into a volume file; into a fresh (all-hole) volume it
    skips zeros (--target-is-zero), so they stay holes."""
    args = ["convert", "-n", "-f", fmt, "-O", "raw"]
    if fresh:
        args.append("--target-is-zero")
    if os.environ.get(RATE_ENV):
        args += ["-r", os.environ[RATE_ENV]]
    qemu_img([*args, src, target], progress)
    progress.close()


def cmd_import(args: list[str], mount: str | None, as_json: bool) -> int:
    (src, target), opts, flags = parse_words(
        args,
        {"format", "size", "block-size"},
        {"into", "progress", "no-progress"},
        USAGE_IMPORT,
    )
    vol, snap = split_target(target)
    if "into" in flags and ("size" in opts or "block-size" in opts):
        raise CliError("--into writes into an existing volume: no --size or --block-size")
    fmt, virtual = image_info(src, opts.get("format"))
    mnt = find_mount(mount)
    progress = Progress(
        f"import {os.path.basename(src)}", virtual, wanted(as_json, "no-progress" in flags)
    )
    if "into" in flags:
        info = import_into(mnt, src, fmt, virtual, vol, snap, progress)
    else:
        info = import_fresh(mnt, src, fmt, virtual, opts, vol, snap, progress)
    result = {"file": src, "format": fmt, "volume": vol, "snapshot": snap, "size": info["size"]}
    result["allocated"] = info["allocated"]
    print(
        json.dumps(result)
        if as_json
        else f"imported {src} ({fmt}, {format_size(virtual)}) into volume {vol}"
        + (f", snapshot {vol}@{snap}" if snap else "")
    )
    return 0


def import_fresh(mnt, src, fmt, virtual, opts, vol, snap, progress) -> dict:
    """Into the hidden volume, renamed to `vol` once written; on any error or interrupt
    the hidden volume is deleted (best effort: the next import of `vol` does it too)."""
    size, bs = import_size(opts, virtual)
    begin = ["image", "begin", vol, "--size", str(size)]
    hidden = ctl_retry_busy(mnt, begin + (["--block-size", str(bs)] if bs else []))
    assert isinstance(hidden, dict)
    try:
        convert_into(src, fmt, os.path.join(mnt, "volumes", hidden["name"]), True, progress)
        finish = ["image", "finish", vol, hidden["name"]] + (["--snapshot", snap] if snap else [])
        info = ctl(mnt, shlex.join(finish))
    except BaseException:
        with contextlib.suppress(CliError, SnapfsError):
            ctl_retry_busy(mnt, ["image", "abort", vol])
        raise
    assert isinstance(info, dict)
    return info


def import_into(mnt, src, fmt, virtual, vol, snap, progress) -> dict:
    """--into: written in place (zeros too: the volume's old data must go), like dd."""
    info = ctl(mnt, shlex.join(["volume", "show", vol]))
    assert isinstance(info, dict)
    if info["size"] < virtual:
        raise CliError(
            f"volume {vol} ({format_size(info['size'])}) is smaller than the image "
            f"({format_size(virtual)})"
        )
    convert_into(src, fmt, os.path.join(mnt, "volumes", vol), False, progress)
    if snap:
        ctl(mnt, shlex.join(["snapshot", "create", f"{vol}@{snap}"]))
    return ctl(mnt, shlex.join(["volume", "show", vol]))  # type: ignore[return-value]


def main(words: list[str], mount: str | None, as_json: bool) -> int:
    """`snapfs export ...` / `snapfs import ...` (words[0] says which)."""
    if words[0] == "export":
        return cmd_export(words[1:], mount, as_json)
    return cmd_import(words[1:], mount, as_json)
