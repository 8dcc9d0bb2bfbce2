"""The send/receive stream format: one snapshot's blocks as a self-checking byte stream.

This module owns the format (byte tables in docs/streams.md) and nothing else: it knows no
mount, no engine and no file names (`snapfs/sendrecv.py` feeds it and applies what it reads).

    header   "SNAPSEND" u16 version=1, u16 name length n, u32 block size, u64 volume size,
             16-byte snapshot guid, 16-byte base guid (zeros: a full stream), name (n bytes),
             blake3 of the header's bytes before it (32)
    record*  kind 'D' (data) or 'Z' (zeros), u64 offset, u64 length, the data (D only),
             blake3 of the record's bytes before it (32)
    trailer  'E', u64 record count, u64 data bytes, blake3 of the whole stream before it (32)

Integers are little-endian. Records come in offset order, do not overlap and lie within the
volume size; a data record holds at most MAX_RECORD bytes. Nothing may follow the trailer.

`StreamWriter` writes one; `StreamReader` reads one and raises CorruptStream (one line) at
the first thing that is wrong: a checksum, an order, a bound, a stream cut short, trailing
bytes. Its records are only trustworthy once the iteration ended without an error, so a
receiver reads the whole stream once before it applies any of it.
"""

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import blake3

from snapfs.errors import CorruptStream, SnapfsError
from snapfs.units import check_name

MAGIC = b"SNAPSEND"
VERSION = 1
SUM = 32  # blake3 digest bytes
NO_GUID = bytes(16)
MAX_RECORD = 16 << 20  # the largest block size: a data record fits in memory
_HEAD = struct.Struct("<8sHHIQ16s16s")
_RECORD = struct.Struct("<cQQ")
_TRAILER = struct.Struct("<cQQ")
DATA, ZEROS, END = b"D", b"Z", b"E"


class Source(Protocol):
    """What a stream is read from: a binary file, a pipe, or a wrapper around one."""

    def read(self, n: int, /) -> bytes: ...


@dataclass(frozen=True)
class Header:
    """What a stream says about itself. `guid` and `base` are 32 hex digits; `base` None
    makes a full stream."""

    name: str
    size: int
    block_size: int
    guid: str
    base: str | None = None

    def encode(self) -> bytes:
        name = self.name.encode()
        base = NO_GUID if self.base is None else bytes.fromhex(self.base)
        head = _HEAD.pack(
            MAGIC, VERSION, len(name), self.block_size, self.size, bytes.fromhex(self.guid), base
        )
        return head + name + blake3.blake3(head + name).digest()


@dataclass(frozen=True)
class Record:
    kind: bytes  # DATA or ZEROS
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True)
class Totals:
    records: int
    data_bytes: int
    stream_bytes: int


class StreamWriter:
    """Writes a stream to `out` (any binary file object): the header at once, then one
    record per call, in offset order; `finish` writes the trailer. Nothing is buffered
    beyond `out`'s own buffer."""

    def __init__(self, out: BinaryIO, header: Header) -> None:
        self.out = out
        self.header = header
        self._hash = blake3.blake3()
        self._records = 0
        self._data_bytes = 0
        self._end = 0
        self.written = 0
        self._emit(header.encode())

    def _emit(self, data: bytes) -> None:
        self._hash.update(data)
        self.out.write(data)
        self.written += len(data)

    def _record(self, kind: bytes, offset: int, length: int, data: bytes = b"") -> None:
        if offset < self._end or offset + length > self.header.size or length <= 0:
            raise ValueError(f"record {offset}+{length} out of order or beyond the volume")
        head = _RECORD.pack(kind, offset, length)
        self._emit(head)
        self._emit(data)
        self._emit(blake3.blake3(head).update(data).digest())
        self._records += 1
        self._end = offset + length

    def data(self, offset: int, data: bytes) -> None:
        if len(data) > MAX_RECORD:
            raise ValueError(f"a data record holds at most {MAX_RECORD} bytes")
        self._record(DATA, offset, len(data), data)
        self._data_bytes += len(data)

    def zeros(self, offset: int, length: int) -> None:
        self._record(ZEROS, offset, length)

    def finish(self) -> Totals:
        self._emit(_TRAILER.pack(END, self._records, self._data_bytes))
        self.out.write(self._hash.digest())
        self.out.flush()
        self.written += SUM
        return Totals(self._records, self._data_bytes, self.written)


