"""The figures of issue 4. Each figure function takes the `Run` and adds rows (snapfs beside
its baselines) and raw numbers. Everything a figure mounts or starts is registered with
`run.cleanup` (torn down after the figure) or, when later figures share it, `run.session`."""

import json
import os
import random
import re
import shutil
import statistics
import threading
import time
from pathlib import Path

from bench import rawstore
from bench.images import fig_images
from bench.replication import fig_replication
from bench.report import Baseline, Row
from bench.sysutil import (
    GiB,
    MiB,
    TiB,
    evict,
    loop_attach,
    loop_detach,
    proc_status_kib,
    read_sequential,
    sh,
    tree_listing,
    write_blocks,
    write_random,
)
from bench.targets import Passthrough, S3backer, Snapfs, SwiftSaio

BS = 128 << 10  # snapfs's default block size; s3backer and the raw stores use the same


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def sizes(quick: bool) -> dict:
    """Workload sizes: --quick (a smoke run of a few minutes) and full."""
    if quick:
        return {
            "fio_size": 256 * MiB,
            "fio_runtime_ms": 1500,
            "fio_ramp_ms": 500,
            "snap_dirty": 64 * MiB,
            "inc_volume": 512 * MiB,
            "chain_n": 100,
            "chain_size": 64 * MiB,
            "mem_written": 1 * GiB,
            "cold_size": 256 * MiB,
            "flush_size": 256 * MiB,
            "swift_size": 64 * MiB,
            "raw_local": 256 * MiB,
            "raw_swift_small": 16 * MiB,
            "raw_swift_pack": 64 * MiB,
            "trim_files": 256 * MiB,
            "repl_size": 64 * MiB,
        }
    return {
        "fio_size": 1 * GiB,
        "fio_runtime_ms": 5000,
        "fio_ramp_ms": 1000,
        "snap_dirty": 64 * MiB,
        "inc_volume": 4 * GiB,
        "chain_n": 100,
        "chain_size": 256 * MiB,
        "mem_written": 8 * GiB,
        "cold_size": 1 * GiB,
        "flush_size": 1 * GiB,
        "swift_size": 256 * MiB,
        "raw_local": 1 * GiB,
        "raw_swift_small": 64 * MiB,
        "raw_swift_pack": 256 * MiB,
        "trim_files": 1 * GiB,
        "repl_size": 512 * MiB,
    }


def human(n: int) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------------- 1. fio

FIO_JOBS = [
    ("seq write 1M qd8", "write", "1M", 8, "MBps", "MB/s"),
    ("seq read 1M qd8", "read", "1M", 8, "MBps", "MB/s"),
    ("rand write 4K qd32", "randwrite", "4k", 32, "iops", "IOPS"),
    ("rand read 4K qd32", "randread", "4k", 32, "iops", "IOPS"),
]


