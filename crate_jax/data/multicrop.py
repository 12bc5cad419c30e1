"""DINO's multi-crop views of one image, drawn from the example's own RNG.

    global views: `global_crops` random resized crops of area `global_scale` × the image,
                  resized to `global_size` (the backbone's image_size)
    local views:  `local_crops` crops of area `local_scale`, resized to `local_size`
    each view:    horizontal flip (p = ½), colour jitter (p = `jitter_prob`: brightness and
                  contrast `color_jitter`, saturation half of it, hue shift up to `hue` turns,
                  DINO's 0.4 / 0.2 / 0.1), grey scale (p = `grayscale_prob`)

The transform is a grain random_map transform: every draw comes from the RNG grain derives from
the example's position, so a resumed run sees exactly the views an uninterrupted one would.
DINO's Gaussian blur and solarisation are left out: at the demo's 32 px they destroy the
image; add them for ImageNet-scale runs if wanted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from crate_jax.data import augment
from crate_jax.data.images import inception_crop, to_pil


def _check(data: Any) -> dict:
    settings = dict(global_crops=data.get("global_crops", 2),
                    local_crops=data.get("local_crops", 6),
                    global_size=data.image_size, local_size=data.get("local_size", 96),
                    global_scale=tuple(data.get("global_scale", (0.4, 1.0))),
                    local_scale=tuple(data.get("local_scale", (0.05, 0.4))),
                    color_jitter=data.get("color_jitter", 0.4), hue=data.get("hue", 0.1),
                    jitter_prob=data.get("jitter_prob", 0.8),
                    grayscale_prob=data.get("grayscale_prob", 0.2))
    if settings["global_crops"] < 2:
        raise ValueError(f"data.global_crops={settings['global_crops']}: self-distillation "
                         "needs at least 2 global views")
    if settings["local_crops"] < 0:
        raise ValueError(f"data.local_crops={settings['local_crops']}: must be ≥ 0")
    for key in ("global_scale", "local_scale"):
        lo, hi = settings[key]
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.{key}={settings[key]}: need 0 < low ≤ high ≤ 1")
    if not 0 <= settings["hue"] <= 0.5:
        raise ValueError(f"data.hue={settings['hue']}: a hue shift in [0, 0.5] turns")
    for key in ("jitter_prob", "grayscale_prob"):
        if not 0 <= settings[key] <= 1:
            raise ValueError(f"data.{key}={settings[key]}: a probability in [0, 1]")
    return settings


def _view(image: Image.Image, rng: np.random.Generator, size: int, scale: tuple, s: dict
          ) -> np.ndarray:
    view = inception_crop(image, rng, size, area=scale)
    if rng.random() < s["jitter_prob"] and s["color_jitter"]:
        strength = s["color_jitter"]
        view = augment.color_jitter(view, rng, brightness=strength, contrast=strength,
                                    saturation=strength * 0.5, hue=s["hue"])
    if rng.random() < s["grayscale_prob"]:
        view = view.convert("L").convert("RGB")
    array = np.asarray(view, np.uint8)
    if rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def multicrop_transform(data: Any):
    """example, rng -> {'global': uint8 (G, S, S, 3), 'local': uint8 (L, s, s, 3)} (no
    'local' when local_crops = 0). Labels are dropped: self-supervision never reads them."""
    s = _check(data)

    def transform(example: dict, rng: np.random.Generator) -> dict:
        image = to_pil(example["image"])
        out = {"global": np.stack([_view(image, rng, s["global_size"], s["global_scale"], s)
                                   for _ in range(s["global_crops"])])}
        if s["local_crops"]:
            out["local"] = np.stack([_view(image, rng, s["local_size"], s["local_scale"], s)
                                     for _ in range(s["local_crops"])])
        return out

    return transform


def example_views(data: Any, batch_size: int) -> dict[str, np.ndarray]:
    """Zero views of the shapes multicrop_transform produces (ahead-of-time compilation)."""
    s = _check(data)
    out = {"global": np.zeros((batch_size, s["global_crops"], s["global_size"],
                               s["global_size"], 3), np.uint8)}
    if s["local_crops"]:
        out["local"] = np.zeros((batch_size, s["local_crops"], s["local_size"],
                                 s["local_size"], 3), np.uint8)
    return out
