"""kill -9 at random moments, twenty times, while a writer fsyncs and `snapfs sync` runs:
every remount of the same cache dir succeeds and holds every fsynced byte."""

import contextlib
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import Snapfs

pytestmark = pytest.mark.fuse

SLOTS = 96
SLOT = 4096


class Writer(threading.Thread):
    """Writes numbered records round-robin over the slots, fsyncing after every third;
    remembers, per slot, the last fsynced record and what was written after it."""

    def __init__(self, path, rng: random.Random, durable: dict, since: dict) -> None:
        super().__init__(daemon=True)
        self.path, self.rng, self.durable, self.since = path, rng, durable, since
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            self.error = exc
            return
        pending: dict[int, bytes] = {}
        try:
            n = 0
            while True:
                n += 1
                slot = self.rng.randrange(SLOTS)
                record = f"{time.monotonic_ns()}:{n}:".encode().ljust(SLOT, b"r")
                self.since.setdefault(slot, []).append(record)  # may land, may not
                os.pwrite(fd, record, slot * SLOT)
                pending[slot] = record
                if n % 3 == 0:
                    os.fsync(fd)
                    for s, rec in pending.items():
                        self.durable[s] = rec
                        self.since[s] = self.since[s][self.since[s].index(rec) + 1 :]
                    pending.clear()
        except OSError as exc:  # the daemon died under us
            self.error = exc
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once the daemon is gone
                os.close(fd)


def test_twenty_kills_lose_no_fsynced_byte(snapfs: Snapfs):
    fs = snapfs
    fs.cli("volume", "create", "v", "--size", "8M", "--block-size", "16K")
    rng = random.Random(20261201)
    durable: dict[int, bytes] = {}
    since: dict[int, list[bytes]] = {}
    for kill in range(20):
        writer = Writer(fs.vol("v"), rng, durable, since)
        writer.start()
        stop = threading.Event()

        def syncs(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                fs.cli("sync", check=False)

        syncer = threading.Thread(target=syncs, daemon=True)
        syncer.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(fs.pid, signal.SIGKILL)
        stop.set()
        writer.join(30)
        syncer.join(60)
        assert not writer.is_alive() and not syncer.is_alive()
        subprocess.run(["fusermount3", "-uz", str(fs.mnt)], capture_output=True)
        fs.mount()  # the same cache dir: must recover, every time
        with open(fs.vol("v"), "rb") as f:
            for slot in range(SLOTS):
                f.seek(slot * SLOT)
                got = f.read(SLOT)
                allowed = [durable.get(slot, bytes(SLOT)), *since.get(slot, [])]
                assert got in allowed, f"kill {kill}: slot {slot} lost its fsynced record"
                durable[slot], since[slot] = got, []
    fs.cli("sync")
    assert fs.cli_json("fsck")["clean"]
