"""Procedurally generated shape datasets for tests, demos and smoke runs.

NumPy only, so samples are cheap to make inside grain worker processes. `shapes` holds the
drawing primitives (shape kinds, palette, masks, background, renderer), also used by the
multi-object scenes of crate_jax/data/synthetic_scenes.py; `datasets` the classification,
caption and segmentation sets. Sample ``i`` of a split is a pure function of
``(seed, split, i)``.
"""

from crate_jax.data.synthetic.datasets import (
    BACKGROUNDS,
    ShapesCaptions,
    ShapesClassification,
    ShapesSegmentation,
)
from crate_jax.data.synthetic.shapes import (
    COLORS,
    SHAPES,
    shape_mask,
    shape_radius,
    smooth_background,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SHAPES",
    "ShapesCaptions",
    "ShapesClassification",
    "ShapesSegmentation",
    "shape_mask",
    "shape_radius",
    "smooth_background",
]
