"""Checks of a resolved config that need no devices: run before anything is written.

`validate(config)` raises ValueError naming the offending key for settings the trainer cannot
honour (a frequency of 0, a negative step count, a float outside float32's range).
`diagnose_overrides(argv)` explains a `--config.key=value` that names no key of the config,
with the nearest valid key.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38

# key → the smallest value it may take (dotted paths; missing keys are skipped).
_MINIMUMS = {
    "total_steps": 1, "batch_size": 1, "eval_batch_size": 1, "grad_accum_steps": 1,
    "log_every": 1, "eval_every": 0, "checkpoint.every": 1, "checkpoint.keep": 1,
    "checkpoint.keep_best": 0, "optim.total_steps": 1, "optim.warmup_steps": 0,
    "data.interleave": 1, "data.shuffle_buffer": 0, "data.shuffle_buffer_bytes": 0,
    "data.num_workers": 0, "data.worker_processes": 0,
}


def _choices() -> dict[str, tuple[str, ...]]:
    """key → the values it may take."""
    from crate_jax.data.synthetic import BACKGROUNDS
    return {"data.background": BACKGROUNDS}


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def _floats(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if hasattr(node, "items"):
        for key, value in node.items():
            yield from _floats(value, f"{prefix}{key}.")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _floats(value, f"{prefix}{i}.")
    elif isinstance(node, float):
        yield prefix[:-1], node


def validate(config: Any) -> None:
    """Raise ValueError naming the first setting the trainer cannot honour."""
    for key, minimum in _MINIMUMS.items():
        value = _get(config, key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a whole number ≥ 1" if minimum == 1 else f"a whole number ≥ {minimum}"
            raise ValueError(f"config {key}={value!r}: must be {what}")
    for key, value in _floats(config):
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise ValueError(f"config {key}={value!r}: not a finite float32 number "
                             f"(|x| ≤ {FLOAT32_MAX:.3e}); training computes in float32")
    for key, choices in _choices().items():
        value = _get(config, key)
        if value is not None and value not in choices:
            raise ValueError(f"config {key}={value!r}: must be one of "
                             f"{', '.join(map(repr, choices))}")
    lr = _get(config, "optim.lr")
    if lr is not None and lr < 0:
        raise ValueError(f"config optim.lr={lr!r}: must be ≥ 0")


def all_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) ConfigDict."""
    keys = []
    if hasattr(node, "items"):
        for key, value in node.items():
            keys.append(prefix + key)
            keys.extend(all_keys(value, f"{prefix}{key}."))
    return keys


def load_config(spec: str) -> Any:
    """get_config(arg) of 'path/to/file.py[:arg]' (what --config=... names)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_crate_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"--config: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_key_message(config: Any, key: str) -> str | None:
    """None when `key` (dotted) names a key of `config`, else one line with the nearest key."""
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            where = ".".join(parts[:depth])
            siblings = list(node.keys()) if hasattr(node, "keys") else []
            near = difflib.get_close_matches(part, siblings, n=1, cutoff=0.5)
            if not near:
                near = difflib.get_close_matches(key, all_keys(config), n=1, cutoff=0.5)
                hint = f"; did you mean --config.{near[0]}?" if near else ""
            else:
                hint = f"; did you mean --config.{'.'.join([*parts[:depth], near[0]])}?"
            scope = f"config.{where}" if where else "the config"
            return f"unknown config key {key!r}: {scope} has no field {part!r}{hint}"
        node = node[part]
    return None


def diagnose_overrides(argv: Sequence[str]) -> str | None:
    """The first --config.KEY=... of argv that names no key of the config, explained."""
    spec = next((a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)), None)
    if spec is None:
        return None
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        return f"--config={spec}: no config file {path!r}"
    try:
        config = load_config(spec)
    except Exception as e:  # the config file itself is broken: say so, in one line
        return f"--config={spec}: {type(e).__name__}: {' '.join(str(e).split())}"
    for arg in argv:
        match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if match:
            message = unknown_key_message(config, match.group(1))
            if message:
                return message
    return None
