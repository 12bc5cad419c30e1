"""The safetensors file format, read and written with NumPy alone (no torch, no extra package).

A file is

    8 bytes     N, the header length, unsigned 64-bit little-endian
    N bytes     a UTF-8 JSON object {name: {"dtype": "F32", "shape": [..],
                "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}} (optional),
                padded with spaces
    the rest    the tensors' bytes, row-major, little-endian; [begin, end) is relative to the
                start of this buffer; the tensors tile it without holes or overlaps

`save_file` pads the header to a multiple of 8 bytes (as the reference writer does, so that the
data buffer is aligned) and lays the tensors out in name order. `load_file` checks everything the
format promises (offsets, sizes, dtypes, a buffer with no holes) and names what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["DTYPES", "SafetensorsError", "load_file", "save_file"]

# safetensors dtype codes → NumPy dtypes (little-endian).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference reader's limit


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a tensor that cannot be stored in one."""


def _code(name: str, array: np.ndarray) -> str:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _CODES.get(np.dtype(dtype))
    if code is None:
        raise SafetensorsError(f"tensor {name!r}: dtype {array.dtype} has no safetensors code "
                               f"(supported: {sorted(_CODES.values())})")
    return code


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (name → array) to `path` as safetensors, with optional string metadata."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise SafetensorsError(f"metadata keys and values must be strings: {bad}")
        header["__metadata__"] = dict(metadata)
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise SafetensorsError("'__metadata__' is reserved and cannot name a tensor")
        array = np.asarray(tensors[name])
        code = _code(name, array)
        data = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def _read_header(path: str | os.PathLike, size: int) -> tuple[dict, int]:
    """(the JSON header, its length N) of a file of `size` bytes; the header's shape is checked,
    not its entries."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {length} does not fit the file "
                                   f"({size} bytes); not a safetensors file")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: the header is not UTF-8 JSON ({err})") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    return header, length


def _entries(header: Mapping[str, Any], buffer_size: int
             ) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], list[str]]:
    """({name: (dtype, shape, begin, end)}, problems) of the header's tensor entries: each
    entry's dtype, shape and size, and that the tensors tile the `buffer_size`-byte data
    buffer without holes or overlaps."""
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    problems: list[str] = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{name}: bad entry {info!r} ({type(err).__name__}: {err})")
            continue
        if any(s < 0 for s in shape):
            problems.append(f"{name}: negative dimension in shape {shape}")
            continue
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            problems.append(f"{name}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                            f"but {info['dtype']} {list(shape)} needs {nbytes}")
            continue
        entries[name] = (dtype, shape, begin, end)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problems.append(f"{name}: data starts at {begin}, expected {position} (a hole or an "
                            "overlap in the data buffer)")
        position = max(position, end)
    if position != buffer_size:
        problems.append(f"the tensors cover {position} bytes of a {buffer_size}-byte data buffer")
    return entries, problems


def load_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; every tensor is a fresh NumPy array."""
    size = os.path.getsize(path)
    header, length = _read_header(path, size)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    start = 8 + length
    entries, problems = _entries(header, size - start)
    if problems:
        raise SafetensorsError(f"{path}: invalid safetensors file:\n  " + "\n  ".join(problems))
    tensors: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(start + begin)
            data = f.read(end - begin)
            tensors[name] = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    return tensors, dict(metadata)
