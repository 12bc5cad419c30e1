"""Reading and writing weight files: .npz and .safetensors with NumPy alone, .pth with PyTorch.

PyTorch is an optional dependency (`pip install -r requirements-torch.txt`); it is imported only
when a .pth file is read or written, and its absence is reported by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from crate_jax.convert import safetensors_format

__all__ = ["TORCH_SUFFIXES", "load_weights", "require_torch", "save_weights", "to_numpy"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = (".npz", ".safetensors", *TORCH_SUFFIXES)


def require_torch(purpose: str) -> Any:
    """The `torch` module, or ModuleNotFoundError saying how to install it."""
    try:
        import torch
    except ImportError as err:
        raise ModuleNotFoundError(
            f"{purpose} needs PyTorch, an optional dependency of crate_jax: install it with "
            "`pip install -r requirements-torch.txt` (torch==2.13.0). The .npz and "
            ".safetensors formats work without it.") from err
    return torch


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy array from a NumPy/JAX array, a torch tensor (bfloat16 included) or a number."""
    if _is_torch_tensor(value):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return tensor.numpy().copy()
    return np.asarray(value)


def _to_torch(array: np.ndarray, torch: Any) -> Any:
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown weight file type {suffix!r}; expected one of "
                         f"{list(SUFFIXES)}")
    return suffix


def load_weights(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(the file's top-level mapping, metadata). .npz: {key: array}; .safetensors: {name: array}
    plus its string metadata; .pth/.pt/.bin/.ckpt: whatever `torch.load(weights_only=True)`
    returns (a state_dict, possibly wrapped as {'state_dict': ...}), tensors left as they are."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    suffix = _suffix(path)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}, {}
    if suffix == ".safetensors":
        return safetensors_format.load_file(path)
    torch = require_torch(f"reading {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), got "
                         f"{type(loaded).__name__}")
    return dict(loaded), {}


def save_weights(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write name → array to `path`: .safetensors (with `metadata`) or .npz without torch,
    .pth/.pt/.bin as a torch state_dict (an ordered dict of tensors) with torch."""
    suffix = _suffix(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        safetensors_format.save_file(tensors, path, metadata)
    elif suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in tensors.items()})
    else:
        torch = require_torch(f"writing {path}")
        from collections import OrderedDict

        torch.save(OrderedDict((k, _to_torch(np.asarray(v), torch)) for k, v in tensors.items()),
                   path)
