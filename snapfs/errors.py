"""The one exception tree of snapfs.

Every error a user can cause or meet derives from SnapfsError, carries a one-line message
and an errno, so the FUSE layer and the CLI can report it without a traceback.
"""

import errno


class SnapfsError(Exception):
    """Base of every expected snapfs error: one line for the user, one errno for the kernel."""

    errno = errno.EIO

    def __str__(self) -> str:
        return " ".join(str(a) for a in self.args) or self.__class__.__name__


class InvalidArgument(SnapfsError):
    errno = errno.EINVAL


class BeyondEnd(InvalidArgument):
    """A write outside a volume's size: the kernel is told ENOSPC, as for a full device."""

    errno = errno.ENOSPC


class NotFound(SnapfsError):
    errno = errno.ENOENT


class AlreadyExists(SnapfsError):
    errno = errno.EEXIST


class Busy(SnapfsError):
    errno = errno.EBUSY


class PermissionDenied(SnapfsError):
    errno = errno.EACCES


class StoreError(SnapfsError):
    """The object store failed in a way that retrying did not fix."""

    errno = errno.EIO


class ObjectNotFound(StoreError):
    """A key that should be in the store is not there."""

    errno = errno.EIO


class IntegrityError(StoreError):
    """Bytes read back do not match their digest or format; names the object."""

    errno = errno.EIO


class InvalidReference(SnapfsError):
    """A reference id that names no usable reference in this store (unknown, still
    inbound, or whose size or block size do not fit the volume): snapfs/volume/references.py."""

    errno = errno.EINVAL


class CatalogFailed(SnapfsError):
    """A change to the local catalog (SQLite) could not be made durable: memory and disk
    may disagree, so the engine changes nothing more until it is remounted (as ext4's
    errors=remount-ro); the next mount recovers from what the catalog holds."""

    errno = errno.EIO


class CacheSyncFailed(SnapfsError):
    """An fdatasync of a volume's cache file failed: the kernel may have dropped the pages it
    could not write, so no later fsync of that volume may succeed until it is remounted."""

    errno = errno.EIO


class ReadOnly(SnapfsError):
    """The mount is read-only, or this writer lost the store's lease."""

    errno = errno.EROFS


class Cancelled(SnapfsError):
    """A long operation (a restore) was cancelled at the user's request."""

    errno = errno.ECANCELED


class CorruptStream(SnapfsError):
    """A send/receive stream that is cut short, damaged or not a stream at all: refused
    whole, before anything of it is applied (snapfs/stream.py)."""

    errno = errno.EBADMSG
