"""snapfs benchmark: snapfs beside its baselines, measured in the same run.

    scripts/bench [--quick] [--repeat N] [--only fio,snapshot,...] [--out FILE.json]

Baselines: a plain local file (and a loop device over it), a minimal pyfuse3 + trio
pass-through file (bench/passthrough.py: the ceiling of a Python FUSE daemon), and s3backer
in its local --test mode with the same block size (the peer). Every figure is run --repeat
times and the median printed; raw figures go to a JSON file. Everything mounted, attached
or started is torn down at the end, also on failure or Ctrl-C.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1 << 20
GiB = 1 << 30
BS = 128 << 10


def sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {res.stderr.strip() or res.stdout}")
    return res


def median(values):
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, opts) -> None:
        self.opts = opts
        self.quick = opts.quick
        self.dir = Path(tempfile.mkdtemp(prefix="snapfs-bench-", dir=opts.workdir))
        self.stack = contextlib.ExitStack()
        self.results: dict = {"quick": self.quick, "repeat": opts.repeat, "figures": {}}
        self.rows: list[tuple[str, str, str, str]] = []

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self.stack.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def loop(self, path: Path) -> str:
        dev = sh("losetup", "-f", "--show", path).stdout.strip()
        self.stack.callback(lambda: sh("losetup", "-d", dev, check=False))
        return dev

    def detach(self, dev: str) -> None:
        sh("losetup", "-d", dev, check=False)

    def snapfs(self, *args, mount: Path | None = None, check=True):
        cmd = [PY, "-m", "snapfs.cli"] + (["--mount", str(mount)] if mount else []) + list(args)
        return sh(*cmd, check=check)

    def mount_snapfs(self, name: str, cache_size: str = "4G", store: Path | None = None,
                     cache: Path | None = None) -> Path:
        store = store or self.dir / f"{name}-store"
        if not store.exists():
            self.snapfs("init", f"file://{store}")
        mnt = self.dir / f"{name}-mnt"
        mnt.mkdir(exist_ok=True)
        cache = cache or self.dir / f"{name}-cache"
        self.snapfs("mount", f"file://{store}", mnt, "--cache-dir", cache, "--cache-size",
                    cache_size)
        self.stack.callback(lambda: self._umount_snapfs(mnt))
        return mnt

    def _umount_snapfs(self, mnt: Path) -> None:
        if os.path.ismount(mnt):
            self.snapfs("umount", mnt, check=False)
        if os.path.ismount(mnt):
            sh("fusermount3", "-uz", mnt, check=False)

    def ctl(self, mnt: Path, line: str):
        fd = os.open(mnt / ".snapfs" / "ctl", os.O_RDWR)
        try:
            os.write(fd, (line + "\n").encode())
            reply = json.loads(os.pread(fd, 1 << 22, 0))
        finally:
            os.close(fd)
        if not reply["ok"]:
            raise RuntimeError(f"{line}: {reply['error']}")
        return reply["result"]

    def stats(self, mnt: Path) -> dict:
        return self.ctl(mnt, "stats")

    def daemon_pid(self, mnt: Path) -> int:
        return self.ctl(mnt, "status")["pid"]

    def row(self, figure: str, snapfs: str, baseline: str, ratio: str) -> None:
        self.rows.append((figure, snapfs, baseline, ratio))
        print(f"  {figure}: snapfs {snapfs} | {baseline} | {ratio}", flush=True)

    def record(self, key: str, value) -> None:
        self.results["figures"][key] = value

    # ------------------------------------------------------------------ workloads

    def fio(self, target: str, rw: str, bs: str, depth: int, size: int) -> dict:
        runtime = 5 if self.quick else 15
        args = ["fio", "--name=b", f"--filename={target}", f"--rw={rw}", f"--bs={bs}",
                f"--iodepth={depth}", "--ioengine=libaio", "--direct=1", f"--size={size}",
                "--output-format=json", "--group_reporting"]
        if rw.startswith("rand"):
            args += ["--time_based", f"--runtime={runtime}", "--randrepeat=0"]
        out = json.loads(sh(*args).stdout)
        job = out["jobs"][0]
        side = job["read"] if "read" in rw else job["write"]
        return {"MBps": side["bw_bytes"] / 1e6, "iops": side["iops"]}

    def fill(self, path: Path, size: int, seed: int, offset: int = 0) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_WRONLY)
        try:
            done = 0
            while done < size:
                n = min(8 * MiB, size - done)
                os.pwrite(fd, rng.randbytes(n), offset + done)
                done += n
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_all(self, path: Path, size: int) -> float:
        """MB/s reading the whole file with 1 MiB reads (O_DIRECT is not offered by FUSE
        files here; the caller makes the cache cold)."""
        t = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            while off < size:
                chunk = os.pread(fd, 4 * MiB, off)
                if not chunk:
                    break
                off += len(chunk)
        finally:
            os.close(fd)
        return size / (time.perf_counter() - t) / 1e6

    def drop_caches(self) -> None:
        os.sync()
        with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")

    # ------------------------------------------------------------------ figures

    def fig_fio(self) -> None:
        """1. fio through a loop device: seq 1M qd8, rand 4K qd32, on each target."""
        size = 256 * MiB if self.quick else 1 * GiB
        targets = {}
        plain = self.dir / "plain.img"
        with open(plain, "wb") as f:
            f.truncate(size)
        targets["plain file"] = str(plain)
        targets["loop on plain file"] = self.loop(plain)

        backing = self.dir / "passthrough.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        pmnt = self.dir / "pt-mnt"
        pmnt.mkdir()
        proc = subprocess.Popen([PY, str(ROOT / "bench" / "passthrough.py"), str(backing),
                                 str(pmnt)])
        self.stack.callback(lambda: (sh("fusermount3", "-uz", pmnt, check=False),
                                     proc.wait(timeout=30)))
        for _ in range(100):
            if os.path.ismount(pmnt):
                break
            time.sleep(0.05)
        targets["pyfuse3 pass-through + loop"] = self.loop(pmnt / "disk")

        s3 = shutil.which("s3backer")
        if s3:
            sdir = self.dir / "s3b-store"
            sdir.mkdir()
            smnt = self.dir / "s3b-mnt"
            smnt.mkdir()
            sh(s3, "--test", f"--blockSize={BS}", f"--size={size}", "--blockCacheSize=8192",
               str(sdir), str(smnt))
            self.stack.callback(lambda: sh("fusermount3", "-uz", smnt, check=False))
            targets["s3backer --test + loop"] = self.loop(smnt / "file")
        else:
            self.results["s3backer"] = "not installed"

        mnt = self.mount_snapfs("fio")
        self.snapfs("volume", "create", "fio", "--size", str(size), mount=mnt)
        targets["snapfs + loop"] = self.loop(mnt / "volumes" / "fio")

        workloads = [("seq write 1M qd8", "write", "1M", 8), ("seq read 1M qd8", "read", "1M", 8),
                     ("rand write 4K qd32", "randwrite", "4k", 32),
                     ("rand read 4K qd32", "randread", "4k", 32)]
        out: dict = {}
        for label, rw, bs, depth in workloads:
            for name, target in targets.items():
                runs = [self.fio(target, rw, bs, depth, size) for _ in range(self.opts.repeat)]
                out.setdefault(label, {})[name] = {
                    "MBps": median([r["MBps"] for r in runs]),
                    "iops": median([r["iops"] for r in runs])}
            res = out[label]
            unit = "iops" if "4K" in label else "MBps"
            ours = res["snapfs + loop"][unit]
            ceiling = res["pyfuse3 pass-through + loop"][unit]
            base = ", ".join(f"{n} {v[unit]:,.0f}" for n, v in res.items() if n != "snapfs + loop")
            self.row(f"{label} ({unit})", f"{ours:,.0f}", base,
                     f"{ours / ceiling:.2f}x pass-through"
                     + (f", {ours / res['s3backer --test + loop'][unit]:.2f}x s3backer"
                        if "s3backer --test + loop" in res else ""))
        self.record("fio", out)

    def fig_snapshot(self) -> None:
        """2. snapshot time on a 1 GiB and a 1 TiB volume with the same dirty data."""
        mnt = self.mount_snapfs("snap", cache_size="8G")
        out = {}
        for name, size in (("1G", GiB), ("1T", 1 << 40)):
            self.snapfs("volume", "create", f"v{name}", "--size", str(size), mount=mnt)
            times_ctl, times_xattr = [], []
            for i in range(self.opts.repeat):
                self.fill(mnt / "volumes" / f"v{name}", 64 * MiB, seed=i, offset=(size // 2))
                t = time.perf_counter()
                self.ctl(mnt, f"snapshot create v{name}@c{i}")
                times_ctl.append(time.perf_counter() - t)
                self.fill(mnt / "volumes" / f"v{name}", 64 * MiB, seed=100 + i, offset=size // 2)
                t = time.perf_counter()
                os.setxattr(mnt / "volumes" / f"v{name}", "user.snapfs.snapshot", f"x{i}".encode())
                times_xattr.append(time.perf_counter() - t)
                self.ctl(mnt, "sync")
            out[name] = {"ctl_ms": median(times_ctl) * 1e3, "xattr_ms": median(times_xattr) * 1e3}
        self.record("snapshot", out)
        self.row("snapshot create, 64 MiB dirty (ms, ctl / xattr)",
                 f"1T: {out['1T']['ctl_ms']:.1f} / {out['1T']['xattr_ms']:.1f}",
                 f"1G: {out['1G']['ctl_ms']:.1f} / {out['1G']['xattr_ms']:.1f}",
                 f"{out['1T']['ctl_ms'] / out['1G']['ctl_ms']:.2f}x (1T / 1G)")

    def fig_incremental(self) -> None:
        """3. bytes uploaded after changing 1% of a fully flushed volume; 5. cold read of a
        snapshot from the store with an empty cache; 6. flush throughput vs raw puts."""
        size = 1 * GiB if self.quick else 4 * GiB
        mnt = self.mount_snapfs("inc", cache_size="8G")
        vol = mnt / "volumes" / "v"
        self.snapfs("volume", "create", "v", "--size", str(size), mount=mnt)
        self.ctl(mnt, "sync")
        self.fill(vol, size, seed=1)
        s0 = self.stats(mnt)
        t = time.perf_counter()
        self.ctl(mnt, "sync")
        flush_s = time.perf_counter() - t
        s1 = self.stats(mnt)
        flushed = s1["uploaded_bytes"] - s0["uploaded_bytes"]
        flush_mbps = flushed / flush_s / 1e6
        # Raw store put throughput: 4 MiB objects, 8 threads, then one syncfs; same bytes.
        raw_mbps = self.raw_puts(f"file://{self.dir / 'raw-store'}", flushed)
        shutil.rmtree(self.dir / "raw-store", ignore_errors=True)
        self.row("flush to local store (MB/s)", f"{flush_mbps:,.0f}",
                 f"raw 4 MiB puts + syncfs {raw_mbps:,.0f}", f"{flush_mbps / raw_mbps:.2f}x raw")
        # Change 1% of the blocks, at random.
        nblocks = size // BS
        rng = random.Random(7)
        changed = rng.sample(range(nblocks), nblocks // 100)
        fd = os.open(vol, os.O_WRONLY)
        try:
            for blk in changed:
                os.pwrite(fd, rng.randbytes(BS), blk * BS)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.ctl(mnt, "snapshot create v@after")
        self.ctl(mnt, "sync")
        s2 = self.stats(mnt)
        uploaded = s2["uploaded_bytes"] - s1["uploaded_bytes"]
        data = len(changed) * BS
        self.record("incremental", {"volume": size, "changed": data, "uploaded": uploaded,
                                    "flush_MBps": flush_mbps, "raw_put_MBps": raw_mbps})
        self.row("bytes uploaded after changing 1%", f"{uploaded / MiB:.1f} MiB",
                 f"changed {data / MiB:.1f} MiB", f"metadata overhead "
                 f"{(uploaded - data) / data * 100:.1f}%")
        # Cold read from the store with an empty cache dir.
        store = self.dir / "inc-store"
        self._umount_snapfs(mnt)
        rates = []
        for i in range(self.opts.repeat):
            cold = self.mount_snapfs(f"cold{i}", store=store, cache=self.dir / f"cold{i}-cache")
            self.drop_caches()
            rates.append(self.read_all(cold / "snapshots" / "v" / "after", size))
            self._umount_snapfs(cold)
        plain = self.dir / "plain-read.img"
        self.fill_plain(plain, size)
        self.drop_caches()
        base = self.read_all(plain, size)
        self.record("cold_read", {"snapfs_MBps": median(rates), "plain_file_MBps": base})
        self.row("cold read of a snapshot, empty cache, local store (MB/s)",
                 f"{median(rates):,.0f}", f"plain file {base:,.0f}",
                 f"{median(rates) / base:.2f}x plain")
        plain.unlink()

    def fig_swift(self) -> None:
        """6. flush throughput to a loopback Swift beside raw swiftclient PUTs (4 MiB
        objects, same concurrency as the flusher, same bytes)."""
        total = 256 * MiB if self.quick else 1 * GiB
        sdir = self.dir / "saio"
        saio = ROOT / "scripts" / "swift-saio"
        sh(saio, "start", sdir)
        self.stack.callback(lambda: sh(saio, "stop", sdir, check=False))
        for line in sh(saio, "env", sdir).stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            os.environ[key] = value.strip("'\"")
        port = os.environ["ST_AUTH"].split(":")[2].split("/")[0]
        url = f"swift://127.0.0.1:{port}/bench-{os.getpid()}"
        self.snapfs("init", url)
        mnt = self.dir / "swift-mnt"
        mnt.mkdir()
        self.snapfs("mount", url, mnt, "--cache-dir", self.dir / "swift-cache",
                    "--cache-size", "4G")
        self.stack.callback(lambda: self._umount_snapfs(mnt))
        self.snapfs("volume", "create", "v", "--size", str(total), mount=mnt)
        self.ctl(mnt, "sync")
        self.fill(mnt / "volumes" / "v", total, seed=21)
        s0 = self.stats(mnt)
        t = time.perf_counter()
        self.ctl(mnt, "sync")
        took = time.perf_counter() - t
        flushed = self.stats(mnt)["uploaded_bytes"] - s0["uploaded_bytes"]
        ours = flushed / took / 1e6
        raw = self.raw_puts(url + "-raw", flushed)
        self.record("swift_flush", {"bytes": flushed, "snapfs_MBps": ours, "raw_put_MBps": raw})
        self.row("flush to loopback Swift (MB/s)", f"{ours:,.0f}",
                 f"raw swiftclient 4 MiB PUTs x8 {raw:,.0f}", f"{ours / raw:.2f}x raw")

    def fill_plain(self, path: Path, size: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)
        self.fill(path, size, seed=3)

    def raw_puts(self, url: str, total: int) -> float:
        """MB/s of the store itself: `total` bytes as 4 MiB puts, 8 at a time (the
        flusher's concurrency), then one barrier (syncfs on the local store)."""
        code = f"""
import os, time, trio
from snapfs.store import open_store
async def main():
    store = open_store({url!r})
    if hasattr(store, "create_container"):
        await store.create_container()
    data = os.urandom(4 << 20)
    n = max(1, {total} // len(data))
    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        lim = trio.CapacityLimiter(8)
        async def one(i):
            async with lim:
                await store.put(f"p/{{i:08d}}", data)
        for i in range(n):
            nursery.start_soon(one, i)
    await store.barrier()
    print(n * len(data) / (time.perf_counter() - t) / 1e6)
trio.run(main)
"""
        return float(sh(PY, "-c", code).stdout.strip())

    def fig_memory(self) -> None:
        """7. daemon peak RSS for a 1 TiB sparse volume with data written; catalog size."""
        written = 1 * GiB if self.quick else 8 * GiB
        mnt = self.mount_snapfs("mem", cache_size="2G")
        self.snapfs("volume", "create", "big", "--size", "1T", mount=mnt)
        vol = mnt / "volumes" / "big"
        step = 512 * MiB
        for i in range(written // step):
            self.fill(vol, step, seed=i, offset=i * 64 * GiB)
        self.ctl(mnt, "sync")
        pid = self.daemon_pid(mnt)
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        catalog = (self.dir / "mem-cache" / "catalog.sqlite3").stat().st_size
        self.record("memory", {"written": written, "peak_rss_kib": hwm,
                               "catalog_bytes": catalog})
        self.row(f"daemon peak RSS, 1 TiB volume, {written // GiB} GiB written",
                 f"{hwm / 1024:.0f} MiB", f"catalog {catalog / MiB:.1f} MiB", "")

    def fig_snapshots(self) -> None:
        """4. read of the oldest vs newest of N snapshots (each changing 1%), and a qcow2
        chain of N overlays; 8. time to delete one snapshot out of N, and what it frees."""
        n = 20 if self.quick else 100
        size = 256 * MiB
        mnt = self.mount_snapfs("many", cache_size="2G")
        vol = mnt / "volumes" / "v"
        self.snapfs("volume", "create", "v", "--size", str(size), mount=mnt)
        self.fill(vol, size, seed=5)
        rng = random.Random(11)
        nblocks = size // BS
        for i in range(n):
            fd = os.open(vol, os.O_WRONLY)
            for blk in rng.sample(range(nblocks), max(1, nblocks // 100)):
                os.pwrite(fd, rng.randbytes(BS), blk * BS)
            os.fsync(fd)
            os.close(fd)
            self.ctl(mnt, f"snapshot create v@s{i:03d}")
        self.ctl(mnt, "sync")
        rates = {"oldest": [], "newest": []}
        for _ in range(self.opts.repeat):
            for which, name in (("oldest", "s000"), ("newest", f"s{n - 1:03d}")):
                self.ctl(mnt, "evict")
                self.drop_caches()
                rates[which].append(self.read_all(mnt / "snapshots" / "v" / name, size))
        old, new = median(rates["oldest"]), median(rates["newest"])
        qcow = self.qcow2_chain(n, size)
        self.record("oldest_vs_newest", {"n": n, "oldest_MBps": old, "newest_MBps": new,
                                         "qcow2": qcow})
        self.row(f"read oldest / newest of {n} snapshots (MB/s)", f"{old:,.0f} / {new:,.0f}",
                 "qcow2 chain: " + (f"base {qcow['base_MBps']:,.0f} / top {qcow['top_MBps']:,.0f}"
                                    if qcow else "qemu-img missing"),
                 f"{old / new:.2f}x" + (f" (qcow2 {qcow['top_MBps'] / qcow['base_MBps']:.2f}x)"
                                        if qcow else ""))
        # 8. delete one snapshot from the middle.
        before = self.stats(mnt)
        t = time.perf_counter()
        self.ctl(mnt, f"snapshot delete v@s{n // 2:03d}")
        took = time.perf_counter() - t
        after = self.stats(mnt)
        freed = before["stored_bytes"] - after["stored_bytes"]
        self.record("delete_one", {"n": n, "seconds": took, "freed_bytes": freed})
        self.row(f"delete 1 of {n} snapshots", f"{took * 1e3:.0f} ms",
                 f"freed {freed / MiB:.2f} MiB", "")

    def qcow2_chain(self, n: int, size: int) -> dict | None:
        if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
            return None
        d = self.dir / "qcow"
        d.mkdir()
        sh("qemu-img", "create", "-q", "-f", "qcow2", d / "l000.qcow2", str(size))
        sh("qemu-io", "-c", f"write -P 1 0 {size}", d / "l000.qcow2")
        rng = random.Random(13)
        nblocks = size // BS
        for i in range(1, n + 1):
            top = d / f"l{i:03d}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", d / f"l{i - 1:03d}.qcow2",
               "-F", "qcow2", top)
            cmds = [f"write -P {i % 250 + 2} {b * BS} {BS}"
                    for b in rng.sample(range(nblocks), max(1, nblocks // 100))]
            sh("qemu-io", *[arg for c in cmds for arg in ("-c", c)], top)

        def convert(image: Path) -> float:
            self.drop_caches()
            t = time.perf_counter()
            sh("qemu-img", "convert", "-O", "raw", image, d / "out.raw")
            took = time.perf_counter() - t
            (d / "out.raw").unlink()
            return size / took / 1e6

        base = median([convert(d / "l000.qcow2") for _ in range(self.opts.repeat)])
        top = median([convert(d / f"l{n:03d}.qcow2") for _ in range(self.opts.repeat)])
        shutil.rmtree(d, ignore_errors=True)
        return {"base_MBps": base, "top_MBps": top}

    # ------------------------------------------------------------------ report

    def report(self) -> None:
        widths = [max(len(r[i]) for r in [("figure", "snapfs", "baselines", "ratio"), *self.rows])
                  for i in range(4)]
        print()
        for row in [("figure", "snapfs", "baselines", "ratio"), *self.rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


FIGURES = {"fio": Bench.fig_fio, "snapshot": Bench.fig_snapshot,
           "incremental": Bench.fig_incremental, "swift": Bench.fig_swift,
           "memory": Bench.fig_memory,
           "snapshots": Bench.fig_snapshots}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default=",".join(FIGURES), help=",".join(FIGURES))
    p.add_argument("--out", help="JSON file (default bench-results/bench-<time>.json)")
    p.add_argument("--workdir", default=None, help="where to put images (default /tmp)")
    opts = p.parse_args()
    wanted = [f.strip() for f in opts.only.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in FIGURES]
    if unknown:
        print(f"bench: unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}",
              file=sys.stderr)
        return 2
    bench = Bench(opts)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for name in wanted:
            print(f"{name}: {FIGURES[name].__doc__.strip().splitlines()[0]}", flush=True)
            try:
                FIGURES[name](bench)
            except Exception as exc:  # one figure failing must not hide the others
                print(f"  {name} failed: {exc}", flush=True)
                bench.record(name, {"error": str(exc)})
            finally:
                bench.stack.close()
                bench.stack = contextlib.ExitStack()
    finally:
        bench.close()
    bench.report()
    out = Path(opts.out or ROOT / "bench-results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench.results, indent=2))
    print(f"\nraw figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
