"""The only module that imports msgpack.

Settings: `use_bin_type=True` keeps bytes and str apart; `raw=False` decodes str as UTF-8;
`strict_map_key=False` lets integer keys through (tree nodes map child index → digest).
Every decode error becomes IntegrityError naming the object.
"""

from typing import Any

import msgpack

from snapfs.errors import IntegrityError


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str = "object") -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise IntegrityError(f"{what}: undecodable ({exc.__class__.__name__})") from None
