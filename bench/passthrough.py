"""The ceiling of a Python FUSE daemon: a minimal pyfuse3 + trio file system with one file
that passes reads and writes through to a local file (pread / pwrite, no caching of ours).

    python bench/passthrough.py BACKING_FILE MOUNTPOINT [--direct-io]
                                                  (foreground; the file is 'disk')

--direct-io opens the file with FOPEN_DIRECT_IO (no page cache), as snapfs opens volumes.
"""

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1


class Passthrough(pyfuse3.Operations):
    def __init__(self, backing: str, direct_io: bool) -> None:
        super().__init__()
        self.fd = os.open(backing, os.O_RDWR)
        self.direct_io = direct_io

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.attr_timeout = a.entry_timeout = 60
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            st = os.fstat(self.fd)
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = st.st_size
            a.st_blocks = st.st_blocks
        a.st_blksize = 4096
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == b"disk":
            return self._attrs(FILE_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"disk", self._attrs(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(
            fh=FILE_INO, keep_cache=not self.direct_io, direct_io=self.direct_io
        )

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):
        os.fdatasync(self.fd)

    async def release(self, fh):
        return None


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    ops = Passthrough(backing, direct_io="--direct-io" in sys.argv[3:])
    pyfuse3.init(ops, mountpoint, {"fsname=passthrough", "allow_other"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
