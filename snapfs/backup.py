"""`snapfs backup` and `snapfs restore`: volumes to a bank (another store) and back.

Owns the command-line side of backups; a backup is a reference with a unique name in the
bank (docs/design.md, "Backup to a bank").

- `backup VOL --bank URL --name NAME [--description TEXT]`: a snapshot of VOL named
  `backup:<tag>` (the tag derives from the bank and NAME; names users type may hold ':',
  so the prefix is reserved by convention), replicated into the bank as reference NAME
  (snapfs/replicate.py's Job, which sends only what the bank lacks), then deleted, also
  on failure. It is a normal snapshot, not a temporary one: replicate reads the source
  store through its published catalog, where temporary snapshots never appear. A backup
  killed before the delete leaves that snapshot: the next run of the same backup reuses
  it and resumes the bank's inbound reference; after a failure, the next run takes the
  inbound reference of that NAME over (what it copied is not sent again).
- `backup list|show|delete --bank URL`: a read-only engine of the bank lists the
  references; delete is a short-lived writer of the bank (as replicate's), which drops
  the reference's counts, then gc's the bank; freed objects leave the store `--grace`
  seconds later (default 600: a restore reading the bank meanwhile finishes), at the next
  writer session of the bank on the same cache dir.
- `restore NAME --bank URL --as VOL`: the ctl command `restore`, run by the mount's daemon
  (snapfs/volume/bank.py).

Errors are one line (CliError, SnapfsError).
"""

import contextlib
import hashlib
import json
import os
import shlex
import sys
import threading
from collections.abc import Iterator

import trio

from snapfs import progress as progress_line
from snapfs.control import reference_info
from snapfs.ctlclient import CliError, ctl, find_mount
from snapfs.images import parse_words
from snapfs.replicate import Job, adopted, cache_root, synced_source, writer_session
from snapfs.store import open_store
from snapfs.units import check_name, format_size, parse_seconds
from snapfs.volume.bank import named_backup
from snapfs.volume.engine import EngineConfig
from snapfs.volume.replicate import read_only_engine

USAGE = (
    "usage: snapfs backup VOL --bank BANK_URL --name NAME [--description TEXT]"
    " [--cache-dir DIR]; backup list --bank BANK_URL; backup show NAME --bank BANK_URL;"
    " backup delete NAME --bank BANK_URL [--grace SECONDS] [--cache-dir DIR]"
)
RESTORE_USAGE = "usage: snapfs restore NAME --bank BANK_URL --as VOL [--no-progress]"
SNAPSHOT_PREFIX = "backup:"
GRACE = 600.0


def main(words: list[str], mount: str | None, as_json: bool) -> int:
    if words[0] == "restore":
        return restore(words[1:], mount, as_json)
    sub = words[1] if len(words) > 1 else ""
    if sub in ("list", "show", "delete") and "--name" not in words:
        return bank_command(sub, words[2:], as_json)
    (vol,), opts, flags = parse_words(
        words[1:],
        {"bank", "name", "description", "cache-dir"},
        {"progress", "no-progress"},
        USAGE,
        count=1,
    )
    if "bank" not in opts or "name" not in opts:
        raise CliError(f"--bank BANK_URL and --name NAME are needed; {USAGE}")
    check_name(vol, "volume name")
    job = Job("", opts["bank"], check_name(opts["name"], "backup name"))
    job.description = opts.get("description", "")[:1024]
    job.cache_dir = opts.get("cache-dir")
    job.show = progress_line.wanted(as_json, "no-progress" in flags)
    job.unique = True
    open_store(job.to)  # a bad URL: one line before any snapshot is taken
    result = backup(find_mount(mount), vol, job)
    print(json.dumps(result) if as_json else describe(vol, result))
    return 0


def snapshot_name(bank: str, name: str) -> str:
    """The snapshot a backup of NAME into `bank` takes (the same for a rerun)."""
    return SNAPSHOT_PREFIX + hashlib.sha256(f"{bank}\n{name}".encode()).hexdigest()[:16]


def backup(mnt: str, vol: str, job: Job) -> dict:
    """Snapshot, replicate into the bank, delete the snapshot (also on failure)."""
    assert job.name is not None
    snap = snapshot_name(job.to, job.name)
    listed = ctl(mnt, shlex.join(["snapshot", "list", vol]))
    assert isinstance(listed, list)
    if snap not in [s["name"] for s in listed]:  # else left by a killed run: resume it
        ctl(mnt, shlex.join(["snapshot", "create", f"{vol}@{snap}"]))
    job.what = f"{vol}@{snap}"
    try:
        job.source_url = synced_source(mnt, job.what)
        result = trio.run(job.run)
    except BaseException:
        with contextlib.suppress(CliError):
            ctl(mnt, shlex.join(["snapshot", "delete", job.what]))
        raise
    try:
        ctl(mnt, shlex.join(["snapshot", "delete", job.what]))
    except CliError as exc:
        print(f"snapfs: backed up, but snapshot {job.what} stays: {exc}", file=sys.stderr)
    result.update(volume=vol, bank=job.to)
    return result


def describe(vol: str, r: dict) -> str:
    return (
        f"backed up {vol} to {r['bank']} as {r['name']}: sent {r['sent_objects']} objects "
        f"({format_size(r['sent_bytes'])}), {r['present_objects']} already there{adopted(r)}"
    )


