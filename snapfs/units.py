"""Parsing and formatting of the things users type: sizes and names."""

import re

from snapfs.errors import InvalidArgument

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:+-]*$")
NAME_MAX = 128
# An import writes into a hidden volume IMPORTING + VOL + "~" + TAG and renames it to VOL at
# the end: names users type cannot start with '.' nor hold '~', so no user volume can take
# or see such a name. A new TAG per attempt: the kernel may still cache the name of the
# attempt before (for the entry timeout) as a deleted volume.
IMPORTING = ".import."
MAX_VOLUME_SIZE = 1 << 50  # 1 PiB


def parse_size(text: str | int, what: str = "size") -> int:
    """'512', '4K', '128K', '10G', '1T' (binary multiples) → bytes; anything else is an error."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise InvalidArgument(f"invalid {what} {text!r}: use a number with K, M, G or T")
        value = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value <= 0:
        raise InvalidArgument(f"invalid {what} {text!r}: must be greater than zero")
    return value


def parse_seconds(
    text: str, what: str = "duration", upto: float = 86400.0, zero: bool = False
) -> float:
    """'5', '0.5', '30' seconds → float in (0, upto] ([0, upto] with `zero`); anything else
    is an error."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InvalidArgument(f"invalid {what} {text!r}: use a number of seconds") from None
    low = value >= 0 if zero else value > 0
    if not (low and value <= upto):  # also refuses nan
        span = f"[0, {upto:g}]" if zero else f"(0, {upto:g}]"
        raise InvalidArgument(f"invalid {what} {text!r}: must be in {span} seconds")
    return value


def format_size(n: int) -> str:
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B" if n else "0"


def check_name(name: str, what: str = "name") -> str:
    """Volume, snapshot and group names: 1-128 of [A-Za-z0-9._:+-], not starting with '.' or '-'."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"invalid {what}: empty")
    if len(name) > NAME_MAX:
        raise InvalidArgument(f"invalid {what}: longer than {NAME_MAX} characters")
    if not _NAME_RE.match(name):
        shown = name.encode("unicode_escape").decode()[:40]
        raise InvalidArgument(
            f"invalid {what} {shown!r}: use letters, digits and . _ : + - (not first . or -)"
        )
    return name


def check_volume_name(name: str) -> str:
    """A volume name, or the hidden name of an import in progress (see IMPORTING)."""
    if isinstance(name, str) and name.startswith(IMPORTING):
        base, tilde, tag = name.removeprefix(IMPORTING).rpartition("~")
        if not tilde or not tag.isalnum():
            raise InvalidArgument(f"invalid import volume name {name[:60]!r}")
        check_name(base, "volume name")
        return name
    return check_name(name, "volume name")


def split_snapshot_ref(ref: str) -> tuple[str, str]:
    """'vol@snap' → ('vol', 'snap'), both checked."""
    if not isinstance(ref, str) or ref.count("@") != 1:
        raise InvalidArgument(
            f"invalid snapshot reference {str(ref)[:60]!r}: expected VOLUME@SNAPSHOT"
        )
    vol, snap = ref.split("@")
    return check_name(vol, "volume name"), check_name(snap, "snapshot name")
