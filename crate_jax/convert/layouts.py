"""One entry point per direction for every checkpoint layout (docs/design.md §3): which module
reads or writes a layout is decided here, at the top of convert/, so that the layout modules
(importers, export, clipa, crate_mae, dino_vit, tost) never import each other to dispatch.

    import_weights(source, layout, **kwargs) -> Imported
    export_weights(params, layout, path, cfg, name=...) -> compatibility notes
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from crate_jax.convert import clipa, crate_mae, dino_vit, tost
from crate_jax.convert.export import export_crate
from crate_jax.convert.files import load_weights
from crate_jax.convert.importers import FORMATS, IMPORTERS, ConversionError, Imported
from crate_jax.models.autoencoder import MAEConfig

__all__ = ["export_weights", "import_weights"]


def import_weights(source: Any, layout: str, **kwargs: Any) -> Imported:
    """Import `source` (a path to a .pth/.pt/.bin/.ckpt, .npz or .safetensors file, or a mapping
    already in memory) as `layout` (one of FORMATS); kwargs go to the layout's importer."""
    if layout not in FORMATS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; layouts are {list(FORMATS)}")
    if layout == dino_vit.LAYOUT:  # it reads the file itself (the teacher / student choice)
        return dino_vit.import_dino_vit_torch(source, **kwargs)
    if layout in tost.LAYOUTS:  # the BatchNorm statistics travel with the weights
        return tost.import_tost(source, layout, **kwargs)
    if not isinstance(source, Mapping):
        source, metadata = load_weights(source)
        if metadata and kwargs.get("metadata") is None:
            kwargs["metadata"] = metadata
    if layout == clipa.LAYOUT:
        return clipa.import_crate_alpha_clipa_torch(source, **kwargs)
    if layout == crate_mae.LAYOUT:
        return crate_mae.import_crate_mae_torch(source, **kwargs)
    return IMPORTERS[layout](source, **kwargs)


def export_weights(params: Mapping[Any, Any], layout: str, path: str | os.PathLike,
                   cfg: Any = None, *, name: str | None = None) -> list[str]:
    """Write `params` in `layout` to `path` (.safetensors or .npz without torch; .pth/.pt/.bin
    with torch). A .safetensors file records the layout, the heads and the model `name` /
    config in its metadata (the import reads the heads back from it). Returns the
    compatibility notes. A run of another kind than the layout holds is refused by name."""
    autoencoder = isinstance(cfg, MAEConfig)
    if autoencoder != (layout == crate_mae.LAYOUT):
        what = ("a masked autoencoder run" if autoencoder else
                "a run without config.json" if cfg is None else f"a {type(cfg).__name__} run")
        raise ConversionError(f"{what} cannot be exported as {layout}" + (
            f"; use {crate_mae.LAYOUT}" if autoencoder else
            " (it takes a masked autoencoder run: config.json with trainer 'mae')"))
    if layout == crate_mae.LAYOUT:
        return crate_mae.export_crate_mae_torch(params, path, cfg, name=name)
    if layout == dino_vit.LAYOUT:
        return dino_vit.export_dino_vit_torch(params, path, cfg, name=name)
    two_tower = isinstance(cfg, clipa.ClipConfig)
    if two_tower != (layout == clipa.LAYOUT):
        raise ConversionError(f"a {'two-tower' if two_tower else 'single-tower'} run cannot be "
                              f"exported as {layout}" + (
                                  f"; use {clipa.LAYOUT}" if two_tower else ""))
    if two_tower:
        return clipa.export_crate_alpha_clipa_torch(params, path, cfg)
    return export_crate(params, layout, path, cfg, name=name)
