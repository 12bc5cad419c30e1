"""The files the DINO-style ViT import reads (convert/dino_vit.py): SimDINO's and SimDINOv2's
training checkpoints (RobinWu218/SimDINO), reduced to the bare backbone state dict of one branch.

Files read (`import_dino_vit_torch`), the backbone of the `branch` ('teacher' by default):

    simdino/main_dino.py checkpoint.pth   {'student', 'teacher', 'optimizer', 'epoch', 'args',
        'dino_loss', 'fp16_scaler'}; keys '_orig_mod.module.backbone.*' (student: torch.compile
        around DDP), '_orig_mod.backbone.*' (teacher), without '_orig_mod.' when not compiled;
        the projection head under 'head.mlp.*'
    simdinov2 eval/<iter>/teacher_checkpoint.pth   {'teacher': ...}; keys 'backbone.*',
        'dino_head.*' (and 'ibot_head.*'); FSDP block chunks as 'blocks.{chunk}.{i}.*'
    a bare backbone state_dict (what `to_dino_vit_torch` writes and DINO's eval scripts load)

'_orig_mod' and 'module' are dropped wherever they occur and 'backbone.' is stripped, as the
official loaders do; each prefix and each head key skipped is named in the notes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from crate_jax.convert.files import TORCH_SUFFIXES, load_weights, require_torch, to_numpy
from crate_jax.convert.primitives import ConversionError

__all__ = ["BRANCHES", "LAYOUT", "backbone_keys", "load_checkpoint", "select_branch"]

LAYOUT = "dino-vit-torch"
BRANCHES = ("teacher", "student")
WRAPPERS = ("_orig_mod", "module")  # torch.compile and DDP
HEADS = ("head", "dino_head", "ibot_head")  # DINO's and DINOv2's projection heads
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")


def load_checkpoint(path: str | os.PathLike) -> tuple[Mapping[str, Any], dict[str, str]]:
    """(a checkpoint file's top-level mapping, its metadata). DINO's training checkpoints keep
    its argparse Namespace under 'args', which torch's weights-only loader refuses by default:
    that one class is allowed, nothing else is unpickled."""
    if os.path.splitext(str(path))[1].lower() not in TORCH_SUFFIXES:
        return load_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weight file")
    torch = require_torch(f"reading {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError variants
        raise ConversionError(f"{path}: torch's weights-only loader refused it ({err}); "
                              "save the state_dict alone with torch.save") from err
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path}: expected a mapping, got {type(loaded).__name__}")
    return loaded, {}


def select_branch(source: Mapping[str, Any], branch: str | None,
            notes: list[str]) -> Mapping[str, Any]:
    """The state dict of `branch` in a {'student': ..., 'teacher': ...} checkpoint, or the
    source itself (a bare state dict, where no branch may be asked for)."""
    if branch is not None and branch not in BRANCHES:
        raise ConversionError(f"branch={branch!r}: must be one of {list(BRANCHES)}")
    found = [b for b in BRANCHES if isinstance(source.get(b), Mapping)]
    if not found:
        if branch is not None:
            raise ConversionError(f"branch={branch!r}: the checkpoint has no 'student' / "
                                  f"'teacher' dicts (top-level keys: {sorted(source)[:8]})")
        return source
    branch = branch or "teacher"
    if branch not in found:
        raise ConversionError(f"branch={branch!r}: the checkpoint holds only {found}")
    others = sorted(str(k) for k in source if k != branch)
    notes.append(f"took the {branch!r} dict; left aside: {others}")
    return source[branch]


def backbone_keys(state: Mapping[str, Any], notes: list[str]) -> dict[str, np.ndarray]:
    """{timm backbone name: array}: the wrapper components dropped and 'backbone.' stripped
    (each prefix named in `notes` with its count), the head keys skipped (each named), FSDP
    block chunks undone."""
    keys = {str(k): [p for p in str(k).split(".") if p not in WRAPPERS] for k in state}
    wrapped = any(parts[:1] == ["backbone"] for parts in keys.values())
    flat: dict[str, np.ndarray] = {}
    heads, prefixes, chunked = [], collections.Counter(), 0
    for key, value in state.items():
        parts = keys[str(key)]
        if wrapped and parts[:1] and parts[0] in HEADS:
            heads.append(str(key))
            continue
        name = ".".join(parts[1:] if wrapped and parts[:1] == ["backbone"] else parts)
        if name != str(key):
            prefixes[str(key)[:-len(name)] if str(key).endswith(name) else
                     "(wrapper components inside the key)"] += 1
        if chunk := _CHUNKED.match(name):
            name, chunked = f"blocks.{chunk[1]}.{chunk[2]}", chunked + 1
        if name in flat:
            raise ConversionError(f"{LAYOUT}: two keys name the backbone's {name} once their "
                                  f"wrapper prefixes are dropped (one is {key!r})")
        flat[name] = to_numpy(value)
    for prefix, count in sorted(prefixes.items()):
        notes.append(f"stripped the prefix {prefix!r} from {count} key(s) (torch.compile's "
                     "'_orig_mod.', DDP's 'module.', DINO's MultiCropWrapper 'backbone.')")
    if chunked:
        notes.append(f"undid the FSDP block chunks of {chunked} key(s) "
                     "(blocks.{chunk}.{i}. → blocks.{i}.)")
    if heads:
        notes.append(f"skipped {len(heads)} projection-head key(s) (the SimDINO head, not "
                     f"part of the backbone): {', '.join(sorted(heads))}")
    return flat
