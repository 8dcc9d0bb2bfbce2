"""Figure 11 (issue 13): `snapfs replicate` MB/s beside raw PUTs to the same target store,
and the bytes an incremental replicate sends beside the data that changed.

A volume of N MiB of random data (128 KiB blocks) is snapshotted and synced; then, per
repeat, into a fresh target store: `snapfs replicate VOL@SNAP --to URL` as a user runs it
(the CLI's start, the mount's sync, both engines' open, the copy, the final publish), MB/s
over the bytes it reports sent. The baseline is the target store's own `put` (snapfs's
Store class: the same code the replicate's packs go through) of the same number of bytes
in objects of the pack size (4 MiB), one at a time, then its barrier. Then k% of the blocks
are rewritten, a second snapshot is replicated to the same target: the bytes it sent beside
the changed blocks' bytes (the rest is tree nodes). Local → local, and local → loopback
Swift unless --no-swift."""

import json
import random
import statistics
import time
from pathlib import Path

import trio

from bench.report import Baseline, Row
from bench.sysutil import MiB, sh, write_random
from bench.targets import SNAPFS, Snapfs

BS = 128 << 10
PACK = 4 << 20
CHANGED = 0.05  # share of the blocks rewritten before the incremental


def raw_puts(url: str, total: int) -> float:
    """MB/s of the store's own put of `total` bytes in PACK-sized objects, then barrier."""
    from snapfs.store import open_store

    data = random.Random(1100).randbytes(PACK)

    async def run() -> float:
        store = open_store(url)
        try:
            t = time.perf_counter()
            for i in range(max(1, total // PACK)):
                await store.put(f"bench/{i:02x}/{i:08x}", data)
            await store.barrier()
            return max(1, total // PACK) * PACK / (time.perf_counter() - t) / 1e6
        finally:
            await store.aclose()

    return trio.run(run)


def replicate(sf: Snapfs, ref: str, url: str, cache: Path) -> tuple[dict, float]:
    """One `snapfs replicate` as a user runs it: its JSON report and seconds."""
    t = time.perf_counter()
    out = sh(*SNAPFS, "--mount", sf.mnt, "--json", "replicate", ref, "--to", url,
             "--cache-dir", cache, timeout=1800).stdout  # fmt: skip
    return json.loads(out), time.perf_counter() - t


def rewrite_blocks(path: Path, size: int, share: float, seed: int) -> int:
    """Rewrite `share` of the blocks with random data; returns the bytes changed."""
    rng = random.Random(seed)
    blocks = rng.sample(range(size // BS), max(1, int(size // BS * share)))
    with open(path, "r+b") as f:
        for blk in blocks:
            f.seek(blk * BS)
            f.write(rng.randbytes(BS))
        f.flush()
    return len(blocks) * BS


def _measure(run, sf: Snapfs, new_target, n: int, label: str) -> dict:
    """A base snapshot of the volume as it is; run.repeat times: a full replicate of it
    into a fresh target and raw PUTs of as many bytes there. Then an incremental (k% of
    blocks rewritten, a second snapshot) into the last of those targets."""
    size = run.sizes["repl_size"]
    sf.ctl(f"snapshot create r@base{n}")
    sf.ctl("sync")
    full, raw = [], []
    for i in range(run.repeat):
        run.progress(f"replicate {size // MiB} MiB to {label}, {i + 1}/{run.repeat}")
        url, cache = new_target(f"full{i}"), run.dir / "replication" / f"cache-{n}-{i}"
        got, took = replicate(sf, f"r@base{n}", url, cache)
        full.append(got["sent_bytes"] / took / 1e6)
        raw.append(raw_puts(new_target(f"raw{i}"), got["sent_bytes"]))
    changed = rewrite_blocks(sf.vol("r"), size, CHANGED, seed=1101 + n)
    sf.ctl(f"snapshot create r@inc{n}")
    sf.ctl("sync")
    inc, _took = replicate(sf, f"r@inc{n}", url, cache)
    return {"full_MBps": full, "raw_put_MBps": raw, "changed": changed, "incremental": inc}


def fig_replication(run) -> None:
    """11. replicate MB/s beside raw PUTs to the target; incremental bytes sent vs changed."""
    from bench.figures import swift

    size = run.sizes["repl_size"]
    work = run.dir / "replication"
    sf = Snapfs(run.cleanup, work / "source").init().mount()
    sf.ctl(f"volume create r --size {size}")
    write_random(sf.vol("r"), size, seed=1100)

    def local_target(name: str) -> str:
        return Snapfs(run.cleanup, work / f"target-{name}").init().store_url

    targets = [("local store", local_target)]
    sw = swift(run)
    if sw is not None:

        def swift_target(name: str) -> str:
            url = sw.new_url(f"repl-{name}")
            sh(*SNAPFS, "init", url, timeout=120)
            return url

        targets.append(("loopback Swift", swift_target))
    for n, (label, new_target) in enumerate(targets):
        res = _measure(run, sf, new_target, n, label)
        run.raw[f"replication_{label}"] = {"size": size, **res}
        _rows(run, label, size, res)
    sf.umount()


def _rows(run, label: str, size: int, res: dict) -> None:
    full, raw = res["full_MBps"], res["raw_put_MBps"]
    run.add(
        Row(
            f"replicate a {size // MiB} MiB snapshot to {label}",
            "MB/s",
            statistics.median(full),
            full,
            [Baseline("the store's put, 4 MiB objects in turn", statistics.median(raw), raw)],
            note="end to end: CLI start, the mount's sync, both engines opened, the copy",
        )
    )
    inc, changed = res["incremental"], res["changed"]
    run.add(
        Row(
            f"  incremental to {label} after rewriting {CHANGED:.0%} of the blocks",
            "MiB sent",
            inc["sent_bytes"] / MiB,
            [inc["sent_bytes"] / MiB],
            [Baseline("changed data", changed / MiB, [changed / MiB])],
            note=f"{inc['sent_objects']} objects sent, {inc['present_objects']} already there",
        )
    )
