"""The upload codec: unbiased stochastic quantization ([ODQ eq. 1]), bit-packed.

Why a real codec: the cost model charges an upload S = M * bits (+ headers); the client must
send exactly that, and the server must turn it back into an unbiased estimate of the update.

Per tensor, with `bits` in 2..31, each element costs one sign bit and `bits - 1` bits of
level index, so there are L = 2**(bits - 1) magnitude levels, uniform on [lo, hi]:

    level_j = lo + j * s,   s = (hi - lo) / (L - 1),   j = 0 .. L - 1

where lo and hi are the smallest and largest non-zero |w| of the tensor ([ODQ eq. 2]
is garbled; this is its evident intent). A magnitude between two levels rounds to
the upper one with probability (|w| - level_j) / s, else to the lower one ([ODQ eq. 1]), so
E[w_hat] = w.

Zeros stay zero. The code "sign = 1 (negative), index = 0" is reserved for an exact 0, so
no header flag or bitmap is needed. The price is paid by negative values only: a negative
magnitude in the lowest interval [lo, lo + s] rounds between 0 and level_1 = lo + s
(still unbiased). If all non-zero magnitudes are equal (s would be 0), the encoder sets
lo = 0 so that every value sits exactly on the top level and nothing collides with 0.

Error bound, derived: an element rounded between neighbours a < |w| < b has variance
(b - |w|)(|w| - a) <= (b - a)**2 / 4. Every interval has width s except the negative bottom
one, of width lo + s. Hence

    E||w - w_hat||^2 <= n * s**2 / 4 + n_low * ((lo + s)**2 - s**2) / 4
                     <= n * (hi - lo)**2 / (4 (L - 1)**2) + n_low * lo * (lo + 2 s) / 4

with n_low the negative elements in the bottom interval. For trained weights lo is tiny
(some weight is nearly 0), so the first term -- (spread)^2 / (4 (L-1)^2) per element --
is the bound in practice. `expected_squared_error` gives the exact expectation.

The typical error, and what a device reports. The bound takes the worst place inside each
interval; values spread evenly inside an interval of width s have variance s**2/6 on
average, so in practice E||w - w_hat||^2 ~= sum_t n_t (hi_t - lo_t)**2 / (6 (L - 1)**2) and the
relative error is close to K / (L - 1)**2 with the update's "codec constant"
K ~= sum_t n_t (hi_t - lo_t)**2 / (6 ||w||^2) (about 4-6 for Gaussian updates of 1e5-1e8
values; [ODQ Thm. 1], 1/(2 L^2), would need K ~= 1/2). The server plans bits with that
model (strategies/allocation/quantization.py); on the device, `relative_error` is the exact
expected relative error, `codec_constant` the exact K at a width (reported for the next
plan), and `bits_for_demand` the fewest bits whose exact error meets a demand.

bits = 32 sends raw float32 (no quantization). bits = 1 is rejected: a sign alone cannot
carry an unbiased magnitude.

Wire format. Every multi-byte header field is little-endian; the packed codes are big-endian
(most significant bit and byte first). Offsets in bytes:

    payload header, 16 bytes (struct "<4sB3xII"):
      0   4 bytes          magic b"FFQC"
      4   uint8            version, 1
      5   3 bytes          padding, written as zeros, ignored on reading
      8   uint32 LE        tensor count
      12  uint32 LE        CRC-32 (zlib.crc32: the ISO-HDLC/PNG polynomial) of every byte after
                           this header, up to the end of the payload
    then, per tensor, a 36-byte header (struct "<BBB1x6Iff"):
      0   uint8            dtype code, the dtype decode returns: 0 float32, 1 float64, 2 float16
      1   uint8            bits, 2..32
      2   uint8            ndim, 0..6
      3   1 byte           padding, written as zero, ignored on reading
      4   6 x uint32 LE    the shape: the first ndim are the dimensions (C order), the rest 0
      28  float32 LE       lo
      32  float32 LE       hi
    directly followed by its ceil(n * bits / 8) bytes of packed codes, n the product of the
    dimensions (1 for ndim 0). Nothing follows the last tensor.

Packed codes: the n codes of `bits` bits are one bit string, each code written most
significant bit first, codes back to back with no gap; the string fills bytes from the most
significant bit of the first byte down (the first code's top bit is bit 7 of byte 0), and the
last byte is zero-padded in its low bits. That holds at every width: 8-bit codes are plain
bytes, 16-bit codes big-endian uint16, and the raw float32 of bits = 32 go as big-endian
32-bit words (the IEEE-754 bit pattern, most significant byte first).

What a code means. At bits = 32 it is a float32 (lo and hi are written as 0 and ignored). At
bits < 32 its top bit is the sign (1: negative) and its low bits - 1 bits the level index j;
with L = 2**(bits - 1), the code "sign 1, j 0" is exactly 0, and any other is
+-(lo + j * s), s = (hi - lo) / (L - 1), with lo and hi widened to float64, s computed first
and the sum in float64, then rounded once to float32. The float32 values are then cast to
the header's dtype. `payload_bytes` gives the exact size from the element counts alone.

`decode` refuses, with a ValueError saying why, anything else: a wrong magic, version or
CRC, a count or a shape the payload's bytes cannot hold (checked before anything is
allocated, so a header claiming 10**12 elements costs nothing), an unknown dtype, bits
outside 2..32, dimensions beyond ndim that are not 0, lo and hi not 0 <= lo <= hi finite,
non-finite values, values that overflow the dtype, and bytes after the last tensor.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

MAGIC = b"FFQC"
VERSION = 1
MAX_NDIM = 6
_PAYLOAD_HEADER = struct.Struct("<4sB3xII")  # magic, version, tensor count, crc32
_TENSOR_HEADER = struct.Struct("<BBB1x6Iff")  # dtype code, bits, ndim, shape[6], lo, hi
PAYLOAD_HEADER_BYTES = _PAYLOAD_HEADER.size
TENSOR_HEADER_BYTES = _TENSOR_HEADER.size
MIN_BITS, MAX_BITS = 2, 32

# Decoded tensors come back in the dtype they were sent in.
_DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.float64), 2: np.dtype(np.float16)}
_DTYPE_CODES = {dt: code for code, dt in _DTYPES.items()}


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS} (1 bit cannot carry an "
                         f"unbiased magnitude), got {bits!r}")
    return int(bits)


def packed_bytes(num_elements: int, bits: int) -> int:
    """Bytes of packed codes for one tensor: ceil(n * bits / 8)."""
    return (int(num_elements) * check_bits(bits) + 7) // 8


def payload_bytes(num_elements_per_tensor: Sequence[int], bits: int) -> int:
    """Exact size of `encode(arrays, bits)` given only each tensor's element count."""
    sizes = list(num_elements_per_tensor)
    return PAYLOAD_HEADER_BYTES + sum(TENSOR_HEADER_BYTES + packed_bytes(n, bits) for n in sizes)


