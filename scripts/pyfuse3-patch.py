"""Rebuild the installed pyfuse3 with two additions snapfs uses, in the current virtualenv.

The script takes pyfuse3's own source release from PyPI, patches it and installs the result
(idempotent; Cython comes into pip's build environment; needs libfuse3-dev):

- A fallocate handler. pyfuse3 (up to 3.5 at least) registers no FUSE_FALLOCATE handler,
  so the kernel answers every fallocate() on a snapfs volume with EOPNOTSUPP, and loop
  devices, `fstrim` and `mount -o discard` cannot give space back. The handler awaits
  `Operations.fallocate(fh, mode, offset, length)` the way pyfuse3's other handlers do.
  Marker: `pyfuse3.SNAPFS_FALLOCATE`.
- Spliced read replies. `Operations.read` may return `pyfuse3.ReplyFromFd(fd, offset,
  size)`: libfuse then splices those bytes of the file into the reply (fuse_reply_data with
  an fd buffer; the connection asks for FUSE_CAP_SPLICE_WRITE) instead of copying them
  through a Python bytes object. snapfs answers reads of cached blocks that way.
  Marker: `pyfuse3.SNAPFS_SPLICE`.

Usage: python scripts/pyfuse3-patch.py [--force]
"""

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MARKERS = ("SNAPFS_FALLOCATE", "SNAPFS_SPLICE")

FALLOCATE_HANDLER = """

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

READ_LOCALS = "    cdef Py_buffer pybuf\n\n    try:\n        buf = await operations.read("
SPLICED_READ_LOCALS = (
    "    cdef Py_buffer pybuf\n    cdef fuse_bufvec bufv\n\n"
    "    try:\n        buf = await operations.read("
)
READ_REPLY = """        PyObject_GetBuffer(buf, &pybuf, PyBUF_CONTIG_RO)
        ret = fuse_reply_buf(c.req, <const_char*> pybuf.buf, <size_t> pybuf.len)
        PyBuffer_Release(&pybuf)
"""
SPLICED_READ_REPLY = """        if type(buf) is ReplyFromFd:
            bufv.count = 1
            bufv.idx = 0
            bufv.off = 0
            bufv.buf[0].size = <size_t> buf.size
            bufv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK
            bufv.buf[0].mem = NULL
            bufv.buf[0].fd = <int> buf.fd
            bufv.buf[0].pos = <off_t> buf.offset
            ret = fuse_reply_data(c.req, &bufv, 0)
        else:
            PyObject_GetBuffer(buf, &pybuf, PyBUF_CONTIG_RO)
            ret = fuse_reply_buf(c.req, <const_char*> pybuf.buf, <size_t> pybuf.len)
            PyBuffer_Release(&pybuf)
"""
INIT_AFTER = "    conn.want &= ~(<unsigned> FUSE_CAP_READDIRPLUS_AUTO)\n"
INIT_SPLICE = """    if conn.capable & FUSE_CAP_SPLICE_WRITE:
        conn.want |= FUSE_CAP_SPLICE_WRITE
"""

PYTHON_ADDITIONS = '''

class ReplyFromFd:
    """Return value of Operations.read: reply with `size` bytes of file descriptor `fd`
    from `offset`, spliced by libfuse. The bytes are read when the handler returns."""

    __slots__ = ("fd", "offset", "size")

    def __init__(self, fd, offset, size):
        self.fd = fd
        self.offset = offset
        self.size = size


SNAPFS_FALLOCATE = True
SNAPFS_SPLICE = True
'''


def installed() -> bool:
    probe = (
        "import pyfuse3, sys\n"
        f"sys.exit(0 if all(getattr(pyfuse3, m, 0) for m in {MARKERS!r}) else 1)"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"pyfuse3-patch: {path} has changed; cannot patch it")
    path.write_text(text.replace(old, new, 1))


def patch(src: Path) -> None:
    pkg = src / "src" / "pyfuse3"
    handlers = pkg / "handlers.pxi"
    replace_once(handlers, READ_LOCALS, SPLICED_READ_LOCALS)
    replace_once(handlers, READ_REPLY, SPLICED_READ_REPLY)
    replace_once(handlers, INIT_AFTER, INIT_AFTER + INIT_SPLICE)
    handlers.write_text(handlers.read_text() + FALLOCATE_HANDLER)
    replace_once(pkg / "internal.pxi", REGISTER_AFTER, REGISTER_AFTER + REGISTER)
    init = pkg / "__init__.pyx"
    init.write_text(init.read_text() + PYTHON_ADDITIONS)


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
        sys.exit("pyfuse3-patch: the rebuilt pyfuse3 lacks the additions")
    print(f"pyfuse3-patch: pyfuse3 {version} with fallocate and spliced reads installed")


if __name__ == "__main__":
    main()
