"""Photo-like test images: smooth gradients plus low-frequency blobs (JPEG-friendly)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients and blobs of colour, like a photo at this scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * x / width
                     + rng.uniform(-60, 60) * y / height for _ in range(3)], -1)
    coarse = rng.normal(0, 40, (6, 8, 3)).astype(np.float32)
    blobs = np.stack([np.asarray(Image.fromarray(coarse[..., c], "F")
                                 .resize((width, height), Image.BICUBIC)) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + blobs, 0, 255).astype(np.uint8))
