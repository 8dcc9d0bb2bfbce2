"""snapfs benchmark (issue 4): snapfs beside its baselines, measured in the same run.

    scripts/bench [--quick] [--repeat N] [--only FIGURE[,FIGURE]] [--out FILE.json]

Figures (names or numbers for --only):
  1 fio          fio through a loop device: seq 1M qd8 / rand 4K qd32, write and read, on a
                 plain file, a loop device, the pyfuse3 pass-through, s3backer --test, snapfs
  2 snapshot     snapshot create time, 1 GiB vs 1 TiB volume, same dirty data (CLI, xattr)
  3 incremental  bytes uploaded after changing 1% of a fully flushed volume
  4 chain        read oldest vs newest of 100 snapshots; a qcow2 chain of 100 overlays
  5 cold         cold read of a snapshot with an empty cache (local store, loopback Swift)
  6 flush        flush (sync) throughput beside the raw store's PUTs (local, Swift)
  7 memory       daemon peak RSS, 1 TiB volume with data written; catalog size
  8 delete       time to delete 1 of 100 snapshots and what it frees; qcow2 commit
  9 trim         fstrim after deleting files (ext4); store bytes before and after gc
 10 images       snapfs import / export (raw, qcow2) beside qemu-img convert between files
 11 replication  snapfs replicate MB/s beside raw PUTs to the target store (local, Swift);
                 bytes an incremental sends beside the changed data

Every figure runs --repeat times (default 3, 1 with --quick; memory: once) and the median
is printed; all runs go to the JSON file. Everything mounted, attached or started is torn
down at the end of its figure (or of the run), also on failure, Ctrl-C or SIGTERM.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import figures
from bench.report import Row, fmt, table
from bench.sysutil import ROOT, Cleanup, loadavg, tests_running, tool_version

NUMBERS = {str(i): name for i, name in enumerate(figures.FIGURES, 1)}


class Run:
    """State of one benchmark run: options, sizes, rows, raw numbers, shared fixtures."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.quick = opts.quick
        self.repeat = opts.repeat
        self.sizes = figures.sizes(opts.quick)
        self.dir = Path(tempfile.mkdtemp(prefix="snapfs-bench-", dir=opts.workdir))
        self.session = Cleanup()  # shared by several figures: torn down at the end
        self.cleanup = Cleanup()  # this figure's
        self.rows: list[Row] = []
        self._figure_rows: list[Row] = []
        self._figure_started = time.perf_counter()
        self.notes: list[str] = []
        self.raw: dict = {}
        self._fixtures: dict = {}
        self.results: dict = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {
                "hostname": platform.node(),
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "tools": {
                "fio": tool_version("fio", "--version"),
                "s3backer": tool_version("s3backer", "--version"),
                "qemu-img": tool_version("qemu-img", "--version"),
                "snapfs_git": _git_rev(),
            },
            "options": {
                "quick": opts.quick,
                "repeat": opts.repeat,
                "swift": not opts.no_swift,
                "loop_direct_io": not opts.loop_buffered,
            },
            "sizes": self.sizes,
            "s3backer": {"available": None},
            "swift": {"available": None},
            "figures": {},
            "notes": self.notes,
        }
        if self.results["tools"]["s3backer"] is None:
            self.s3backer_missing("s3backer is not installed")

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self._figure_rows.append(row)
        print("   ", " | ".join(line for line in _one_line(row)), flush=True)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            print(f"  note: {text}", flush=True)

    def progress(self, text: str) -> None:
        print(f"  .. {time.perf_counter() - self._figure_started:5.0f} s  {text}", flush=True)

    def s3backer_missing(self, reason: str) -> None:
        self.results["s3backer"] = {"available": False, "reason": reason}
        self.note(f"s3backer baseline missing: {reason}")

    def fixture(self, name: str, build: Callable):
        if name not in self._fixtures:
            self._fixtures[name] = build()
        return self._fixtures[name]

    def figure(self, name: str, fn: Callable) -> None:
        self._figure_rows = []
        self.raw = {}
        doc = (fn.__doc__ or name).strip().splitlines()[0]
        print(f"\n{doc}", flush=True)
        entry: dict = {"load_before": loadavg(), "tests_running": tests_running()}
        t = self._figure_started = time.perf_counter()
        try:
            fn(self)
        except Exception as exc:  # one failing figure must not hide the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
            self.note(f"figure {name} failed: {entry['error']}")
            traceback.print_exc()
        finally:
            self.cleanup.run()
            entry["cleanup_errors"] = self.cleanup.errors
            self.cleanup = Cleanup()
            entry["seconds"] = round(time.perf_counter() - t, 1)
            entry["load_after"] = loadavg()
            entry["rows"] = [r.as_dict() for r in self._figure_rows]
            entry["raw"] = self.raw
            self.results["figures"][name] = entry
            print(f"  ({entry['seconds']:.0f} s)", flush=True)

    def close(self) -> None:
        self.cleanup.run()
        self.session.run()
        shutil.rmtree(self.dir, ignore_errors=True)


