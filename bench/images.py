"""Figure 10 (issue 13): `snapfs import` and `snapfs export` beside `qemu-img convert` of the
same image between plain files, in the same run.

The image is half data, half holes (1 MiB of random data, then 1 MiB of hole, over its
whole size), made as raw and converted to qcow2 before anything is timed. MB/s are over the
image's virtual size, as qemu-img reports its own progress. An import ends once the volume
is renamed into place (the flusher uploads in the background); an export reads a synced
snapshot, so it measures reading the snapshot and writing the file, not the flush."""

import os
import random
import statistics
import time
from pathlib import Path

from bench.report import Baseline, Row
from bench.sysutil import MiB, sh
from bench.targets import SNAPFS, Snapfs


def image_size(quick: bool) -> int:
    return 128 * MiB if quick else 1024 * MiB


def make_half_sparse(path: Path, size: int, seed: int = 1300) -> None:
    """1 MiB of random data every 2 MiB, holes between."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 2 * MiB):
            f.seek(offset)
            f.write(random_bytes(seed + offset // MiB, min(MiB, size - offset)))


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def cli(sf: Snapfs, *args) -> list:
    """The snapfs command line for `args` on `sf`'s mount (timed as a user runs it)."""
    return [*SNAPFS, "--mount", sf.mnt, *args]


def timed(*cmd) -> float:
    t = time.perf_counter()
    sh(*cmd, timeout=1200)
    return time.perf_counter() - t


def _rates(size: int, seconds: list[float]) -> list[float]:
    return [size / s / 1e6 for s in seconds]


def _measure(run, sf: Snapfs, work: Path, src: Path, raw: Path, size: int) -> dict:
    """run.repeat times: import the qcow2, sync, export to raw and to qcow2; and the same
    three conversions by qemu-img between plain files."""
    out: dict[str, list[float]] = {k: [] for k in ("import", "export_raw", "export_qcow2")}
    base: dict[str, list[float]] = {k: [] for k in out}
    for i in range(run.repeat):
        run.progress(f"import + export {size // MiB} MiB, {i + 1}/{run.repeat}")
        vol = f"img{i}"
        out["import"].append(timed(*cli(sf, "import", src, f"{vol}@s")))
        sf.ctl("sync")
        out["export_raw"].append(timed(*cli(sf, "export", f"{vol}@s", work / "out.raw")))
        out["export_qcow2"].append(timed(*cli(sf, "export", f"{vol}@s", work / "out.qcow2")))
        base["import"].append(
            timed("qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, work / "plain.raw")
        )
        base["export_raw"].append(
            timed("qemu-img", "convert", "-f", "raw", "-O", "raw", raw, work / "plain2.raw")
        )
        base["export_qcow2"].append(
            timed("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, work / "plain.qcow2")
        )
        for name in ("out.raw", "out.qcow2", "plain.raw", "plain2.raw", "plain.qcow2"):
            os.unlink(work / name)
        sf.ctl(f"volume delete {vol} --recursive")
    return {k: _rates(size, v) for k, v in out.items()} | {
        f"qemu_{k}": _rates(size, v) for k, v in base.items()
    }


LABELS = {
    "import": ("import qcow2 → volume", "qemu-img convert qcow2 → raw file"),
    "export_raw": ("export snapshot → sparse raw", "qemu-img convert raw → raw file"),
    "export_qcow2": ("export snapshot → qcow2", "qemu-img convert raw → qcow2 file"),
}


def fig_images(run) -> None:
    """10. import and export MB/s beside qemu-img convert of the same image between files."""
    size = image_size(run.quick)
    work = run.dir / "images"
    work.mkdir()
    raw, src = work / "src.raw", work / "src.qcow2"
    make_half_sparse(raw, size)
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, src, timeout=600)
    sf = Snapfs(run.cleanup, work / "snapfs").init().mount()
    rates = _measure(run, sf, work, src, raw, size)
    sf.umount()
    run.raw["images"] = {"size": size, **rates}
    for key, (label, baseline) in LABELS.items():
        mine, theirs = rates[key], rates[f"qemu_{key}"]
        run.add(
            Row(
                f"{label}, {size // MiB} MiB image (half holes)",
                "MB/s",
                statistics.median(mine),
                mine,
                [Baseline(baseline, statistics.median(theirs), theirs)],
            )
        )