def num_levels(bits: int) -> int:
    """L: magnitude levels per sign for a given bit width (quantized widths only)."""
    return 2 ** (check_bits(bits) - 1)


def quantization_grid(w: np.ndarray) -> tuple[float, float]:
    """(lo, hi) of the level grid: min and max non-zero |w| as float32 (lo = 0 when they coincide)."""
    mag = np.abs(np.asarray(w, dtype=np.float32)).ravel()
    nonzero = mag[mag > 0]
    if nonzero.size == 0:
        return 0.0, 0.0
    lo, hi = float(nonzero.min()), float(nonzero.max())
    return (0.0 if lo == hi else lo), hi


def _brackets(w32: np.ndarray, bits: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each non-zero element: the index of the level below |w| and the magnitudes it rounds
    between (for a negative value in the bottom interval the lower one is 0, the zero code).

    In float64, in place where possible: this is most of the encoder's time on 3.5M weights.
    """
    levels = num_levels(bits)
    step = (hi - lo) / (levels - 1)
    lower_index = np.abs(w32).astype(np.float64)
    lower_index -= lo
    lower_index /= step
    np.floor(lower_index, out=lower_index)
    np.minimum(lower_index, levels - 2, out=lower_index)
    np.maximum(lower_index, 0, out=lower_index)  # exact zeros (below lo) are coded apart
    upper = lower_index * step
    upper += lo
    lower = upper.copy()
    upper += step
    lower[(w32 < 0) & (lower_index == 0)] = 0.0
    return lower_index, lower, upper


def element_variance(w: np.ndarray, bits: int) -> np.ndarray:
    """Exact per-element Var(w_hat) = E(w_hat - w)^2 of the quantizer (0 at 32 bits: raw floats).

    An element rounded between neighbours a <= |w| <= b has variance (b - |w|)(|w| - a).
    """
    w32 = np.asarray(w, dtype=np.float32).ravel()
    lo, hi = quantization_grid(w32)
    if check_bits(bits) == 32 or hi == 0:
        return np.zeros(w32.size)
    _, lower, upper = _brackets(w32, bits, lo, hi)
    mag = np.abs(w32).astype(np.float64)
    return np.where(w32 == 0, 0.0, np.maximum((upper - mag) * (mag - lower), 0.0))


def expected_squared_error(arrays: Sequence[np.ndarray], bits: int) -> float:
    """Exact E||w - w_hat||^2 over all tensors (at 32 bits: the float32 rounding of the input)."""
    if check_bits(bits) == 32:
        return float(sum(np.sum((np.asarray(a, np.float64) - np.asarray(a, np.float32)) ** 2) for a in arrays))
    return float(sum(element_variance(a, bits).sum() for a in arrays))


def relative_error(arrays: Sequence[np.ndarray], bits: int) -> float:
    """Exact expected relative error E||w - w_hat||^2 / ||w||^2 of `encode(arrays, bits)`
    (from `expected_squared_error`); 0 for an all-zero update."""
    norm = _squared_norm(arrays)
    return expected_squared_error(arrays, bits) / norm if norm > 0 else 0.0


CONSTANT_BITS_FOR_RAW = 8  # a 32-bit upload has no grid: its constant is measured at this width


def codec_constant(arrays: Sequence[np.ndarray], bits: int) -> float:
    """K = relative_error * (L - 1)**2 at `bits`, exact: the constant of the planner's model
    (relative error ~= K / (L - 1)**2), which a device reports after uploading at `bits` so
    that the server plans its next round with it. At 32 bits (no grid) it is measured at
    8 bits. 0 for an all-zero update (no statistics: the server keeps its prior)."""
    bits = check_bits(bits)
    if bits == 32:
        bits = CONSTANT_BITS_FOR_RAW
    return relative_error(arrays, bits) * (num_levels(bits) - 1) ** 2


def bits_for_demand(arrays: Sequence[np.ndarray], demand: float, at_least: int = MIN_BITS) -> int:
    """The fewest bits from `at_least` to 31 whose exact expected relative error meets
    `demand` (E||w - w_hat||^2 <= demand ||w||^2), or 32 (raw floats) when none does.

    What a device runs before encoding: the plan gives `at_least` (the server's bits), and a
    device whose update is harder to quantize than the planner's model raises its width; it
    never goes below the plan, whose upload time and energy it was given. The widths are
    scanned upward (the exact error is not monotone in the width in contrived cases, e.g.
    values that sit on a coarse grid, so no bisection). The magnitudes are taken once and a
    width costs a few vector passes, 12-25 ms per million parameters on a 2-core CPU: for a
    million parameters a typical call (the plan's width, or a few more) takes
    0.1-0.3 s, a scan of every width 0.4-1 s (the latter on a busy host).
    """
    demand = float(demand)
    if not (demand > 0 and np.isfinite(demand)):
        raise ValueError(f"demand must be a positive relative error, got {demand!r}")
    at_least = check_bits(at_least)
    if at_least == 32:
        return 32
    profile = _ErrorProfile(arrays)
    for bits in range(at_least, 32):
        if profile.squared_error(bits) <= demand * profile.norm:
            return bits
    return 32


def _squared_norm(arrays: Sequence[np.ndarray]) -> float:
    total = 0.0
    for a in arrays:
        flat = np.asarray(a, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return total


class _ErrorProfile:
    """Per-tensor statistics, computed once, that give `expected_squared_error` at any
    quantized width in a few vector passes: the non-zero magnitudes (float64, as the encoder
    sees them), the negative ones apart, and the grid (lo, hi).

    With x = (|w| - lo)/s, i = min(floor x, L - 2) and f = x - i, an element rounds between
    a = lo + i s and a + s with variance (a + s - |w|)(|w| - a) = s^2 f (1 - f); a negative
    one in the bottom interval (|w| < lo + s) rounds between 0 and lo + s instead, which
    adds lo (lo + s - |w|).
    """

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.norm = _squared_norm(arrays)
        self.tensors = []
        for a in arrays:
            w32 = np.asarray(a, dtype=np.float32).ravel()
            nonzero = w32[w32 != 0]
            if nonzero.size == 0:
                continue
            mag = np.abs(nonzero).astype(np.float64)
            lo, hi = float(mag.min()), float(mag.max())  # = quantization_grid(w32), read off mag once
            lo = 0.0 if lo == hi else lo
            self.tensors.append((mag, mag[nonzero < 0] if lo > 0 else None, lo, hi))

    def squared_error(self, bits: int) -> float:
        levels = num_levels(bits)
        total = 0.0
        for mag, negative, lo, hi in self.tensors:
            step = (hi - lo) / (levels - 1)
            x = mag - lo
            x /= step
            index = np.floor(x)
            np.minimum(index, levels - 2, out=index)
            x -= index  # f in [0, 1]
            total += step * step * (float(x.sum()) - float(np.dot(x, x)))
            if negative is not None:
                bottom = negative[negative < lo + step]
                total += lo * (bottom.size * (lo + step) - float(bottom.sum()))
        return total


def error_bound(arrays: Sequence[np.ndarray], bits: int) -> float:
    """The documented upper bound n s^2/4 + n_low lo (lo + 2s)/4, summed over tensors."""
    bits = check_bits(bits)
    if bits == 32:
        return expected_squared_error(arrays, bits)
    total = 0.0
    for a in arrays:
        w = np.asarray(a, dtype=np.float32).ravel()
        lo, hi = quantization_grid(w)
        step = (hi - lo) / (num_levels(bits) - 1)
        n_low = int(np.count_nonzero((w < 0) & (np.abs(w) <= lo + step)))
        total += w.size * step ** 2 / 4 + n_low * lo * (lo + 2 * step) / 4
    return total


# ---------------------------------------------------------------- quantize / dequantize

def quantize(w: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Codes (uint32, sign bit on top of the level index) and the grid (lo, hi) of one tensor."""
    levels = num_levels(bits)
    w32 = np.asarray(w, dtype=np.float32).ravel()
    lo, hi = quantization_grid(w32)
    if hi == 0:  # all zeros: every element is the reserved zero code
        return np.full(w32.size, levels, dtype=np.uint32), 0.0, 0.0
    lower_index, lower, upper = _brackets(w32, bits, lo, hi)
    # Round up with probability (|w| - lower) / (upper - lower): E[w_hat] = w ([ODQ eq. 1]). A
    # negative value in the bottom interval that rounds down gets index 0 with the sign bit
    # set, which is the zero code, i.e. exactly its lower bracket 0.
    threshold = rng.random(w32.size)
    threshold *= upper - lower
    threshold += lower
    index = lower_index.astype(np.uint32)
    index += threshold < np.abs(w32)
    zero = w32 == 0
    index[zero] = 0
    return index | ((w32 < 0) | zero).astype(np.uint32) << np.uint32(bits - 1), lo, hi


def dequantize(codes: np.ndarray, bits: int, lo: float, hi: float) -> np.ndarray:
    levels = num_levels(bits)
    index = codes & np.uint32(levels - 1)
    negative = (codes >> np.uint32(bits - 1)).astype(bool)
    step = (hi - lo) / (levels - 1)
    mag = lo + index.astype(np.float64) * step
    values = np.where(negative, -mag, mag)
    values[negative & (index == 0)] = 0.0
    return values.astype(np.float32)


# ---------------------------------------------------------------- bit packing

def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack each uint32 code into `bits` bits, MSB first, zero-padded to a whole byte."""
    codes = np.ascontiguousarray(codes, dtype=np.uint32)
    n = codes.size
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    if bits == 16:
        return codes.astype(">u2").tobytes()
    if bits == 32:
        return codes.astype(">u4").tobytes()
    if bits < 8:
        # 8 codes of b bits fill exactly b bytes: build one uint64 per group of 8.
        groups = np.zeros(-(-n // 8) * 8, dtype=np.uint64)
        groups[:n] = codes
        groups = groups.reshape(-1, 8)
        shifts = (np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(bits))
        words = np.bitwise_or.reduce(groups << shifts, axis=1)
        out = words.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - bits:]
        return out.tobytes()[:packed_bytes(n, bits)]
    # Any other width: expand to a bit matrix, keep the low `bits` columns, repack.
    bit_matrix = np.unpackbits(codes.astype(">u4").view(np.uint8).reshape(n, 4), axis=1)
    return np.packbits(bit_matrix[:, 32 - bits:].ravel()).tobytes()


def unpack_codes(data: bytes | memoryview | np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: n uint32 codes from ceil(n * bits / 8) bytes."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.astype(np.uint32)
    if bits == 16:
        return raw.view(">u2").astype(np.uint32)
    if bits == 32:
        return raw.view(">u4").astype(np.uint32)
    if bits < 8:
        groups = -(-n // 8)
        padded = np.zeros(groups * bits, dtype=np.uint8)
        padded[:raw.size] = raw
        words = np.zeros((groups, 8), dtype=np.uint8)
        words[:, 8 - bits:] = padded.reshape(groups, bits)
        words = words.view(">u8").ravel().astype(np.uint64)
        shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(bits)
        codes = (words[:, None] >> shifts) & np.uint64((1 << bits) - 1)
        return codes.ravel()[:n].astype(np.uint32)
    bit_matrix = np.zeros((n, 32), dtype=np.uint8)
    bit_matrix[:, 32 - bits:] = np.unpackbits(raw, count=n * bits).reshape(n, bits)
    return np.packbits(bit_matrix, axis=1).view(">u4").ravel().astype(np.uint32)


# ---------------------------------------------------------------- payload

def encode(arrays: Sequence[np.ndarray], bits: int, rng: np.random.Generator) -> bytes:
    """Quantize and pack a list of float tensors (a model's weights or update) at `bits`."""
    bits = check_bits(bits)
    chunks: list[bytes] = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {i}: dtype {a.dtype} is not a float16/32/64 tensor")
        if a.ndim > MAX_NDIM:
            raise ValueError(f"tensor {i}: {a.ndim} dimensions, the codec carries at most {MAX_NDIM}")
        if any(d >= 2**32 for d in a.shape):
            raise ValueError(f"tensor {i}: dimension too large for the header: {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"tensor {i}: contains NaN or infinity")
        if bits == 32:
            lo = hi = 0.0
            body = a.astype(np.float32).ravel().view(np.uint32)
        else:
            body, lo, hi = quantize(a, bits, rng)
        shape = tuple(a.shape) + (0,) * (MAX_NDIM - a.ndim)
        chunks.append(_TENSOR_HEADER.pack(_DTYPE_CODES[a.dtype], bits, a.ndim, *shape, lo, hi))
        chunks.append(pack_codes(body, bits))
    body_bytes = b"".join(chunks)
    return _PAYLOAD_HEADER.pack(MAGIC, VERSION, len(arrays), zlib.crc32(body_bytes)) + body_bytes


def decode(payload: bytes, expected_shapes: Sequence[tuple[int, ...]] | None = None) -> list[np.ndarray]:
    """Unpack a payload; a truncated, corrupted or wrong-shape one raises ValueError saying why.

    `expected_shapes` (the model's) lets the server reject an update for another model. Every
    count and size a header claims is checked against the bytes actually there before any
    array is made: a hostile header costs no memory.
    """
    try:
        view = memoryview(payload).cast("B")
    except TypeError:
        raise ValueError(f"a codec payload is bytes, got {type(payload).__name__}") from None
    if len(view) < PAYLOAD_HEADER_BYTES:
        raise ValueError(f"payload of {len(view)} bytes is shorter than its {PAYLOAD_HEADER_BYTES}-byte header")
    magic, version, count, crc = _PAYLOAD_HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"not a codec payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"payload version {version}, this codec reads version {VERSION}")
    if zlib.crc32(view[PAYLOAD_HEADER_BYTES:]) != crc:
        raise ValueError("payload checksum mismatch: truncated or corrupted in transit")
    if expected_shapes is not None and count != len(expected_shapes):
        raise ValueError(f"payload has {count} tensors, the model has {len(expected_shapes)}")
    if count * TENSOR_HEADER_BYTES > len(view) - PAYLOAD_HEADER_BYTES:
        raise ValueError(f"payload claims {count} tensors, its {len(view)} bytes cannot hold their headers")
    out: list[np.ndarray] = []
    offset = PAYLOAD_HEADER_BYTES
    for i in range(count):
        if offset + TENSOR_HEADER_BYTES > len(view):
            raise ValueError(f"payload truncated in the header of tensor {i}")
        dtype_code, bits, ndim, *rest = _TENSOR_HEADER.unpack_from(view, offset)
        dims, lo, hi = rest[:MAX_NDIM], rest[MAX_NDIM], rest[MAX_NDIM + 1]
        offset += TENSOR_HEADER_BYTES
        if dtype_code not in _DTYPES:
            raise ValueError(f"tensor {i}: unknown dtype code {dtype_code}")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"tensor {i}: bit width {bits} outside {MIN_BITS}..{MAX_BITS}")
        if ndim > MAX_NDIM or any(dims[ndim:]):
            raise ValueError(f"tensor {i}: malformed shape field (ndim {ndim}, dims {dims})")
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
            raise ValueError(f"tensor {i}: invalid level range [{lo}, {hi}]")
        shape = tuple(int(d) for d in dims[:ndim])
        if expected_shapes is not None and shape != tuple(expected_shapes[i]):
            raise ValueError(f"tensor {i}: shape {shape}, the model expects {tuple(expected_shapes[i])}")
        n = math.prod(shape)  # Python ints: a product of six uint32 never wraps around
        size = (n * bits + 7) // 8
        if offset + size > len(view):
            raise ValueError(f"tensor {i}: shape {shape} at {bits} bits needs {size} bytes of data, "
                             f"only {len(view) - offset} left")
        if math.prod(d for d in shape if d) * 8 > np.iinfo(np.intp).max:  # numpy refuses such a shape, even empty
            raise ValueError(f"tensor {i}: shape {shape} is larger than any array can be")
        codes = unpack_codes(view[offset:offset + size], n, bits)
        offset += size
        if bits == 32:
            values = codes.view(np.float32)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"tensor {i}: contains NaN or infinity")
        else:
            values = dequantize(codes, bits, lo, hi)
        dtype = _DTYPES[dtype_code]
        with np.errstate(over="ignore"):  # float16 holds less than float32: checked just below
            values = values.reshape(shape).astype(dtype, copy=False)
        if dtype.itemsize < 4 and not np.all(np.isfinite(values)):
            raise ValueError(f"tensor {i}: values beyond the range of {dtype}")
        out.append(values)
    if offset != len(view):
        raise ValueError(f"{len(view) - offset} unexpected bytes after the last tensor")
    return out
