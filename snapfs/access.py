"""Who may see and use what: the one owner rule of snapfs.

A volume or snapshot belongs to the uid that created it. Its owner and root may see it and
use it; to every other user it is invisible in listings and refused (EACCES) by name.
Commands that act on every user's state (fsck, gc, evict) are root's.

owns: the rule and the PermissionDenied it raises. does not own: who a caller is (the
FUSE request's context or the ctl handle says) nor who owns an object (the catalog says).
"""

from snapfs.errors import PermissionDenied

ROOT = 0


def visible(owner: int, uid: int) -> bool:
    """Whether `uid` may see and use an object that `owner` owns."""
    return uid in (ROOT, owner)


def check_owner(owner: int, uid: int, what: str) -> None:
    """PermissionDenied unless `uid` is root or `owner`; `what` names the object."""
    if not visible(owner, uid):
        raise PermissionDenied(f"{what} belongs to another user")


def check_root(uid: int, what: str, why: str = "") -> None:
    """PermissionDenied unless `uid` is root; `what` names the command, `why` may say why."""
    if uid != ROOT:
        raise PermissionDenied(f"{what} is for root" + (f": {why}" if why else ""))
