"""Rebuild the installed pyfuse3 with a fallocate handler, in the current virtualenv.

pyfuse3 (up to 3.5 at least) registers no FUSE_FALLOCATE handler, so the kernel answers
every fallocate() on a snapfs volume with EOPNOTSUPP, and loop devices, `fstrim` and `mount
-o discard` cannot give space back. libfuse has the callback; this script takes pyfuse3's
own source release from PyPI, adds a handler that awaits `Operations.fallocate(fh, mode,
offset, length)` the way pyfuse3's other handlers do, and installs the result. It also sets
`pyfuse3.SNAPFS_FALLOCATE = True`, which snapfs checks.

Usage: python scripts/pyfuse3-fallocate.py [--force]   (idempotent; needs Cython at build
time, which pip installs into the build environment, and libfuse3-dev).
"""

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HANDLER = """

cdef void fuse_fallocate (fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                          off_t length, fuse_file_info *fi):
    cdef _Container c = _Container()
    c.req = req
    c.ino = ino
    c.flags = mode
    c.off = offset
    c.size = <size_t> length
    c.fh = fi.fh
    save_retval(fuse_fallocate_async(c))

async def fuse_fallocate_async (_Container c):
    cdef int ret

    try:
        await operations.fallocate(c.fh, c.flags, c.off, c.size)
    except FUSEError as e:
        ret = fuse_reply_err(c.req, e.errno)
    else:
        ret = fuse_reply_err(c.req, 0)

    if ret != 0:
        log.error('fuse_fallocate(): fuse_reply_* failed with %s', strerror(-ret))
"""

REGISTER_AFTER = "    fuse_ops.poll = fuse_poll\n"
REGISTER = "    fuse_ops.fallocate = fuse_fallocate\n"
MARKER = "\nSNAPFS_FALLOCATE = True\n"


def installed() -> bool:
    probe = "import pyfuse3, sys; sys.exit(0 if getattr(pyfuse3, 'SNAPFS_FALLOCATE', 0) else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def patch(src: Path) -> None:
    pkg = src / "src" / "pyfuse3"
    handlers = pkg / "handlers.pxi"
    handlers.write_text(handlers.read_text() + HANDLER)
    internal = pkg / "internal.pxi"
    text = internal.read_text()
    if REGISTER_AFTER not in text:
        sys.exit(f"pyfuse3-fallocate: {internal} has changed; cannot add the handler")
    internal.write_text(text.replace(REGISTER_AFTER, REGISTER_AFTER + REGISTER, 1))
    init = pkg / "__init__.pyx"
    init.write_text(init.read_text() + MARKER)


def main() -> None:
    if installed() and "--force" not in sys.argv:
        return
    pip = [sys.executable, "-m", "pip"]
    version = importlib.metadata.version("pyfuse3")  # rebuild the release pip chose
    with tempfile.TemporaryDirectory(prefix="snapfs-pyfuse3-") as tmp:
        subprocess.run(
            [*pip, "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             f"pyfuse3=={version}"],
            check=True,
        )  # fmt: skip
        sdist = Path(tmp) / f"pyfuse3-{version}.tar.gz"
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"pyfuse3-{version}"
        patch(src)
        subprocess.run([*pip, "install", "-q", "--no-deps", "--force-reinstall", str(src)],
                       check=True)  # fmt: skip
    if not installed():
        sys.exit("pyfuse3-fallocate: the rebuilt pyfuse3 does not have the handler")
    print(f"pyfuse3-fallocate: pyfuse3 {version} with a fallocate handler installed")


if __name__ == "__main__":
    main()