def fio(
    target: str, rw: str, bs: str, depth: int, size: int, runtime_ms: int | None, ramp_ms: int = 0
) -> dict:
    args = [
        "fio",
        "--name=bench",
        f"--filename={target}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={depth}",
        "--ioengine=libaio",
        "--direct=1",
        f"--size={size}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]
    if "write" in rw:
        args.append("--refill_buffers")  # fresh data: no dedup shortcut for snapfs
    if runtime_ms:
        args += ["--time_based", f"--runtime={runtime_ms}ms"]
        if ramp_ms:
            args.append(f"--ramp_time={ramp_ms}ms")
    out = sh(*args, timeout=600).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {
        "MBps": side["bw_bytes"] / 1e6,
        "iops": side["iops"],
        "p99_us": pct.get("99.000000", 0) / 1e3,
    }


def fig_fio(run) -> None:
    """1. fio through a loop device on each target: seq 1M qd8, rand 4K qd32."""
    size, c, work = run.sizes["fio_size"], run.cleanup, run.dir / "fio"
    work.mkdir()
    dio = not run.opts.loop_buffered
    targets: dict[str, str] = {}
    settle: dict[str, object] = {}
    loops = {}

    plain = work / "plain.img"
    plain.write_bytes(b"")
    os.truncate(plain, size)
    targets["plain file"] = str(plain)
    targets["loop on plain file"], loops["plain"] = loop_attach(c, plain, direct_io=dio)

    # Two pass-throughs: the page-cached file, and direct I/O as snapfs opens volumes.
    passthroughs = {}
    for label, key, direct in (
        ("pyfuse3 pass-through + loop", "passthrough", False),
        ("pyfuse3 pass-through, direct_io + loop", "passthrough_dio", True),
    ):
        backing = work / f"{key}-backing.img"
        backing.write_bytes(b"")
        os.truncate(backing, size)
        pt = Passthrough(c, backing, work / f"{key}-mnt", direct_io=direct)
        passthroughs[label] = pt
        targets[label], loops[key] = loop_attach(c, pt.file, direct_io=dio)

    s3b = None
    try:
        s3b = S3backer(c, work, size, BS, cache_blocks=size // BS + 256)
        targets["s3backer --test + loop"], loops["s3backer"] = loop_attach(
            c, s3b.file, direct_io=dio
        )
        run.results["s3backer"] = {"available": True, "args": s3b.args}
    except Exception as exc:
        run.s3backer_missing(str(exc))

    sf = Snapfs(c, work / "snapfs").init().mount(cache_size="4G")
    sf.ctl(f"volume create fio --size {size}")
    targets["snapfs + loop"], loops["snapfs"] = loop_attach(c, sf.vol("fio"), direct_io=dio)
    syncs: list[float] = []

    def snapfs_sync() -> None:
        t = time.perf_counter()
        sf.ctl("sync")
        syncs.append(time.perf_counter() - t)

    settle["snapfs + loop"] = snapfs_sync
    run.raw["fio_setup"] = {
        "size": size,
        "loop_direct_io": loops,
        "runtime_ms": run.sizes["fio_runtime_ms"],
        "ramp_ms": run.sizes["fio_ramp_ms"],
    }
    # Fill every target once, so that reads read data and writes overwrite it. The fill goes
    # to the file itself (O_DIRECT, 1 MiB): through a loop device some writes come to the
    # FUSE daemon split off the block boundaries, and s3backer's test mode then reads the
    # block first, with its simulated network delay (a fill of 20 s instead of 1 s).
    for name, path in (
        ("plain file", plain),
        *((label, pt.file) for label, pt in passthroughs.items()),
        ("s3backer --test + loop", s3b.file if s3b else None),
        ("snapfs + loop", sf.vol("fio")),
    ):
        if path is None:
            continue
        run.progress(f"fill {name}")
        fio(str(path), "write", "1M", 8, size, None)
        if name in settle:
            settle[name]()  # type: ignore[operator]

    results: dict = {label: {name: [] for name in targets} for label, *_ in FIO_JOBS}
    for rep in range(run.repeat):
        for label, rw, bs, depth, _key, _unit in FIO_JOBS:
            for name, target in targets.items():
                run.progress(f"{label}, {name} (run {rep + 1}/{run.repeat})")
                results[label][name].append(
                    fio(
                        target,
                        rw,
                        bs,
                        depth,
                        size,
                        run.sizes["fio_runtime_ms"],
                        run.sizes["fio_ramp_ms"],
                    )
                )
                if "write" in rw and name in settle:
                    settle[name]()  # type: ignore[operator]
    run.raw["fio"] = results
    run.raw["fio_snapfs_sync_after_write_s"] = syncs
    for label, _rw, _bs, _depth, key, unit in FIO_JOBS:
        res = results[label]
        ours = [r[key] for r in res["snapfs + loop"]]
        run.add(
            Row(
                f"{label}, {human(size)}",
                unit,
                median(ours),
                ours,
                [
                    Baseline(name, median([r[key] for r in vals]), [r[key] for r in vals])
                    for name, vals in res.items()
                    if name != "snapfs + loop"
                ],
            )
        )


# ---------------------------------------------------------------------- 2. snapshot time


def fig_snapshot(run) -> None:
    """2. snapshot creation time on a 1 GiB and a 1 TiB volume with the same dirty data."""
    dirty = run.sizes["snap_dirty"]
    sf = Snapfs(run.cleanup, run.dir / "snapshot").init().mount(cache_size="8G")
    vols = [("1 GiB", "v1g", GiB), ("1 TiB", "v1t", TiB)]
    for _label, name, size in vols:
        sf.ctl(f"volume create {name} --size {size}")
    sf.ctl("sync")
    times: dict = {label: {"cli": [], "xattr": [], "ctl": []} for label, _n, _s in vols}
    floor = []
    for i in range(run.repeat):
        for label, name, size in vols if i % 2 == 0 else vols[::-1]:
            vol = sf.vol(name)
            off = size // 2
            # Written without fsync: the snapshot itself has to sync these 64 MiB.
            write_random(vol, dirty, seed=1000 + i, offset=off, fsync=False)
            t = time.perf_counter()
            sf.cli("snapshot", "create", f"{name}@cli{i}")
            times[label]["cli"].append((time.perf_counter() - t) * 1e3)
            write_random(vol, dirty, seed=2000 + i, offset=off, fsync=False)
            t = time.perf_counter()
            os.setxattr(vol, "user.snapfs.snapshot", f"xattr{i}".encode())
            times[label]["xattr"].append((time.perf_counter() - t) * 1e3)
            write_random(vol, dirty, seed=3000 + i, offset=off, fsync=False)
            t = time.perf_counter()
            sf.ctl(f"snapshot create {name}@ctl{i}")
            times[label]["ctl"].append((time.perf_counter() - t) * 1e3)
            sf.ctl("sync")
        t = time.perf_counter()
        sf.cli("--json", "status")
        floor.append((time.perf_counter() - t) * 1e3)
    run.raw["snapshot_ms"] = {**times, "cli_status_ms": floor, "dirty_bytes": dirty}
    d = human(dirty)
    for how, label in (
        ("cli", f"snapshot create via CLI, {d} dirty, 1 TiB vol"),
        ("xattr", f"snapshot create via xattr, {d} dirty, 1 TiB vol"),
        ("ctl", f"snapshot create via ctl file, {d} dirty, 1 TiB vol"),
    ):
        big, small = times["1 TiB"][how], times["1 GiB"][how]
        bases = [Baseline("same on a 1 GiB volume", median(small), small)]
        if how == "cli":
            bases.append(Baseline("CLI floor: `snapfs status`", median(floor), floor))
        run.add(Row(label, "ms", median(big), big, bases))


# ---------------------------------------------------------------------- 3. incremental upload


def fig_incremental(run) -> None:
    """3. bytes uploaded after changing 1% of a fully flushed volume (random 128K blocks)."""
    size = run.sizes["inc_volume"]
    sf = Snapfs(run.cleanup, run.dir / "incremental").init().mount(cache_size="8G")
    sf.ctl(f"volume create v --size {size}")
    vol = sf.vol("v")
    run.progress(f"fill {human(size)} and flush it")
    write_random(vol, size, seed=1)
    t = time.perf_counter()
    sf.ctl("sync")
    run.raw["incremental_initial_sync_s"] = time.perf_counter() - t
    nblocks = size // BS
    uploaded, grown, changed = [], [], []
    for i in range(run.repeat):
        rng = random.Random(100 + i)
        blocks = sorted(rng.sample(range(nblocks), nblocks // 100))
        s0 = sf.stats()
        before = tree_listing(sf.store_dir)  # type: ignore[arg-type]
        n = write_blocks(vol, blocks, BS, seed=200 + i)
        sf.ctl("sync")
        s1 = sf.stats()
        after = tree_listing(sf.store_dir)  # type: ignore[arg-type]
        uploaded.append((s1["uploaded_bytes"] - s0["uploaded_bytes"]) / MiB)
        grown.append(sum(sz for k, sz in after.items() if before.get(k) != sz) / MiB)
        changed.append(n / MiB)
    run.raw["incremental"] = {
        "volume": size,
        "changed_MiB": changed,
        "uploaded_MiB": uploaded,
        "new_store_objects_MiB": grown,
    }
    ch = median(changed)
    up, gr = median(uploaded), median(grown)
    note = (
        (
            f"metadata overhead: {100 * (up - ch) / ch:.1f}% by stats, "
            f"{100 * (gr - ch) / ch:.1f}% in the store"
        )
        if up and gr and ch
        else ""
    )
    run.add(
        Row(
            f"uploaded after changing 1% of {human(size)} (stats)",
            "MiB",
            up,
            uploaded,
            [Baseline("data changed (1% of the blocks)", ch, changed)],
            note,
        )
    )
    run.add(
        Row(
            "  new objects in the store for that change",
            "MiB",
            gr,
            grown,
            [Baseline("data changed (1% of the blocks)", ch, changed)],
        )
    )


# ---------------------------------------------------------------------- 4 and 8. snapshot chain


class Chain:
    """A volume of `size` filled with random data, then n rounds of (change 1% of the
    blocks, snapshot s000..): built once and shared by figures 4 and 8."""

    def __init__(self, run) -> None:
        n, size = run.sizes["chain_n"], run.sizes["chain_size"]
        self.n, self.size = n, size
        self.sf = sf = Snapfs(run.session, run.dir / "chain").init().mount(cache_size="2G")
        sf.ctl(f"volume create v --size {size}")
        vol = sf.vol("v")
        write_random(vol, size, seed=5)
        nblocks = size // BS
        rng = random.Random(11)
        self.writes: list[list[int]] = []
        t = time.perf_counter()
        for i in range(n):
            blocks = sorted(rng.sample(range(nblocks), max(1, nblocks // 100)))
            self.writes.append(blocks)
            write_blocks(vol, blocks, BS, seed=10_000 + i)
            sf.ctl(f"snapshot create v@s{i:03d}")
        self.create_s = time.perf_counter() - t
        t = time.perf_counter()
        sf.ctl("sync")
        self.sync_s = time.perf_counter() - t

    def name(self, i: int) -> str:
        return f"s{i:03d}"


class Qcow2Chain:
    """The same history as qcow2 external snapshots: a base image and one overlay per
    snapshot (qemu-img create -b ... -F qcow2), each with the same 1% written by qemu-io."""

    def __init__(self, run, writes: list[list[int]], size: int) -> None:
        self.dir = d = run.dir / "qcow2"
        d.mkdir()
        run.session.push("qcow2 chain", lambda: shutil.rmtree(d, ignore_errors=True))
        self.size = size
        self.layers = [d / "l000.qcow2"]
        sh("qemu-img", "create", "-q", "-f", "qcow2", self.layers[0], size)
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {size}", self.layers[0])
        for i, blocks in enumerate(writes, 1):
            layer = d / f"l{i:03d}.qcow2"
            sh(
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                self.layers[-1],
                "-F",
                "qcow2",
                layer,
            )
            cmds = [a for b in blocks for a in ("-c", f"write -P {i % 200 + 20} {b * BS} {BS}")]
            sh("qemu-io", "-f", "qcow2", *cmds, layer)
            self.layers.append(layer)
        # snapshot i (after writes[i]) is the chain up to layers[i + 1]
        self.snap_layer = {i: self.layers[i + 1] for i in range(len(writes))}

    def read_MBps(self, image: Path) -> float:
        """qemu-img bench: one reader, 4 MiB sequential reads, O_DIRECT (cache=none), so
        no page cache is involved; the whole virtual disk."""
        count = self.size // (4 * MiB)
        out = sh(
            "qemu-img",
            "bench",
            "-f",
            "qcow2",
            "-t",
            "none",
            "-c",
            count,
            "-d",
            1,
            "-s",
            4 * MiB,
            image,
        ).stdout
        took = float(re.search(r"completed in ([0-9.]+) seconds", out).group(1))  # type: ignore[union-attr]
        return count * 4 * MiB / took / 1e6

    def delete_snapshot(self, i: int) -> float:
        """Delete snapshot i of the chain: commit the next layer into its layer, rebase the
        layer above onto it. Returns the seconds it took."""
        order = sorted(self.snap_layer)
        pos = order.index(i)
        nxt = order[pos + 1]
        mine, upper = self.snap_layer[i], self.snap_layer[nxt]
        above = next(
            (self.layers[k] for k in range(self.layers.index(upper) + 1, len(self.layers))), None
        )
        t = time.perf_counter()
        sh("qemu-img", "commit", "-q", "-f", "qcow2", upper)
        if above is not None:
            sh("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", mine, above)
        took = time.perf_counter() - t
        self.layers.remove(upper)
        upper.unlink()
        del self.snap_layer[i]
        self.snap_layer[nxt] = mine
        return took


def chain(run) -> Chain:
    return run.fixture("chain", lambda: Chain(run))


def qcow2_chain(run) -> Qcow2Chain | None:
    if not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        run.note("qcow2 baselines skipped: qemu-img / qemu-io not installed (qemu-utils)")
        return None
    ch = chain(run)
    return run.fixture("qcow2", lambda: Qcow2Chain(run, ch.writes, ch.size))


def fig_chain(run) -> None:
    """4. read throughput of the oldest and the newest of 100 snapshots; a qcow2 chain."""
    ch = chain(run)
    q = qcow2_chain(run)
    sf = ch.sf
    n = ch.n
    run.raw["chain"] = {
        "n": n,
        "size": ch.size,
        "snapshots_created_s": ch.create_s,
        "sync_s": ch.sync_s,
    }
    rates: dict[str, list[float]] = {"oldest": [], "newest": [], "qcow2 base": [], "qcow2 top": []}
    for i in range(run.repeat):
        pairs = [("oldest", ch.name(0)), ("newest", ch.name(n - 1))]
        for which, snap in pairs if i % 2 == 0 else pairs[::-1]:
            sf.ctl("evict")
            path = sf.snap("v", snap)
            evict([path, sf.store_dir])
            rates[which].append(read_sequential(path, ch.size))
        if q is not None:
            rates["qcow2 base"].append(q.read_MBps(q.layers[0]))
            rates["qcow2 top"].append(q.read_MBps(q.layers[-1]))
    run.raw["chain"]["MBps"] = rates
    old, new = median(rates["oldest"]), median(rates["newest"])
    size = human(ch.size)
    run.add(
        Row(
            f"read oldest of {n} snapshots, {size}, store cold",
            "MB/s",
            old,
            rates["oldest"],
            [Baseline("newest snapshot of the same volume", new, rates["newest"])],
        )
    )
    if q is not None:
        qb, qt = median(rates["qcow2 base"]), median(rates["qcow2 top"])
        run.add(
            Row(
                f"  newest / oldest of {n}: snapfs vs qcow2 top / base",
                "ratio",
                new / old if new and old else None,
                [],
                [
                    Baseline(
                        f"qcow2: top of {n} overlays / base image",
                        qt / qb if qt and qb else None,
                        [],
                        ratio=f"qcow2 {qt:,.0f} / {qb:,.0f} MB/s" if qt and qb else "",
                    )
                ],
            )
        )


def fig_delete(run) -> None:
    """8. time to delete one snapshot out of 100, beside the size of what it frees."""
    ch = chain(run)
    q = qcow2_chain(run)
    sf, n = ch.sf, ch.n
    k = run.repeat
    picks = sorted({min(n - 2, max(1, round((j + 1) * n / (k + 1)))) for j in range(k)})
    took, freed, unique, qtook = [], [], [], []
    for i in picks:
        before = sf.stats()
        t = time.perf_counter()
        sf.ctl(f"snapshot delete v@{ch.name(i)}")
        took.append((time.perf_counter() - t) * 1e3)
        after = sf.stats()
        freed.append((before["stored_bytes"] - after["stored_bytes"]) / MiB)
        # Data only snapshot i holds: blocks written before it and rewritten right after.
        unique.append(len(set(ch.writes[i]) & set(ch.writes[i + 1])) * BS / MiB)
        if q is not None:
            qtook.append(q.delete_snapshot(i) * 1e3)
    run.raw["delete"] = {
        "n": n,
        "deleted": [ch.name(i) for i in picks],
        "ms": took,
        "freed_MiB": freed,
        "unique_data_MiB": unique,
        "qcow2_ms": qtook,
    }
    bases = (
        [Baseline("qcow2: commit overlay + rebase (qemu-img)", median(qtook), qtook)]
        if qtook
        else []
    )
    run.add(
        Row(f"delete 1 of {n} snapshots ({human(ch.size)} volume)", "ms", median(took), took, bases)
    )
    run.add(
        Row(
            "  stored bytes freed by that delete",
            "MiB",
            median(freed),
            freed,
            [
                Baseline(
                    "data only that snapshot holds",
                    median(unique),
                    unique,
                    ratio="(rest: its tree nodes)",
                )
            ],
        )
    )


# ---------------------------------------------------------------------- 5 and 6. stores


def raw_local(run) -> dict:
    """The local store's own PUT and cold GET rates, for 128K (one block) and 4 MiB (one
    pack) objects, 8 threads (the flusher's concurrency); --repeat times. Shared by 5 and 6."""

    def measure() -> dict:
        out: dict = {}
        for label, size in (("128K", BS), ("4M", 4 * MiB)):
            runs = []
            for i in range(run.repeat):
                where = run.dir / f"raw-local-{label}-{i}"
                runs.append(rawstore.local_put_get(where, size, run.sizes["raw_local"]))
                shutil.rmtree(where, ignore_errors=True)
            out[label] = _raw_runs(runs)
        run.results.setdefault("raw_stores", {})["local"] = out
        return out

    return run.fixture("raw_local", measure)


def raw_swift(run, sw: SwiftSaio) -> dict:
    """The same with python-swiftclient against the loopback Swift."""

    def measure() -> dict:
        out: dict = {}
        for label, size, total in (
            ("128K", BS, run.sizes["raw_swift_small"]),
            ("4M", 4 * MiB, run.sizes["raw_swift_pack"]),
        ):
            runs = [
                rawstore.swift_put_get(
                    sw.new_url("raw").rsplit("/", 1)[1], size, total, cold_dirs=(sw.dir,)
                )
                for _ in range(run.repeat)
            ]
            out[label] = _raw_runs(runs)
        run.results.setdefault("raw_stores", {})["swift"] = out
        return out

    return run.fixture("raw_swift", measure)


def _raw_runs(runs: list[dict]) -> dict:
    return {
        "put_MBps": [r["put_MBps"] for r in runs],
        "get_MBps": [r["get_MBps"] for r in runs],
        "objects": runs[0]["objects"],
    }


def _raw_baselines(raw: dict, op: str, what: str) -> list[Baseline]:
    return [
        Baseline(f"{what}: {label} objects, 8 threads", median(raw[label][op]), raw[label][op])
        for label in ("128K", "4M")
    ]


def swift(run) -> SwiftSaio | None:
    """The loopback Swift, started once per run (None: not wanted or not working)."""
    if run.opts.no_swift:
        return None

    def start():
        try:
            return SwiftSaio(run.session, run.dir)
        except Exception as exc:
            run.note(f"Swift figures skipped: scripts/swift-saio failed: {exc}")
            run.results["swift"] = {"available": False, "reason": str(exc)}
            return None

    return run.fixture("swift", start)


def _cold_read(run, sf: Snapfs, size: int, label: str, cold_dirs: list[Path]) -> dict:
    """Write a volume, snapshot it, sync, unmount; then N times: mount with an empty cache
    dir and read the snapshot from start to end."""
    sf.init().mount(cache_size="4G")
    sf.ctl(f"volume create c --size {size}")
    write_random(sf.vol("c"), size, seed=31)
    sf.ctl("snapshot create c@s")
    sf.ctl("sync")
    sf.umount()
    rates, mounts = [], []
    for i in range(run.repeat):
        cache = sf.root / f"cold-cache-{i}"
        run.progress(f"{label}: cold read {i + 1}/{run.repeat}")
        evict(cold_dirs)
        t = time.perf_counter()
        sf.mount(cache_dir=cache, cache_size="4G")
        mounts.append(time.perf_counter() - t)
        path = sf.snap("c", "s")
        evict([path, *cold_dirs])
        rates.append(read_sequential(path, size))
        sf.umount()
        shutil.rmtree(cache, ignore_errors=True)
    return {"MBps": rates, "mount_s": mounts}


def fig_cold(run) -> None:
    """5. cold read of a snapshot from the store with an empty cache (local; Swift)."""
    size = run.sizes["cold_size"]
    work = run.dir / "cold"
    sf = Snapfs(run.cleanup, work / "local")
    local = _cold_read(run, sf, size, "local store", [sf.store_dir])  # type: ignore[list-item]
    plain = work / "plain.img"
    plain.write_bytes(b"")
    os.truncate(plain, size)
    write_random(plain, size, seed=3)
    plain_rates = []
    for _ in range(run.repeat):
        evict([plain])
        plain_rates.append(read_sequential(plain, size))
    plain.unlink()
    raw = raw_local(run)
    run.raw["cold_local"] = {"size": size, **local, "plain_MBps": plain_rates}
    run.add(
        Row(
            f"cold read of a snapshot, local store, {human(size)}",
            "MB/s",
            median(local["MBps"]),
            local["MBps"],
            [
                Baseline(
                    "plain file, page cache dropped, same reader", median(plain_rates), plain_rates
                ),
                *_raw_baselines(raw, "get_MBps", "raw store cold GETs"),
            ],
            note=f"mount with an empty cache dir: {median(local['mount_s']):.1f} s",
        )
    )
    sw = swift(run)
    if sw is None:
        return
    size = run.sizes["swift_size"]
    sfs = Snapfs(run.cleanup, work / "swift", store_url=sw.new_url("cold"))
    res = _cold_read(run, sfs, size, "Swift", [sw.dir])
    run.raw["cold_swift"] = {"size": size, **res}
    run.add(
        Row(
            f"cold read of a snapshot, loopback Swift, {human(size)}",
            "MB/s",
            median(res["MBps"]),
            res["MBps"],
            _raw_baselines(raw_swift(run, sw), "get_MBps", "swiftclient GETs"),
            note=f"mount with an empty cache dir: {median(res['mount_s']):.1f} s",
        )
    )


# ---------------------------------------------------------------------- 6. flush


class UploadSampler:
    """Samples (time, stats.uploaded_bytes) every 0.1 s in a thread, while in the block."""

    def __init__(self, sf: Snapfs) -> None:
        self.sf = sf
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.sf.stats()["uploaded_bytes"]))
            self._stop.wait(0.1)

    def __enter__(self) -> "UploadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy_since(self, u0: int, default: float) -> float:
        """Time of the last sample before uploaded_bytes first grew past u0."""
        for k, (_t, u) in enumerate(self.samples):
            if u > u0:
                return self.samples[k - 1][0] if k else self.samples[0][0]
        return default


def _flush(run, sf: Snapfs, size: int, label: str) -> dict:
    """N times: write `size` of new data to a volume and `sync`. The flusher may start on
    blocks left alone for its flush delay before sync is called: a thread samples
    stats.uploaded_bytes every 0.1 s, and the rate is the bytes uploaded over the busy
    time, from the sample before the first upload to the return of sync."""
    sf.init().mount(cache_size="8G")
    sf.ctl(f"volume create f --size {size}")
    sf.ctl("sync")
    rates, uploaded, sync_only, ingest = [], [], [], []
    for i in range(run.repeat):
        run.progress(f"{label}: write {human(size)} + sync, {i + 1}/{run.repeat}")
        u0 = sf.stats()["uploaded_bytes"]
        with UploadSampler(sf) as sampler:
            t0 = time.perf_counter()
            write_random(sf.vol("f"), size, seed=500 + i)
            s0 = sf.stats()
            t = time.perf_counter()
            sf.ctl("sync")
            end = time.perf_counter()
        u1 = sf.stats()["uploaded_bytes"]
        start = sampler.busy_since(u0, default=t)
        rates.append((u1 - u0) / (end - start) / 1e6)
        uploaded.append((u1 - u0) / MiB)
        sync_only.append(
            {
                "dirty_at_sync_MiB": s0["dirty_bytes"] / MiB,
                "uploaded_during_sync_MiB": (u1 - s0["uploaded_bytes"]) / MiB,
                "sync_s": end - t,
            }
        )
        ingest.append(size / (end - t0) / 1e6)
    sf.umount()
    return {
        "MBps": rates,
        "uploaded_MiB": uploaded,
        "sync": sync_only,
        "write_plus_sync_MBps": ingest,
    }


def fig_flush(run) -> None:
    """6. flush throughput to the store beside the raw store's own PUT throughput."""
    size = run.sizes["flush_size"]
    work = run.dir / "flush"
    local = _flush(run, Snapfs(run.cleanup, work / "local"), size, "local store")
    run.raw["flush_local"] = {"size": size, **local}
    run.add(
        Row(
            f"flush to local store, {human(size)} written",
            "MB/s",
            median(local["MBps"]),
            local["MBps"],
            _raw_baselines(
                raw_local(run), "put_MBps", "raw store PUTs (write + rename, then syncfs)"
            ),
            note=f"write + sync end to end: {median(local['write_plus_sync_MBps']):,.0f} MB/s",
        )
    )
    sw = swift(run)
    if sw is None:
        return
    size = run.sizes["swift_size"]
    res = _flush(
        run, Snapfs(run.cleanup, work / "swift", store_url=sw.new_url("flush")), size, "Swift"
    )
    run.raw["flush_swift"] = {"size": size, **res}
    run.add(
        Row(
            f"flush to loopback Swift, {human(size)} written",
            "MB/s",
            median(res["MBps"]),
            res["MBps"],
            _raw_baselines(raw_swift(run, sw), "put_MBps", "swiftclient PUTs"),
            note=f"write + sync end to end: {median(res['write_plus_sync_MBps']):,.0f} MB/s",
        )
    )


# ---------------------------------------------------------------------- 7. memory


def _extents(written: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of 512 MiB spread evenly over a 1 TiB volume."""
    step = 512 * MiB
    n = max(1, written // step)
    return [(i * (TiB // n), step) for i in range(n)]


def fig_memory(run) -> None:
    """7. daemon peak RSS for a 1 TiB sparse volume with data written; catalog size.
    Measured once per run (a peak over the run; --repeat does not apply)."""
    written = run.sizes["mem_written"]
    work = run.dir / "memory"
    sf = Snapfs(run.cleanup, work / "snapfs").init().mount(cache_size="2G")
    idle = proc_status_kib(sf.pid, "VmRSS") / 1024  # type: ignore[arg-type]
    sf.ctl("volume create big --size 1T")
    t = time.perf_counter()
    for i, (off, n) in enumerate(_extents(written)):
        run.progress(f"snapfs: write {human(n)} at {off // GiB} GiB")
        write_random(sf.vol("big"), n, seed=700 + i, offset=off)
    sf.ctl("sync")
    took = time.perf_counter() - t
    peak = proc_status_kib(sf.pid, "VmHWM") / 1024  # type: ignore[arg-type]
    rss = proc_status_kib(sf.pid, "VmRSS") / 1024  # type: ignore[arg-type]
    catalog = sum(p.stat().st_size for p in sf.cache_dir.glob("catalog.sqlite3*")) / MiB
    sf.umount()
    # The pass-through daemon, same writes to a 1 TiB sparse file.
    backing = work / "pt-backing.img"
    backing.write_bytes(b"")
    os.truncate(backing, TiB)
    pt = Passthrough(run.cleanup, backing, work / "pt-mnt")
    for i, (off, n) in enumerate(_extents(written)):
        write_random(pt.file, n, seed=700 + i, offset=off)
    pt_peak = proc_status_kib(pt.pid, "VmHWM") / 1024
    pt.stop()
    backing.unlink()
    run.raw["memory"] = {
        "written": written,
        "peak_rss_MiB": peak,
        "rss_after_MiB": rss,
        "rss_after_mount_MiB": idle,
        "catalog_MiB": catalog,
        "write_and_sync_s": took,
        "passthrough_peak_rss_MiB": pt_peak,
    }
    run.add(
        Row(
            f"daemon peak RSS, 1 TiB volume, {human(written)} written",
            "MiB",
            peak,
            [peak],
            [
                Baseline("snapfs daemon right after mount", idle, [idle]),
                Baseline("pyfuse3 pass-through, same writes", pt_peak, [pt_peak]),
            ],
            note="cache-size 2G (the default); measured once",
        )
    )
    run.add(
        Row(
            "  catalog.sqlite3 (+ WAL) for it",
            "MiB",
            catalog,
            [catalog],
            [
                Baseline(
                    "data written", written / MiB, ratio=f"{100 * catalog * MiB / written:.2f}%"
                )
            ],
        )
    )


# ---------------------------------------------------------------------- 9. discard


def _trim_cycle(c, work: Path, backing: Path, files: int, seed: int, before_trim=None) -> dict:
    """ext4 on a loop device over `backing`: write `files` bytes of files, sync, delete
    them, sync, time fstrim. `before_trim` runs after the write (a snapshot, say)."""
    dev, _dio = loop_attach(c, backing, direct_io=False)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev)
    mnt = work / "ext4"
    mnt.mkdir(exist_ok=True)
    sh("mount", dev, mnt)
    c.push(f"umount {mnt}", lambda: sh("umount", mnt, check=False))
    piece = 64 * MiB
    for i in range(files // piece):
        f = mnt / f"f{i}"
        f.touch()
        write_random(f, piece, seed=seed * 1000 + i, fsync=False)
    sh("sync")
    out = before_trim() if before_trim else {}
    for f in mnt.iterdir():
        if f.name.startswith("f"):
            f.unlink()
    sh("sync")
    t = time.perf_counter()
    sh("fstrim", mnt)
    out["fstrim_s"] = time.perf_counter() - t
    sh("umount", mnt)
    loop_detach(dev)
    return out


def _store_bytes(sf: Snapfs) -> int:
    return sum(tree_listing(sf.store_dir).values()) if sf.store_dir else 0


def fig_trim(run) -> None:
    """9. time of fstrim after deleting files, and the store bytes before and after gc
    (the snapshot that held them deleted)."""
    files = run.sizes["trim_files"]
    vol_size = 2 * files + 256 * MiB
    work = run.dir / "trim"
    work.mkdir()
    c = run.cleanup
    plain = work / "plain.img"
    with open(plain, "wb") as f:
        f.truncate(vol_size)
    sf = Snapfs(c, work / "snapfs").init().mount()
    sf.ctl(f"volume create t --size {vol_size}")
    took, base, alloc_before, alloc_after, store_full, store_gc = [], [], [], [], [], []
    for rep in range(run.repeat):
        run.progress(f"trim, run {rep + 1}/{run.repeat}")
        base.append(_trim_cycle(c, work, plain, files, rep)["fstrim_s"] * 1e3)

        def snapshot(rep=rep) -> dict:
            sf.ctl(f"snapshot create t@r{rep}")
            sf.ctl("sync")
            return {"alloc": os.stat(sf.vol("t")).st_blocks * 512, "store": _store_bytes(sf)}

        got = _trim_cycle(c, work, sf.vol("t"), files, rep, before_trim=snapshot)
        took.append(got["fstrim_s"] * 1e3)
        time.sleep(1.1)  # the kernel caches attributes for a second
        alloc_before.append(got["alloc"] / MiB)
        alloc_after.append(os.stat(sf.vol("t")).st_blocks * 512 / MiB)
        store_full.append(got["store"] / MiB)
        sf.ctl(f"snapshot delete t@r{rep}")
        sf.ctl("sync")
        sf.ctl("gc --threshold 0.5")
        store_gc.append(_store_bytes(sf) / MiB)
    run.raw["trim"] = {
        "files": files,
        "volume": vol_size,
        "fstrim_ms": took,
        "plain_fstrim_ms": base,
        "allocated_before_MiB": alloc_before,
        "allocated_after_MiB": alloc_after,
        "store_before_gc_MiB": store_full,
        "store_after_gc_MiB": store_gc,
    }
    run.add(
        Row(
            f"fstrim after deleting {human(files)} of files (ext4)",
            "ms",
            median(took),
            took,
            [Baseline("same on a loop device over a plain file", median(base), base)],
        )
    )
    run.add(
        Row(
            "  volume allocated (st_blocks) after fstrim",
            "MiB",
            median(alloc_after),
            alloc_after,
            [Baseline("allocated before the delete", median(alloc_before), alloc_before)],
        )
    )
    run.add(
        Row(
            "  store bytes after snapshot delete + gc",
            "MiB",
            median(store_gc),
            store_gc,
            [Baseline("store bytes before (files + snapshot)", median(store_full), store_full)],
        )
    )


FIGURES = {
    "fio": fig_fio,
    "snapshot": fig_snapshot,
    "incremental": fig_incremental,
    "chain": fig_chain,
    "cold": fig_cold,
    "flush": fig_flush,
    "memory": fig_memory,
    "delete": fig_delete,
    "trim": fig_trim,
    "images": fig_images,
    "replication": fig_replication,
}