class StreamReader:
    """Reads a stream from `src`: the header when constructed, the records through
    `records()`, which checks the trailer and the end of input after the last one and
    sets `totals`. Every problem is a CorruptStream naming the byte offset."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self.pos = 0
        self._hash = blake3.blake3()
        self.totals: Totals | None = None
        self.header = self._read_header()

    def _read(self, n: int, what: str) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.src.read(left)
            if not chunk:
                raise CorruptStream(f"stream cut short at byte {self.pos + n - left} (in {what})")
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        self.pos += n
        self._hash.update(data)
        return data

    def _read_sum(self, expected: bytes, what: str) -> None:
        at = self.pos
        got = self._read(SUM, what)
        if got != expected:
            raise CorruptStream(f"checksum mismatch in {what} (at byte {at}): stream damaged")

    def _read_header(self) -> Header:
        head = self._read(_HEAD.size, "header")
        magic, version, n, block_size, size, guid, base = _HEAD.unpack(head)
        if magic != MAGIC:
            raise CorruptStream("not a snapfs send stream (bad magic)")
        if version != VERSION:
            raise CorruptStream(f"stream format version {version} is not supported (only 1)")
        name = self._read(n, "header")
        self._read_sum(blake3.blake3(head + name).digest(), "header")
        try:
            text = check_name(name.decode(), "snapshot name")
        except (UnicodeDecodeError, SnapfsError) as exc:
            raise CorruptStream(f"stream header: {exc}") from None
        if guid == NO_GUID or not block_size or size <= 0:
            raise CorruptStream("stream header: no snapshot guid, block size or size")
        return Header(text, size, block_size, guid.hex(), None if base == NO_GUID else base.hex())

    def records(self) -> Iterator[Record]:
        end = count = data_bytes = 0
        while True:
            head = self._read(_RECORD.size, f"record {count + 1}")
            kind, offset, length = _RECORD.unpack(head)
            if kind == END:
                return self._read_trailer(head, count, data_bytes)
            record = self._read_record(kind, offset, length, end, count + 1)
            self._read_sum(blake3.blake3(head).update(record.data).digest(), f"record {count + 1}")
            end = offset + length
            count += 1
            data_bytes += len(record.data)
            yield record

    def _read_record(self, kind: bytes, offset: int, length: int, end: int, n: int) -> Record:
        where = f"record {n} ({offset}+{length})"
        if kind not in (DATA, ZEROS):
            raise CorruptStream(f"{where}: unknown kind {kind!r}")
        if length <= 0 or offset < end or offset + length > self.header.size:
            raise CorruptStream(f"{where}: empty, out of order or beyond the volume's size")
        if kind == ZEROS:
            return Record(kind, offset, length)
        if length > MAX_RECORD:
            raise CorruptStream(f"{where}: longer than {MAX_RECORD} bytes")
        return Record(kind, offset, length, self._read(length, where))

    def _read_trailer(self, head: bytes, count: int, data_bytes: int) -> None:
        _kind, records, total = _TRAILER.unpack(head)
        expected = self._hash.digest()
        if (records, total) != (count, data_bytes):
            raise CorruptStream(
                f"trailer says {records} records and {total} data bytes, the stream has "
                f"{count} and {data_bytes}"
            )
        self._read_sum(expected, "trailer")
        if self.src.read(1):
            raise CorruptStream(f"bytes after the trailer (at byte {self.pos})")
        self.totals = Totals(count, data_bytes, self.pos)
