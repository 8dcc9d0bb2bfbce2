"""The send/receive stream format (snapfs/stream.py), without a mount: a round trip, and
every kind of damage refused with one line before any record counts."""

import io

import pytest

from snapfs.errors import CorruptStream
from snapfs.stream import DATA, MAX_RECORD, ZEROS, Header, StreamReader, StreamWriter

GUID = "0123456789abcdef0123456789abcdef"
BASE = "fedcba9876543210fedcba9876543210"


def encode(header: Header, records) -> bytes:
    out = io.BytesIO()
    writer = StreamWriter(out, header)
    for kind, offset, payload in records:
        if kind == DATA:
            writer.data(offset, payload)
        else:
            writer.zeros(offset, payload)
    totals = writer.finish()
    assert totals.stream_bytes == len(out.getvalue())
    return out.getvalue()


def decode(data: bytes):
    reader = StreamReader(io.BytesIO(data))
    records = list(reader.records())
    return reader, records


INCREMENTAL = Header("s2", 1 << 20, 4096, GUID, BASE)
RECORDS = [(DATA, 0, b"a" * 4096), (ZEROS, 8192, 8192), (DATA, 65536, b"b" * 12288)]


def test_round_trip_keeps_header_and_records():
    reader, records = decode(encode(INCREMENTAL, RECORDS))
    assert reader.header == INCREMENTAL
    assert [(r.kind, r.offset, r.length) for r in records] == [
        (DATA, 0, 4096),
        (ZEROS, 8192, 8192),
        (DATA, 65536, 12288),
    ]
    assert records[2].data == b"b" * 12288
    assert reader.totals is not None
    assert (reader.totals.records, reader.totals.data_bytes) == (3, 16384)


def test_a_full_stream_has_no_base_and_may_be_empty():
    full = Header("s1", 512, 4096, GUID)
    reader, records = decode(encode(full, []))
    assert reader.header.base is None and records == []


def test_every_flipped_byte_is_refused():
    data = encode(INCREMENTAL, RECORDS)
    for at in range(0, len(data), 97):
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        with pytest.raises(CorruptStream):
            decode(bytes(damaged))


@pytest.mark.parametrize("keep", [0, 5, 30, 120, -33, -1])
def test_a_cut_stream_is_refused(keep):
    data = encode(INCREMENTAL, RECORDS)
    with pytest.raises(CorruptStream) as err:
        decode(data[:keep])
    assert "cut short" in str(err.value) or "magic" in str(err.value)


def test_bytes_after_the_trailer_are_refused():
    with pytest.raises(CorruptStream, match="after the trailer"):
        decode(encode(INCREMENTAL, RECORDS) + b"x")


def test_garbage_is_not_a_stream():
    with pytest.raises(CorruptStream, match="not a snapfs send stream"):
        decode(b"hello world, this is not a stream at all" * 3)


def test_a_dropped_record_fails_the_trailer():
    data = encode(INCREMENTAL, RECORDS)
    head = len(INCREMENTAL.encode())
    record = 17 + 4096 + 32  # the first data record, whole
    with pytest.raises(CorruptStream):
        decode(data[:head] + data[head + record :])


def test_the_writer_refuses_records_out_of_order_or_beyond_the_size():
    writer = StreamWriter(io.BytesIO(), INCREMENTAL)
    writer.data(4096, b"x" * 4096)
    with pytest.raises(ValueError):
        writer.data(0, b"y")
    with pytest.raises(ValueError):
        writer.zeros((1 << 20) - 10, 11)
    with pytest.raises(ValueError):
        writer.data(1 << 19, b"z" * (MAX_RECORD + 1))


def test_a_record_beyond_the_size_is_refused_by_the_reader():
    small = Header("s2", 8192, 4096, GUID, BASE)
    data = bytearray(encode(INCREMENTAL, [(DATA, 0, b"a" * 4096), (DATA, 65536, b"b")]))
    # The same records under a header that says 8 KiB: re-encode the header only.
    head = len(INCREMENTAL.encode())
    forged = small.encode() + bytes(data[head:])
    with pytest.raises(CorruptStream, match="beyond"):
        decode(forged)
