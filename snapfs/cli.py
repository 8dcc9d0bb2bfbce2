"""The `snapfs` command.

`init`, `mount` and `umount` act on their own; every other command is one line written to
the running daemon's `.snapfs/ctl`, whose JSON reply is printed as a table (or as JSON with
`--json`). The daemon is found by `--mount MOUNTPOINT`, else from the current directory when
it is inside a snapfs mount, else as the only snapfs mount on the machine.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import trio

from snapfs import __version__
from snapfs.control import SPECS
from snapfs.ctlclient import CliError, DaemonGone, ctl, find_mount
from snapfs.errors import SnapfsError
from snapfs.units import format_size, parse_seconds


class NotUploaded(CliError):
    """Unmounted, but not everything is in the store: the cache dir keeps it (exit 3)."""


EXIT_NOT_UPLOADED = 3


# ---------------------------------------------------------------------- output


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    cells = [[h for h, _ in columns]] + [[str(r.get(k, "")) for _, k in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _sizes(d: dict, *keys: str) -> dict:
    out = dict(d)
    for k in keys:
        if isinstance(out.get(k), int):
            out[k] = format_size(out[k])
    return out


def render(words: list[str], result) -> str:
    cmd = tuple(words[:2])
    if cmd == ("volume", "list"):
        rows = [_sizes(r, "size", "allocated", "block_size", "bytes_dirty") for r in result]
        return table(
            rows,
            [
                ("NAME", "name"),
                ("SIZE", "size"),
                ("ALLOCATED", "allocated"),
                ("BLOCK", "block_size"),
                ("DIRTY", "bytes_dirty"),
                ("SNAPSHOTS", "snapshots"),
                ("STATE", "state"),
                ("PARENT", "parent"),
            ],
        )
    if cmd == ("snapshot", "list"):
        rows = [_sizes(r, "size") for r in result]
        return table(
            rows,
            [
                ("VOLUME", "volume"),
                ("SNAPSHOT", "name"),
                ("STATE", "state"),
                ("SIZE", "size"),
                ("CREATED", "created_at"),
            ],
        )
    if cmd == ("snapshot", "unmanaged") and words[2:3] == ["list"]:
        rows = [_sizes(r, "size") for r in result]
        return table(
            rows,
            [
                ("ID", "id"),
                ("NAME", "name"),
                ("STATE", "state"),
                ("SIZE", "size"),
                ("SOURCE", "source"),
                ("CREATED", "created_at"),
            ],
        )
    if cmd == ("snapshot", "unmanage"):
        return result["id"]
    if cmd[:1] == ("diff",):
        what = "allocated" if len(words) == 2 else "changed"
        lines = [
            f"{result['changed_blocks']} blocks {what} "
            f"({format_size(result['changed_bytes'])}), block size "
            f"{format_size(result['block_size'])}"
        ]
        lines += [f"{e['offset']}\t{e['length']}" for e in result["extents"]]
        return "\n".join(lines)
    if cmd[:1] == ("fsck",):
        return render_fsck(result)
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in result.items())
    return json.dumps(result, indent=2)


# ---------------------------------------------------------------------- local commands


def cmd_init(args: list[str]) -> int:
    if len(args) != 1:
        raise CliError("usage: snapfs init STORE_URL")
    from snapfs.store import open_store
    from snapfs.volume.publish import init_store

    async def run() -> dict:
        store = open_store(args[0])
        try:
            if hasattr(store, "create_container"):
                await store.create_container()
            return await init_store(store)
        finally:
            await store.aclose()

    manifest = trio.run(run)
    print(f"initialised snapfs store {manifest['uuid']}")
    return 0


def cmd_mount(args: list[str]) -> int:
    from snapfs import daemon

    opts = daemon.arg_parser().parse_args(args)
    if opts.foreground:
        return daemon.serve(opts)
    daemon.check_mountpoint(opts.mountpoint)
    read_fd, write_fd = os.pipe()
    # -P: import snapfs from the installation, never from a snapfs/ in the caller's cwd.
    cmd = [sys.executable, "-P", "-m", "snapfs.daemon", *args, "--ready-fd", str(write_fd)]
    proc = subprocess.Popen(
        cmd,
        pass_fds=(write_fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "ok":
        print(f"mounted {opts.store} on {os.path.abspath(opts.mountpoint)} (pid {proc.pid})")
        return 0
    proc.wait(timeout=30)
    raise CliError(
        line.removeprefix("error: ")
        if line
        else f"the daemon exited with status {proc.returncode} before mounting"
    )


UMOUNT_TIMEOUT = 60.0


def cmd_umount(args: list[str]) -> int:
    """Upload what is dirty (for at most --timeout seconds), then unmount, always. Exit 0
    when everything is in the store; 3 when unmounted but the store could not take it (lost
    or out of reach): one line says what stays in the cache dir."""
    timeout = UMOUNT_TIMEOUT
    words = list(args)
    if "--timeout" in words:
        i = words.index("--timeout")
        if i + 1 >= len(words):
            raise CliError("--timeout needs a number of seconds")
        timeout = parse_seconds(words[i + 1], "umount timeout", 3600)
        del words[i : i + 2]
    if len(words) != 1:
        raise CliError("usage: snapfs umount MOUNTPOINT [--timeout SECONDS]")
    mount = find_mount(words[0])
    try:
        status = ctl(mount, "status")
    except DaemonGone:
        _fusermount(mount)
        raise NotUploaded(
            f"unmounted {mount}, whose daemon was not running: its cache dir keeps what was "
            "fsynced and not uploaded; mount the store again with that --cache-dir to upload it"
        ) from None
    pid = status["pid"] if isinstance(status, dict) else None
    done = ctl(mount, f"umount --within {timeout:g}")
    _fusermount(mount)
    deadline = time.monotonic() + 600
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    if not isinstance(done, dict) or done.get("uploaded", True):
        print(f"unmounted {mount}")
        return 0
    left = format_size(int(done.get("dirty_bytes") or 0))
    pending = done.get("pending_snapshots") or 0
    if pending:
        left += f" and {pending} snapshot{'s' if pending > 1 else ''} not yet uploaded"
    if done.get("lost"):
        raise NotUploaded(
            f"unmounted {mount}, but this writer had lost the store ({done['lost']}): nothing "
            f"more was uploaded; what was not ({left}) is still in the cache dir "
            f"{done['cache_dir']}"
        )
    raise NotUploaded(
        f"unmounted {mount} without uploading: {done.get('reason')}; what was not uploaded "
        f"({left}) stays in the cache dir {done['cache_dir']} and goes up at the next mount of it"
    )


def _fusermount(mount: str) -> None:
    res = subprocess.run(["fusermount3", "-u", mount], capture_output=True, text=True)
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["unmount failed"])[-1]
        raise CliError(f"cannot unmount {mount}: {msg.removeprefix('fusermount3: ')}")


USAGE = """usage: snapfs [--mount MOUNTPOINT] [--json] COMMAND ...

  init STORE_URL                          create a store (file:///path, swift://host:port/c)
  mount STORE_URL MOUNTPOINT [--cache-dir D] [--cache-size SIZE] [--foreground]
        [--flush-delay SECONDS] [--flush-max-age SECONDS] [--read-only [--snapshot VOL@SNAP]]
  umount MOUNTPOINT [--timeout 60]        upload (for at most --timeout seconds), publish
                                          and unmount; unmounts also when the store is lost
                                          or out of reach (exit 3: the cache dir keeps what
                                          was not uploaded)
  export VOL@SNAP FILE [--format raw|qcow2] [--store STORE_URL]
                                          a snapshot to a sparse raw or a qcow2 image
  import FILE VOL[@SNAP] [--format FMT] [--size SIZE] [--block-size SIZE] [--into]
                                          an image qemu-img reads into a new volume
  send VOL@SNAP [--from VOL@BASE] [-o FILE]
                                          write a snapshot as a stream (docs/streams.md):
                                          all of it, or what changed since BASE
  replicate VOL@SNAP --to STORE_URL [--name NAME] [--description TEXT] [--from-store URL]
        [--cache-dir DIR]                 copy a snapshot into another store as a reference
                                          (only what that store lacks; resumes when rerun)
  backup VOL --bank BANK_URL --name NAME [--description TEXT] [--cache-dir DIR]
                                          a snapshot of VOL into a bank (another store)
                                          as backup NAME: only what the bank lacks
  backup list|show NAME|delete NAME --bank BANK_URL [--grace SECONDS]
                                          the backups of a bank; delete frees what no
                                          other backup needs, --grace seconds later
  restore NAME --bank BANK_URL --as VOL   the mount's daemon copies backup NAME into its
                                          store and makes the new volume VOL of it
  receive VOL[@SNAP] [-i FILE] [--force]  apply a stream (stdin by default): a full one
                                          creates VOL, an incremental one needs its base
                                          as VOL's newest snapshot (--force: roll back to
                                          it first if VOL changed since)
