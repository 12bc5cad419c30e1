"""White-box analysis of trained CRATE / CRATE-α / ToST runs (`python -m crate_jax.analyze`; its
flags and outputs: crate_jax/analyze/__main__.py).

    from crate_jax import analyze
    run = analyze.load_workdir("runs/demo_classification")
    images = analyze.load_images("synthetic_shapes", run.model.cfg.image_size, 64)["image"]
    measured = analyze.run_model(run, images, batch=64, layer=-1, normalization="reference",
                                 eps=None, include_cls=True)

loading.py reads runs and images, measuring.py measures them (coding rate, sparsity,
attention, features, MaskCut), figures.py draws, command.py is what the command does.
"""

from __future__ import annotations

import importlib
from typing import Any

from crate_jax.analyze.command import analyze, analyze_language
from crate_jax.analyze.figures import (
    pca_rgb,
    plot_attention,
    plot_attention_rows,
    plot_layerwise,
    plot_pca,
    plot_segmentation,
)
from crate_jax.analyze.loading import (
    DATA_CHOICES,
    Run,
    build_model,
    load_checkpoint,
    load_images,
    load_workdir,
    normalization_constants,
    random_init,
)
from crate_jax.analyze.measuring import run_model, run_summary, segment

_COMMAND = ("cli", "main", "parse_args")  # the command line, in __main__.py
__all__ = [
    "DATA_CHOICES", "Run", "analyze", "analyze_language", "build_model", "cli", "load_checkpoint",
    "load_images", "load_workdir", "main", "normalization_constants", "parse_args", "pca_rgb",
    "plot_attention", "plot_attention_rows", "plot_layerwise", "plot_pca", "plot_segmentation",
    "random_init", "run_model", "run_summary", "segment",
]


def __getattr__(name: str) -> Any:
    """`cli`, `main` and `parse_args` (the console script crate-analyze = crate_jax.analyze:cli)
    come from __main__.py on first use, not at import: `python -m crate_jax.analyze` imports
    this package first and then runs __main__.py itself, and runpy warns (and the module would
    be loaded twice) if the package had imported it already."""
    if name in _COMMAND:
        return getattr(importlib.import_module("crate_jax.analyze.__main__"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
