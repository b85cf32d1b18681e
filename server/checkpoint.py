"""The run's checkpoint.npz: the global model after a round, and that round's number.

The ServerApp writes it every round and reads it back on `--resume`. Reading trusts nothing
in the file: a checkpoint from another model, a truncated or corrupted one, one whose .npy
headers claim huge arrays or whose members inflate far beyond the model (a zip bomb) is
refused with a CheckpointError saying why, before anything larger than the model is read.
numpy's own `np.load` of an .npz member allocates the whole array its header claims before
reading a byte of it, so every header is checked against the model first.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROUND_KEY = "round"
_HEADER_ROOM = 4096  # an .npy header is at most a few hundred bytes; more is not a checkpoint of ours


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, with the reason."""


def write_checkpoint(path: str | Path, server_round: int, arrays: Sequence[np.ndarray]) -> None:
    """Members arr_0 .. arr_{n-1} (the model's arrays, in order) and `round`."""
    np.savez(path, *arrays, **{ROUND_KEY: server_round})


def read_checkpoint(path: str | Path, like: Sequence[np.ndarray]) -> tuple[int, list[np.ndarray]]:
    """(round, arrays) saved by `write_checkpoint` for a model whose arrays have the shapes and
    dtypes of `like`, or CheckpointError naming what is wrong."""
    path = Path(path)
    expected = {f"arr_{i}.npy": (tuple(a.shape), np.asarray(a).dtype) for i, a in enumerate(like)}
    expected[f"{ROUND_KEY}.npy"] = None
    # np.savez stores its members: the file is the arrays, their .npy headers and the zip's own
    # headers. Read whole into memory, so that a zip directory claiming gigabytes makes reads
    # come back short (a file object's read(n) allocates n bytes first).
    largest = sum(np.asarray(a).nbytes for a in like) + len(expected) * 2 * _HEADER_ROOM
    try:
        size = path.stat().st_size
        if size > largest:
            raise CheckpointError(f"{path} is {size} bytes, a checkpoint of this model at most {largest}")
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if sorted(names) != sorted(expected):
                raise CheckpointError(f"{path} holds {_listed(names)}, a checkpoint of this model holds "
                                      f"round and arr_0..arr_{len(like) - 1}")
            arrays = [_member(archive, f"arr_{i}.npy", *expected[f"arr_{i}.npy"]) for i in range(len(like))]
            saved_round = _member(archive, f"{ROUND_KEY}.npy", (), None)
    except CheckpointError:
        raise
    # What a damaged zip raises, from zipfile and the decompressors it drives (an encrypted
    # member is a RuntimeError, an unknown compression method NotImplementedError).
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, NotImplementedError,
            RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint: {str(err)[:200]}") from None
    if saved_round.dtype.kind not in "iu" or int(saved_round) < 0:
        raise CheckpointError(f"{path}: the round must be a non-negative integer, got {saved_round!r}")
    return int(saved_round), arrays


def _member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype | None) -> np.ndarray:
    """One .npy member, its declared size and header checked before its data is read."""
    info = archive.getinfo(name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # what np.savez and np.savez_compressed write; an LZMA header may ask for a 4 GiB dictionary
        raise CheckpointError(f"{name} is compressed with zip method {info.compress_type}: np.savez stores or deflates")
    room = _HEADER_ROOM + (int(np.prod(shape)) * dtype.itemsize if dtype is not None else 8)
    if info.file_size > room:
        raise CheckpointError(f"{name} inflates to {info.file_size} bytes, a {shape} array takes at most {room}")
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version in readers:
            saved_shape, _, saved_dtype = readers[version](member, max_header_size=_HEADER_ROOM)
        else:
            raise CheckpointError(f"{name}: .npy format version {version}, not one np.savez writes")
    if saved_dtype.hasobject:
        raise CheckpointError(f"{name} holds Python objects: a checkpoint holds numbers only")
    if dtype is None and (saved_dtype.kind not in "iu" or saved_dtype.itemsize > 8):
        # checked before reading: one element of a dtype like "|V4294967295" is 4 GiB
        raise CheckpointError(f"{name}: the round must be a non-negative integer, got a {saved_dtype} array")
    if saved_shape != shape or (dtype is not None and saved_dtype != dtype):
        raise CheckpointError(f"{name} is a {saved_dtype} array of shape {saved_shape}, the model's is "
                              f"{dtype if dtype is not None else 'an integer'} of shape {shape}: "
                              f"a checkpoint of another model")
    with archive.open(name) as member:
        array = np.lib.format.read_array(member, allow_pickle=False)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise CheckpointError(f"{name} holds NaN or infinite values")
    return array


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return f"{len(names)} member(s): {shown}{', ...' if len(names) > 5 else ''}" if names else "no members"
