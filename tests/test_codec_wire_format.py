"""The codec's wire format is a contract other implementations read (a board's C++ client, a
FLARE filter). This reader is written from fedfill.codec's docstring alone, with struct and
integer bit operations; it never calls the codec's own unpacking or dequantization, so a
docstring that says one byte order while the code writes another fails here.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from fedfill import codec

DTYPE_CODES = {0: np.float32, 1: np.float64, 2: np.float16}  # as the docstring lists them


def read_documented_payload(payload: bytes) -> list[np.ndarray]:
    """Decode a payload following only the docstring's table of offsets and byte orders."""
    magic, version, count, crc = payload[0:4], payload[4], int.from_bytes(payload[8:12], "little"), \
        int.from_bytes(payload[12:16], "little")
    assert magic == b"FFQC" and version == 1
    assert zlib.crc32(payload[16:]) == crc, "the CRC covers every byte after the 16-byte header"
    offset, tensors = 16, []
    for _ in range(count):
        header = payload[offset:offset + 36]
        dtype_code, bits, ndim = header[0], header[1], header[2]
        dims = [int.from_bytes(header[4 + 4 * k:8 + 4 * k], "little") for k in range(6)]
        (lo,) = struct.unpack("<f", header[28:32])
        (hi,) = struct.unpack("<f", header[32:36])
        assert dims[ndim:] == [0] * (6 - ndim)
        shape = tuple(dims[:ndim])
        n = int(np.prod(shape, dtype=object)) if shape else 1
        size = (n * bits + 7) // 8
        offset += 36
        data = payload[offset:offset + size]
        offset += size
        # one bit string, first code's top bit = bit 7 of byte 0, codes back to back
        bit_string = int.from_bytes(data, "big")
        total_bits = 8 * size
        codes = [(bit_string >> (total_bits - (k + 1) * bits)) & ((1 << bits) - 1) for k in range(n)]
        assert bit_string & ((1 << (total_bits - n * bits)) - 1) == 0, "the padding bits are zero"
        values = [value_of(code, bits, lo, hi) for code in codes]
        tensors.append(np.array(values, dtype=np.float32).astype(DTYPE_CODES[dtype_code]).reshape(shape))
    assert offset == len(payload), "nothing follows the last tensor"
    return tensors


def value_of(code: int, bits: int, lo: float, hi: float) -> float:
    """A code's value as the docstring defines it, rounded once to float32."""
    if bits == 32:
        return struct.unpack(">f", code.to_bytes(4, "big"))[0]
    levels = 2 ** (bits - 1)
    sign, j = code >> (bits - 1), code & (levels - 1)
    if sign and j == 0:
        return 0.0
    step = (hi - lo) / (levels - 1)
    magnitude = lo + j * step
    return struct.unpack("<f", struct.pack("<f", -magnitude if sign else magnitude))[0]


def update_tensors(rng: np.random.Generator) -> list[np.ndarray]:
    """A few tensors of every dtype and rank, with zeros, negatives, and an empty one."""
    weights = rng.normal(0, 0.1, size=(5, 7)).astype(np.float32)
    weights[0, :3] = 0.0
    return [
        weights,
        rng.normal(0, 2.0, size=(3, 2, 2)).astype(np.float64),
        rng.normal(0, 1.0, size=11).astype(np.float16),
        np.array(-0.25, dtype=np.float32),  # 0-d
        np.zeros((2, 0), dtype=np.float32),  # empty
        np.zeros(4, dtype=np.float32),  # all zeros: the reserved zero code everywhere
    ]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 32])
def test_a_reader_written_from_the_docstring_decodes_what_decode_decodes(bits):
    rng = np.random.default_rng(bits)
    tensors = update_tensors(rng)
    payload = codec.encode(tensors, bits, rng)
    independent = read_documented_payload(payload)
    ours = codec.decode(payload)
    assert len(independent) == len(ours) == len(tensors)
    for mine, theirs, sent in zip(independent, ours, tensors):
        assert mine.dtype == theirs.dtype == sent.dtype and mine.shape == theirs.shape == sent.shape
        assert np.array_equal(mine, theirs)
    if bits == 32:
        # raw float32: exact for float32 and float16 tensors, float64 ones rounded to float32
        assert all(np.array_equal(got, sent.astype(np.float32).astype(sent.dtype))
                   for got, sent in zip(independent, tensors))


def test_the_documented_offsets_are_where_the_fields_are():
    """A hand-checked 32-bit payload: the float's bytes go most significant first, the header's
    fields little-endian, exactly as the table says."""
    payload = codec.encode([np.array([[1.0, -2.0]], dtype=np.float32)], 32, np.random.default_rng(0))
    assert payload[:4] == b"FFQC" and payload[4] == 1 and payload[5:8] == b"\0\0\0"
    assert payload[8:12] == (1).to_bytes(4, "little")
    tensor = payload[16:52]
    assert tensor[:4] == bytes([0, 32, 2, 0])
    assert tensor[4:12] == (1).to_bytes(4, "little") + (2).to_bytes(4, "little") and tensor[12:28] == bytes(16)
    assert payload[52:] == bytes.fromhex("3f800000") + bytes.fromhex("c0000000")  # 1.0, -2.0 big-endian
    assert len(payload) == codec.payload_bytes([2], 32)