def bank_command(sub: str, args: list[str], as_json: bool) -> int:
    count = 0 if sub == "list" else 1
    names, opts, _flags = parse_words(
        args, {"bank", "grace", "cache-dir"} if sub == "delete" else {"bank"}, set(), USAGE, count
    )
    if "bank" not in opts:
        raise CliError(f"--bank BANK_URL is needed; {USAGE}")
    bank = opts["bank"]
    if sub == "list":
        rows = trio.run(list_backups, bank)
        print(json.dumps(rows) if as_json else table(rows))
        return 0
    name = check_name(names[0], "backup name")
    if sub == "show":
        rows = [r for r in trio.run(list_backups, bank) if r["name"] == name]
        if not rows:
            raise CliError(f"no backup named {name!r} in {bank}")
        print(json.dumps(rows[-1], indent=2) if as_json else show(rows[-1]))
        return 0
    grace = parse_seconds(opts.get("grace", str(GRACE)), "grace", 30 * 86400, zero=True)
    done = trio.run(delete_backup, bank, name, grace, opts.get("cache-dir"))
    print(json.dumps(done) if as_json else f"deleted backup {name} from {bank}")
    return 0


async def list_backups(bank: str) -> list[dict]:
    store = open_store(bank)
    try:
        async with read_only_engine(store) as engine:
            return [reference_info(r) for r in engine.references()]
    finally:
        await store.aclose()


async def delete_backup(bank: str, name: str, grace: float, cache_dir: str | None) -> dict:
    """Drop backup `name` (its reference: frees what no other backup needs), then gc the
    bank, as a short-lived writer of it (refused while another writer is live there)."""
    store = open_store(bank)

    def cache_for(uuid: str) -> str:
        return os.path.abspath(cache_dir or os.path.join(cache_root(), uuid))

    try:
        async with writer_session(store, cache_for, EngineConfig(grace=grace)) as engine:
            found = [r for r in engine.references() if r.name == name]
            if not found:
                named_backup(engine, name)  # raises NotFound with the bank's URL
            for ref in found:
                await engine.delete_reference(ref.id)
            gc = await engine.gc()
        return {"deleted": name, "grace": grace, **gc}
    finally:
        await store.aclose()


def table(rows: list[dict]) -> str:
    from snapfs.cli import table as render_table

    cols = [("NAME", "name"), ("SIZE", "size"), ("STATE", "state"), ("CREATED", "created_at")]
    shown = [{**r, "size": format_size(r["size"])} for r in rows]
    return render_table(shown, [*cols, ("DESCRIPTION", "description")])


def show(r: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in r.items())


@contextlib.contextmanager
def watched_restore(mnt: str, volume: str, show: bool) -> Iterator[progress_line.Progress]:
    """While the daemon restores (one blocking ctl call), a thread asks its status for the
    bytes copied and draws the progress line (only when `show`)."""
    line = progress_line.Progress(f"restore {volume}", None, show)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.25):
            with contextlib.suppress(CliError, OSError):
                status = ctl(mnt, "status")
                running = status.get("restores", {}) if isinstance(status, dict) else {}
                if volume in running:
                    line.update(int(running[volume]["copied_bytes"]))

    thread = threading.Thread(target=poll, daemon=True)
    if show:
        thread.start()
    try:
        yield line
    finally:
        done.set()
        if show:
            thread.join()
        line.close()


def interruptible_restore(mnt: str, line: str, volume: str) -> dict:
    """The restore's ctl call, in a thread: a FUSE call cannot be interrupted, so Ctrl-C
    reaches this (main) thread instead, which asks the daemon to cancel the restore
    (`cancel restore VOL`), waits for the call to end and raises KeyboardInterrupt after
    one line saying what is left (exit 130). (An Event, not Thread.join: a join that
    Ctrl-C interrupts can leave the thread marked stopped while it runs.)"""
    reply: list = []
    finished = threading.Event()

    def call() -> None:
        try:
            reply.append(ctl(mnt, line))
        except CliError as exc:
            reply.append(exc)
        finally:
            finished.set()

    threading.Thread(target=call, daemon=True).start()
    try:
        while not finished.wait(0.2):
            pass
    except KeyboardInterrupt:
        while not finished.is_set():  # until the daemon has the restore to cancel
            with contextlib.suppress(CliError):
                ctl(mnt, shlex.join(["cancel", "restore", volume]))
                break
            finished.wait(0.2)
        finished.wait()
        got = reply[0] if reply else None
        if isinstance(got, dict):  # the copy was complete: the volume is there
            return got
        print(f"snapfs: {got or 'restore interrupted'}", file=sys.stderr)
        raise
    if not reply or isinstance(reply[0], CliError):
        raise reply[0] if reply else CliError("restore: no reply from the daemon")
    assert isinstance(reply[0], dict)
    return reply[0]


def restore(args: list[str], mount: str | None, as_json: bool) -> int:
    """The mount's daemon copies the backup from the bank and makes the volume."""
    (name,), opts, flags = parse_words(
        args, {"bank", "as"}, {"progress", "no-progress"}, RESTORE_USAGE, count=1
    )
    if "bank" not in opts or "as" not in opts:
        raise CliError(RESTORE_USAGE)
    check_name(name, "backup name")
    check_name(opts["as"], "volume name")
    open_store(opts["bank"])
    line = shlex.join(["restore", name, "--bank", opts["bank"], "--as", opts["as"]])
    mnt = find_mount(mount)
    with watched_restore(
        mnt, opts["as"], progress_line.wanted(as_json, "no-progress" in flags)
    ) as shown:
        r = interruptible_restore(mnt, line, opts["as"])
        shown.update(r["sent_bytes"] + r.get("adopted_bytes", 0))
    print(
        json.dumps(r)
        if as_json
        else f"restored {name} as {r['volume']}: copied {r['sent_objects']} objects "
        f"({format_size(r['sent_bytes'])}), {r['present_objects']} already there{adopted(r)}"
    )
    return 0
