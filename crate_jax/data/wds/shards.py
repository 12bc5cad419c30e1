"""Shard lists: brace patterns, which shards a process reads and in what order, opening and
writing shards.

Assignment and order. Shard ``i`` belongs to process ``i % process_count``. In epoch ``e`` a
process visits its shards in the order ``np.random.default_rng([seed, e, process_index])
.permutation`` (`shard_order`). Paths may be local or any etils.epath scheme (gs://...).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from typing import IO, Any

import numpy as np

_MAX_EXPANSION = 10_000_000
OpenFn = Callable[[str], IO[bytes]]
_RANGE_RE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")

def _split_top_level(text: str, seps: str, pattern: str) -> list[str]:
    """`text` split at characters in `seps` that are outside braces."""
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '}}'")
        elif depth == 0 and (ch in seps or (" " in seps and ch.isspace())):
            parts.append(text[start:j])
            start = j + 1
    if depth:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '{{'")
    parts.append(text[start:])
    return parts


def _range(match: re.Match[str], pattern: str) -> list[str]:
    a, b, step_text = match.groups()
    lo, hi = int(a), int(b)
    step = abs(int(step_text)) if step_text else 1
    if step == 0:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: step 0")
    values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    if len(values) > _MAX_EXPANSION:
        raise ValueError(f"shard pattern {pattern!r} expands to {len(values)} names")
    # Like bash: a leading zero on either end pads every number to the longer end's width.
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (a, b))
    width = max(len(a), len(b)) if padded else 0
    return [f"{v:0{width}d}" for v in values]


def _expand_braces(text: str, pattern: str) -> list[str]:
    start = text.find("{")
    if start < 0:
        if "}" in text:
            raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '}}'")
        return [text]
    if "}" in text[:start]:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '}}'")
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '{{'")
    body = text[start + 1 : end]
    alternatives = _split_top_level(body, ",", pattern)
    if len(alternatives) > 1:
        options = [o for alt in alternatives for o in _expand_braces(alt, pattern)]
    elif match := _RANGE_RE.fullmatch(body):
        options = _range(match, pattern)
    else:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: '{{{body}}}' is neither "
                         "a comma list '{a,b}' nor a range '{000..099}'")
    tails = _expand_braces(text[end + 1 :], pattern)
    if len(options) * len(tails) > _MAX_EXPANSION:
        raise ValueError(f"shard pattern {pattern!r} expands to too many names")
    return [text[:start] + o + t for o in options for t in tails]


def expand_pattern(pattern: str) -> list[str]:
    """Shard paths from a brace pattern such as '/data/datacomp/{00000..12799}.tar'.

    Supports ranges (zero padding kept, optional step '{0..10..2}'), comma lists '{a,b}', several
    and nested braces, and a comma or whitespace separated list of such patterns or plain paths.
    Remote paths (gs://...) are returned as strings, untouched. Raises ValueError naming the
    pattern for a malformed brace or when nothing is left.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"shard pattern must be a str, got {type(pattern).__name__}")
    paths = [p for part in _split_top_level(pattern, ", ", pattern) if part
             for p in _expand_braces(part, pattern) if p]
    if not paths:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    return paths



def shard_list(shards: str | os.PathLike[str] | list[str]) -> list[str]:
    """The shard paths of a pattern (see `expand_pattern`) or a list of paths."""
    if isinstance(shards, str | os.PathLike):
        found = expand_pattern(os.fspath(shards))
    else:
        found = [os.fspath(s) if isinstance(s, os.PathLike) else str(s) for s in shards]
    if not found:
        raise ValueError("WebDatasetReader: no shards given")
    return found

def local_shards(shards: list[str], process_index: int, process_count: int) -> list[str]:
    """The shards process `process_index` of `process_count` reads: every process_count-th."""
    return shards[process_index::process_count]


def shard_order(seed: int, epoch: int, process_index: int, num_local: int) -> list[int]:
    """The order (indices into its local shards) in which a process visits them in `epoch`."""
    return np.random.default_rng([seed, epoch, process_index]).permutation(num_local).tolist()


def default_open(path: str) -> IO[bytes]:
    from etils import epath  # slow import; on first use

    return epath.Path(path).open("rb")


def seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except Exception:
        return False


def write_shards(directory: str | os.PathLike[str], samples: Iterable[dict[str, Any]],
                 samples_per_shard: int, prefix: str = "") -> list[str]:
    """Write img2dataset-style shards `{prefix}{00000}.tar` and return their paths.

    Each sample dict has 'key', 'image' (bytes), 'caption' (str, or None for no '.txt'),
    optionally 'json' (dict) and 'ext' (image extension, default 'jpg'). Members are
    `{key}.{ext}`, `{key}.txt`, `{key}.json`, with fixed metadata so the bytes are reproducible.
    """
    from etils import epath

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    root = epath.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    handle: IO[bytes] | None = None

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        assert tar is not None
        tar.addfile(info, io.BytesIO(data))

    try:
        for i, sample in enumerate(samples):
            if i % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                    handle.close()  # type: ignore[union-attr]
                path = root / f"{prefix}{len(paths):05d}.tar"
                paths.append(os.fspath(path))
                handle = path.open("wb")
                tar = tarfile.open(fileobj=handle, mode="w")
            key = str(sample["key"])
            add(f"{key}.{sample.get('ext', 'jpg').lstrip('.')}", bytes(sample["image"]))
            if sample.get("caption") is not None:
                add(f"{key}.txt", sample["caption"].encode("utf-8"))
            if sample.get("json") is not None:
                add(f"{key}.json", json.dumps(sample["json"], sort_keys=True).encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()
        if handle is not None:
            handle.close()
    return paths
