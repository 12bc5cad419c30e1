"""Drawing primitives of the procedural shape datasets: the shape kinds and palette, unit-box
shape masks, placement of one shape in an image, the smooth textured background and the
renderer that paints shapes over it with per-pixel noise.

NumPy only (cheap inside grain worker processes); every random draw comes from the generator
passed in, so a caller that draws in a fixed order gets a fixed image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "bar",
    "star",
)

# Every colour has one channel >= 190 and (white aside) one <= 70, far from the mid-grey
# background range, so shapes stand out whatever the texture.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
}

_COLOR_VALUES = tuple(COLORS.values())
_COLOR_JITTER = 12


# --------------------------------------------------------------------------------------------
# Geometry


def shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape ``kind`` in unit coordinates (u right, v down); it lies in the box [-1, 1]^2.

    ``u`` and ``v`` broadcast against each other (a row and a column give an (H, W) mask).
    """
    name = SHAPES[kind]
    au, av = np.abs(u), np.abs(v)
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (au <= 1.0) & (av <= 1.0)
    if name == "triangle":
        return (v <= 1.0) & (au <= (v + 1.0) * 0.5)
    if name == "cross":
        return ((au <= 1.0) & (av <= 0.34)) | ((au <= 0.34) & (av <= 1.0))
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    if name == "diamond":
        return au + av <= 1.0
    if name == "bar":
        return (au <= 1.0) & (av <= 0.4)
    if name == "star":
        return _star(u, v)
    raise AssertionError(name)


_STAR_INNER = 0.5
_STAR_HALF = np.pi / 5  # half the angle between two tips


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Fold the plane into one half-sector (tip on the x axis), then test the straight edge
    # from the tip (1, 0) to the inner vertex.
    theta = np.arctan2(u, -v)  # 0 points up, to the top tip
    phi = np.abs(np.mod(theta + _STAR_HALF, 2 * _STAR_HALF) - _STAR_HALF)
    rho = np.sqrt(u * u + v * v)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    dx = _STAR_INNER * np.cos(_STAR_HALF) - 1.0
    dy = _STAR_INNER * np.sin(_STAR_HALF)
    # Inside is the origin's side of the edge (where the cross product is positive).
    return dx * py - dy * (px - 1.0) >= 0.0


def _fill_fractions(res: int = 256) -> np.ndarray:
    g = (np.arange(res) + 0.5) / res * 2.0 - 1.0
    return np.array([shape_mask(k, g[None, :], g[:, None]).mean() for k in range(len(SHAPES))])


# Fraction of its box each shape covers: sizes are drawn as areas, so no shape is a size cue.
_FILL = _fill_fractions()


@functools.cache
def _coords(size: int) -> np.ndarray:
    c = np.arange(size, dtype=np.float32) + 0.5
    c.setflags(write=False)
    return c


@functools.cache
def _upsampler(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation matrix (align-corners=False, edge clamped)."""
    pos = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0.0, grid - 1.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), grid - 2)
    frac = pos - lo
    a = np.zeros((size, grid), np.float32)
    rows = np.arange(size)
    a[rows, lo] = 1.0 - frac
    a[rows, lo + 1] += frac
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class PlacedShape:
    """One shape: kind and colour indices, centre and half-size in pixels, jittered RGB."""

    shape: int
    color: int
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r


def shape_radius(shape: int, area_frac: float, size: int) -> float:
    """Half-size in pixels of a `shape` covering `area_frac` of a size × size image."""
    r = size * np.sqrt(area_frac / (4.0 * _FILL[shape]))
    return float(min(r, size / 2.0))


def jitter_color(rng: np.random.Generator, color: int) -> tuple[int, int, int]:
    """Palette colour `color` with each channel moved by up to ±12, clipped to [0, 255]."""
    d = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3).tolist()
    r, g, b = (min(255, max(0, c + e)) for c, e in zip(_COLOR_VALUES[color], d, strict=True))
    return r, g, b


def uniform_centre(rng: np.random.Generator, r: float, size: int) -> float:
    """A centre coordinate, uniform over the positions that keep a half-size `r` box inside
    the image (the middle when the box fills it)."""
    return float(rng.uniform(r, size - r)) if r < size / 2 else size / 2.0


def place_shape(
    rng: np.random.Generator, shape: int, color: int, area_frac: float, size: int
) -> PlacedShape:
    """`shape` in colour `color` covering `area_frac` of the image, at a uniform position."""
    r = shape_radius(shape, area_frac, size)
    cx = uniform_centre(rng, r, size)
    cy = uniform_centre(rng, r, size)
    return PlacedShape(shape, color, cx, cy, r, jitter_color(rng, color))


def object_mask(obj: PlacedShape, size: int) -> np.ndarray:
    """bool (size, size) mask of the pixels whose centres `obj` covers."""
    c = _coords(size)
    return shape_mask(obj.shape, (c[None, :] - obj.cx) / obj.r, (c[:, None] - obj.cy) / obj.r)


def smooth_background(rng: np.random.Generator, size: int, textured: bool = True) -> np.ndarray:
    """Smooth low-contrast mid-grey texture, float32 (size, size, 3); with textured=False one
    flat mid-grey."""
    if not textured:
        base = rng.uniform(75.0, 125.0) + rng.uniform(-10.0, 10.0, 3)
        return np.broadcast_to(base.astype(np.float32), (size, size, 3)).copy()
    grid = 4 if rng.random() < 0.5 else 8
    up = _upsampler(size, grid)
    # Mostly luminance variation with a little chroma: channels stay close to each other, so
    # the background never resembles a saturated palette colour.
    coarse = rng.normal(0.0, 14.0, (1, grid, grid)) + rng.normal(0.0, 4.0, (3, grid, grid))
    base = rng.uniform(75.0, 125.0) + rng.uniform(-10.0, 10.0, 3)
    smooth = up @ coarse.astype(np.float32) @ up.T  # (3, size, size)
    img = np.empty((size, size, 3), np.float32)  # channels-last and C-contiguous
    np.add(smooth.transpose(1, 2, 0), base.astype(np.float32), out=img)
    # Plain ufuncs: np.clip's Python-level overhead is a sizeable part of a 32x32 sample.
    np.maximum(img, 30.0, out=img)
    return np.minimum(img, 180.0, out=img)


def render(
    objs: list[PlacedShape], masks: list[np.ndarray], rng: np.random.Generator, size: int,
    textured: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 (H, W, 3) and object-id mask uint8 (H, W); later objects on top."""
    img = smooth_background(rng, size, textured)
    ids = np.zeros((size, size), np.uint8)
    for k, (obj, m) in enumerate(zip(objs, masks, strict=True), start=1):
        img[m] = obj.rgb
        ids[m] = k
    # Uniform per-pixel noise in [-6, 6) (std 3.5): cheaper to draw than Gaussian noise.
    noise = rng.random((size, size, 3), dtype=np.float32)
    noise *= 12.0
    noise -= 5.5  # the extra +0.5 rounds on the cast below
    img += noise
    np.maximum(img, 0.0, out=img)
    np.minimum(img, 255.0, out=img)
    return img.astype(np.uint8), ids