def _one_line(row: Row):
    yield f"{row.figure.strip()}: snapfs {fmt(row.snapfs)} {row.unit}"
    for b in row.baselines:
        r = (
            b.ratio
            if b.ratio is not None
            else (f"{row.snapfs / b.value:.2f}x" if row.snapfs is not None and b.value else "")
        )
        yield f"{b.name} {fmt(b.value)} ({r})"
    if row.note:
        yield row.note


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev or None


def _leftovers(workdir: Path) -> list[str]:
    """Mounts and loop devices of this run still there after the teardown (should be none)."""
    left = []
    with open("/proc/self/mounts") as f:
        left += [line.split()[1] for line in f if str(workdir) in line.split()[1]]
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    left += [line for line in out.splitlines() if str(workdir) in line]
    return left


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes and short fio runs (a few minutes)"
    )
    p.add_argument(
        "--repeat", type=int, help="runs of each figure, median shown (default 3; 1 with --quick)"
    )
    p.add_argument("--only", help="comma-separated figures (names or numbers); default all")
    p.add_argument("--out", help="JSON file (default bench-results/bench-<time>.json)")
    p.add_argument("--workdir", help="where images, stores and caches go (default /tmp)")
    p.add_argument("--no-swift", action="store_true", help="skip the loopback Swift parts")
    p.add_argument(
        "--loop-buffered",
        action="store_true",
        help="loop devices without direct I/O (reads then come from the page "
        "cache of the volume file)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="MIN",
        help="before each figure, wait up to MIN minutes while a pytest runs here",
    )
    opts = p.parse_args(argv)
    if opts.repeat is None:
        opts.repeat = 1 if opts.quick else 3
    if opts.repeat < 1:
        p.error("--repeat must be >= 1")
    wanted = []
    for item in (opts.only or ",".join(figures.FIGURES)).split(","):
        item = NUMBERS.get(item.strip(), item.strip())
        if item and item not in figures.FIGURES:
            known = ", ".join(figures.FIGURES)
            p.error(f"unknown figure {item!r}: choose from {known} or 1-{len(figures.FIGURES)}")
        if item and item not in wanted:
            wanted.append(item)
    opts.figures = [f for f in figures.FIGURES if f in wanted]  # issue order
    return opts


def _wait_idle(minutes: float) -> None:
    deadline = time.monotonic() + minutes * 60
    if tests_running():
        print(f"  waiting (up to {minutes:g} min) for a running pytest to finish", flush=True)
    while tests_running() and time.monotonic() < deadline:
        time.sleep(10)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (FUSE mounts, loop devices)", file=sys.stderr)
        return 2

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, terminate)  # also when started in the background
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    run = Run(opts)
    print(
        f"snapfs bench: {'quick' if opts.quick else 'full'}, repeat {opts.repeat}, "
        f"figures {','.join(opts.figures)}; work dir {run.dir}",
        flush=True,
    )
    started = time.perf_counter()
    interrupted = False
    try:
        for name in opts.figures:
            if opts.wait_idle:
                _wait_idle(opts.wait_idle)
            run.figure(name, figures.FIGURES[name])
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: tearing down", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            run.close()
    left = _leftovers(run.dir)
    if left:
        run.note(f"teardown left these behind: {left}")
    run.results["interrupted"] = interrupted
    run.results["seconds"] = round(time.perf_counter() - started, 1)
    run.results["session_cleanup_errors"] = run.session.errors
    print()
    print(table(run.rows))
    for text in run.notes:
        print(f"note: {text}")
    out = (
        Path(opts.out)
        if opts.out
        else ROOT / "bench-results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run.results, indent=2) + "\n")
    print(f"\n{run.results['seconds']:.0f} s; raw figures: {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