"""


def cmd_stream(words: list[str], mount: str | None, as_json: bool) -> int:
    """snapfs send / receive (snapfs/sendrecv.py), through the daemon of `mount`."""
    from snapfs import sendrecv

    return sendrecv.main(words, mount, as_json)


def usage() -> str:
    lines = [USAGE]
    for spec in SPECS:
        if not spec.help:  # internal (the CLI's umount sends it)
            continue
        args = " ".join(a.upper().rstrip("?") for a in spec.args)
        opts = " ".join(f"[--{o} X]" for o in spec.options)
        flags = " ".join(f"[--{f}]" for f in spec.flags)
        lines.append(
            f"  {' '.join((' '.join(spec.words), args, opts, flags)).strip():<40}{spec.help}"
        )
    return "\n".join(lines)


def cmd_fsck_store(args: list[str], as_json: bool) -> int:
    """snapfs fsck STORE_URL [--verify-data]: check a store without a mount. A read-only
    engine in a temporary cache dir takes the newest catalog, walks every tree and asks the
    store for every object it references (and with --verify-data reads each one and checks
    its digest). Each finding names the root that needs the object. Refcounts, the block
    cache and the copy-on-write saves are the writer's, in its cache dir: a `not checked`
    line says so, and `snapfs fsck` on its mount checks those."""
    url, *rest = args
    unknown = [a for a in rest if a != "--verify-data"]
    if unknown:
        raise CliError(f"usage: snapfs fsck STORE_URL [--verify-data] (not {unknown[0]!r})")
    from snapfs.store import open_store
    from snapfs.volume.engine import Engine, EngineConfig

    async def run() -> dict:
        store = open_store(url)
        try:
            with tempfile.TemporaryDirectory(prefix="snapfs-fsck-") as cache:
                engine = await Engine.open(
                    store, cache, EngineConfig(), read_only=True, checking=True
                )
                try:
                    report = await engine.check(verify_data="--verify-data" in rest)
                finally:
                    await engine.close()
                return report.as_dict()
        finally:
            await store.aclose()

    report = trio.run(run)
    print(json.dumps(report, indent=2) if as_json else render_fsck(report))
    return fsck_status(report)


FSCK_KINDS = (
    ("wrong_counts", "wrong refcount"),
    ("missing", "missing"),
    ("corrupt", "corrupt"),
    ("state", "inconsistent"),
)


def render_fsck(report: dict) -> str:
    """One line per finding (the object, what is wrong with it and the root that needs
    it), the checks that did not apply, then a summary."""
    lines = [f"{label}: {f}" for key, label in FSCK_KINDS for f in report.get(key, [])]
    shown = len(lines)
    if report.get("findings", shown) > shown:
        lines.append(f"... and {report['findings'] - shown} more (the first 50 of each kind shown)")
    lines += [f"not checked: {n}" for n in report.get("not_checked", [])]
    verdict = "clean" if report["clean"] else "NOT clean"
    if report["repaired"]:
        verdict += ", refcounts repaired"
    lines.append(
        f"fsck: {report['objects']} objects checked, {verdict}"
        f" ({report['orphan_packs']} orphan packs)"
    )
    return "\n".join(lines)


def fsck_status(report: dict) -> int:
    """fsck exits 1 when it found something it did not repair (scripts can tell): only
    refcounts and orphan packs can be repaired."""
    if report.get("missing") or report.get("corrupt") or report.get("state"):
        return 1
    return 0 if report.get("clean") or report.get("repaired") else 1


class UsageError(CliError):
    """A malformed command line (exit 2)."""


def global_options(argv: list[str]) -> tuple[list[str], str | None, bool]:
    """(words, --mount, --json) from the command line."""
    as_json = False
    mount = None
    words: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--json":
            as_json = True
        elif a == "--mount" and words[:1] != ["mount"]:
            if i + 1 >= len(argv):
                raise UsageError("--mount needs a mount point")
            mount = argv[i + 1]
            i += 1
        elif a.startswith("--mount="):
            mount = a.split("=", 1)[1]
        else:
            words.append(a)
        i += 1
    return words, mount, as_json


def dispatch(words: list[str], mount: str | None, as_json: bool) -> int:
    """Run one command: the local ones here, the rest through the daemon's ctl."""
    if words[0] == "init":
        return cmd_init(words[1:])
    if words[0] == "mount":
        return cmd_mount(words[1:])
    if words[0] in ("umount", "unmount"):
        return cmd_umount(words[1:])
    if words[0] in ("export", "import"):
        from snapfs import images

        return images.main(words, mount, as_json)
    if words[:1] == ["fsck"] and len(words) > 1 and "://" in words[1]:
        return cmd_fsck_store(words[1:], as_json)
    if words[0] == "replicate":
        from snapfs import replicate

        return replicate.main(words, mount, as_json)
    if words[0] in ("backup", "restore"):
        from snapfs import backup

        return backup.main(words, mount, as_json)
    if words[0] in ("send", "receive"):
        return cmd_stream(words, mount, as_json)
    result = ctl(find_mount(mount), shlex.join(words))
    print(json.dumps(result, indent=2, default=str) if as_json else render(words, result))
    if words[0] == "fsck" and isinstance(result, dict):
        return fsck_status(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        words, mount, as_json = global_options(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"snapfs: {exc}", file=sys.stderr)
        return 2
    if not words or words[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if words else 2
    if words[0] == "--version":
        print(f"snapfs {__version__}")
        return 0
    try:
        return dispatch(words, mount, as_json)
    except NotUploaded as exc:
        print(f"snapfs: {exc}", file=sys.stderr)
        return EXIT_NOT_UPLOADED
    except (CliError, SnapfsError) as exc:
        print(f"snapfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
