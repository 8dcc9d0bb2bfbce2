"""snapfs snapshot unmanage / unmanaged list / manage through the real mount: a volume whose
snapshots are all unmanaged is deleted, its references adopted by another volume read back
exact, and bad input gets one line and exit 1."""

import os

import pytest

from tests.conftest import Snapfs, refused, sha256

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def test_unmanage_delete_manage_reads_back_exact(snapfs: Snapfs):
    fs = snapfs
    fs.cli("volume", "create", "db", "--size", "40M")
    with open(fs.vol("db"), "r+b") as f:
        f.write(os.urandom(3 * MiB))
        f.seek(33 * MiB)
        f.write(os.urandom(MiB))
    fs.cli("snapshot", "create", "db@one")
    with open(fs.vol("db"), "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(MiB))
    fs.cli("snapshot", "create", "db@two")
    fs.cli("snapshot", "create", "db@tmp", "--temporary")
    fs.cli("sync")
    want = {n: sha256(fs.snap("db", n)) for n in ("one", "two")}
    refused(fs, "snapshot", "unmanage", "db@tmp")
    refused(fs, "snapshot", "unmanage", "db@nope")
    refused(fs, "snapshot", "unmanage", "../x")
    ids = {n: fs.cli("snapshot", "unmanage", f"db@{n}").stdout.strip() for n in ("one", "two")}
    listed = fs.cli_json("snapshot", "unmanaged", "list")
    assert {(r["id"], r["name"], r["state"]) for r in listed} == {
        (ids["one"], "one", "available"),
        (ids["two"], "two", "available"),
    }
    assert "SOURCE" in fs.cli("snapshot", "unmanaged", "list").stdout
    fs.cli("snapshot", "delete", "db@tmp")
    fs.cli("volume", "delete", "db")
    fs.cli("volume", "create", "db2", "--size", "40M")
    fs.cli("volume", "create", "tiny", "--size", "8M")
    assert "not found" in refused(fs, "snapshot", "manage", "nope", ids["one"])
    refused(fs, "snapshot", "manage", "db2", "0" * 16)
    refused(fs, "snapshot", "manage", "db2", "../x")
    assert "larger" in refused(fs, "snapshot", "manage", "tiny", ids["one"])
    fs.cli("snapshot", "manage", "db2", ids["one"], "--name", "first")
    fs.cli("snapshot", "manage", "db2", ids["two"])
    assert sha256(fs.snap("db2", "first")) == want["one"]
    assert sha256(fs.snap("db2", "two")) == want["two"]
    assert fs.cli_json("snapshot", "unmanaged", "list") == []
    fsck = fs.cli_json("fsck")
    assert fsck["clean"], fsck
