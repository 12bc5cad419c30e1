"""Host-side image augmentations: RandAugment, colour jitter and the low-resolution CLIPA path.

All functions work on PIL images (RGB, or L where noted) and draw their randomness from a
`numpy.random.Generator`, so a seeded generator reproduces the same output.

    randaugment     RandAugment (Cubuk et al. 2020) with the 14-op standard list
    color_jitter    brightness / contrast / saturation (/ hue) factors in a random order
    decode_reduced  JPEG decode straight to a reduced size through libjpeg's DCT scaling
    clipa_crop      random resized crop to size × size from a JPEG decoded at the smallest DCT
                    scale that keeps the crop >= size px (CLIPA low-resolution training input)

EXIF orientation is not applied (as in crate_jax.data.images.to_pil).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from crate_jax.data.decode import sample_crop

_Op = Callable[[Image.Image, float, int], Image.Image]
FILL = 128  # grey fill for the pixels that geometric ops move in from outside the image

# Op ranges at full magnitude (magnitude == max_magnitude).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_FRACTION = 0.45  # of the image width (TranslateX) or height (TranslateY)
MAX_ENHANCE_DELTA = 0.9  # enhance factor 1 ± 0.9 · m / max
MAX_POSTERIZE_BITS_REMOVED = 4  # bits kept: 8 - round(4 · m / max)


def _fill(image: Image.Image) -> int | tuple[int, ...]:
    bands = len(image.getbands())
    if bands == 1:
        return FILL
    if image.mode in ("RGBA", "LA"):
        return (FILL,) * (bands - 1) + (255,)
    return (FILL,) * bands


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """Output pixel (x, y) samples input (a x + b y + c, d x + e y + f); outside is grey."""
    return image.transform(image.size, Image.Transform.AFFINE, matrix,
                           resample=Image.Resampling.BILINEAR, fillcolor=_fill(image))


def _identity(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    return image


def _auto_contrast(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    return ImageOps.autocontrast(image)


def _equalize(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    return ImageOps.equalize(image)


def _rotate(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    """Counter-clockwise by sign · 30° · fraction about the centre."""
    degrees = sign * MAX_ROTATE_DEGREES * fraction
    if degrees == 0:
        return image
    return image.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=_fill(image))


def _solarize(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    """Invert pixels >= 256 - 256 · fraction (fraction 0: nothing, 1: every pixel)."""
    return ImageOps.solarize(image, round(256 - 256 * fraction))


def _posterize(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    """Keep the top 8 - round(4 · fraction) bits of each channel (8 … 4 bits)."""
    bits = 8 - round(MAX_POSTERIZE_BITS_REMOVED * fraction)
    return image if bits >= 8 else ImageOps.posterize(image, bits)


def _enhancer(kind: Callable[[Image.Image], ImageEnhance._Enhance]) -> _Op:
    def op(image: Image.Image, fraction: float, sign: int) -> Image.Image:
        """Enhance factor 1 + sign · 0.9 · fraction (0.1 … 1.9)."""
        factor = 1.0 + sign * MAX_ENHANCE_DELTA * fraction
        return image if factor == 1.0 else kind(image).enhance(factor)

    return op


def _shear_x(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    """x' = x + s · y about the top-left corner, s = sign · 0.3 · fraction."""
    shear = sign * MAX_SHEAR * fraction
    return image if shear == 0 else _affine(image, (1, shear, 0, 0, 1, 0))


def _shear_y(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    """y' = y + s · x about the top-left corner, s = sign · 0.3 · fraction."""
    shear = sign * MAX_SHEAR * fraction
    return image if shear == 0 else _affine(image, (1, 0, 0, shear, 1, 0))


def _translate_x(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    """Move the content right (sign +1) or left by round(0.45 · fraction · width) pixels."""
    pixels = sign * round(MAX_TRANSLATE_FRACTION * fraction * image.width)
    return image if pixels == 0 else _affine(image, (1, 0, -pixels, 0, 1, 0))


def _translate_y(image: Image.Image, fraction: float, sign: int) -> Image.Image:
    """Move the content down (sign +1) or up by round(0.45 · fraction · height) pixels."""
    pixels = sign * round(MAX_TRANSLATE_FRACTION * fraction * image.height)
    return image if pixels == 0 else _affine(image, (1, 0, 0, 0, 1, -pixels))


# name -> fn(image, magnitude_fraction in [0, 1], sign in {-1, +1}); unsigned ops ignore sign.
_OPS: dict[str, _Op] = {
    "Identity": _identity,
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Rotate": _rotate,
    "Solarize": _solarize,
    "Color": _enhancer(ImageEnhance.Color),
    "Posterize": _posterize,
    "Contrast": _enhancer(ImageEnhance.Contrast),
    "Brightness": _enhancer(ImageEnhance.Brightness),
    "Sharpness": _enhancer(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
}
OP_NAMES: tuple[str, ...] = tuple(_OPS)
GEOMETRIC_OPS: tuple[str, ...] = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def randaugment(image: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                magnitude: int = 9, max_magnitude: int = 10, *,
                ops: Sequence[str] | None = None) -> Image.Image:
    """RandAugment: `num_ops` ops drawn uniformly with replacement from `ops` (default: all 14
    in OP_NAMES), each at magnitude / max_magnitude of its full range with a random sign:

        Rotate ±30°, ShearX/ShearY ±0.3, TranslateX/TranslateY ±0.45 · width/height (rounded
        to whole pixels), Color/Contrast/Brightness/Sharpness factor 1 ± 0.9, Solarize
        threshold 256 → 0, Posterize 8 → 4 bits; Identity, AutoContrast, Equalize have none.

    Geometric ops fill uncovered pixels with grey (128, 128, 128). Keeps the size and mode
    (RGB or L).
    """
    if isinstance(num_ops, bool) or not isinstance(num_ops, int | np.integer) or num_ops < 0:
        raise ValueError(f"randaugment: num_ops must be an integer >= 0, got {num_ops!r}")
    if not max_magnitude > 0:
        raise ValueError(f"randaugment: max_magnitude must be > 0, got {max_magnitude!r}")
    if not 0 <= magnitude <= max_magnitude:
        raise ValueError(f"randaugment: magnitude must be in [0, max_magnitude={max_magnitude}],"
                         f" got {magnitude!r}")
    names = OP_NAMES if ops is None else tuple(ops)
    unknown = [name for name in names if name not in _OPS]
    if unknown or not names:
        raise ValueError(f"randaugment: ops {unknown or names!r}; choose from {OP_NAMES}")
    fraction = float(magnitude) / float(max_magnitude)
    for _ in range(int(num_ops)):
        name = names[int(rng.integers(len(names)))]
        sign = 1 if rng.random() < 0.5 else -1
        image = _OPS[name](image, fraction, sign)
    return image


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` turns (PIL HSV: hue is 0..255 for a full turn)."""
    h, s, v = image.convert("HSV").split()
    offset = round(shift * 256) % 256
    h = h.point(lambda x: (x + offset) % 256)
    return Image.merge("HSV", (h, s, v)).convert(image.mode)


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.0) -> Image.Image:
    """Brightness, contrast and saturation factors uniform in [max(0, 1 - x), 1 + x] and a hue
    shift uniform in [-hue, hue] turns (hue <= 0.5, via HSV; RGB only), applied in a random
    order; a strength of 0 skips that adjustment (all 0: the image unchanged)."""
    for name, value in (("brightness", brightness), ("contrast", contrast),
                        ("saturation", saturation), ("hue", hue)):
        if value < 0:
            raise ValueError(f"color_jitter: {name} must be >= 0, got {value!r}")
    if hue > 0.5:
        raise ValueError(f"color_jitter: hue must be <= 0.5 (turns), got {hue!r}")
    adjustments: list[Callable[[Image.Image, float], Image.Image]] = []
    ranges: list[tuple[float, float]] = []
    for strength, enhancer in ((brightness, ImageEnhance.Brightness),
                               (contrast, ImageEnhance.Contrast),
                               (saturation, ImageEnhance.Color)):
        if strength > 0:
            adjustments.append(lambda im, f, e=enhancer: e(im).enhance(f))
            ranges.append((max(0.0, 1.0 - strength), 1.0 + strength))
    if hue > 0 and image.mode == "RGB":
        adjustments.append(_shift_hue)
        ranges.append((-hue, hue))
    for index in rng.permutation(len(adjustments)):
        image = adjustments[index](image, float(rng.uniform(*ranges[index])))
    return image


def _load_reduced(image: Image.Image, min_side: int) -> tuple[Image.Image, float]:
    """Decode an opened (not yet loaded) image, a JPEG at the smallest DCT scale whose short
    side is >= min_side; returns the RGB image and the scale (original px per decoded px)."""
    scale = 1.0
    if image.format == "JPEG" and min_side < min(image.size):
        width = image.width
        # draft picks s = the largest of 8, 4, 2, 1 with s <= min(w // rw, h // rh) and decodes
        # to ceil(w / s) × ceil(h / s); asking for (min_side, min_side) gives
        # s <= short // min_side, so the decoded short side stays >= min_side.
        drafted = image.draft("RGB", (min_side, min_side))
        if drafted is not None:
            scale = width / drafted[1][2]
    if image.mode == "RGB":  # convert() would copy
        image.load()
        return image, scale
    return image.convert("RGB"), scale


def decode_reduced(data: bytes, min_side: int) -> Image.Image:
    """Decode `data` to RGB; a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4 or 1/8)
    whose short side is still >= min_side (or at full size when the image is smaller). Other
    formats are decoded at full size."""
    if min_side < 1:
        raise ValueError(f"decode_reduced: min_side must be >= 1, got {min_side!r}")
    return _load_reduced(Image.open(io.BytesIO(data)), min_side)[0]


def clipa_crop(data: bytes, rng: np.random.Generator | None, size: int, *,
               area: tuple[float, float] = (0.4, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Low-resolution CLIPA input, uint8 (size, size, 3), all in Pillow: the reference that
    decode.random_resized_crop (libjpeg-turbo + OpenCV, what the input pipeline uses) is
    measured against in benchmarks/input_pipeline.py.

    The crop box is drawn on the header's full-resolution size like images.inception_crop
    (area fraction uniform in `area`, aspect log-uniform in `ratio`; rng None: centre square
    of the short side); the JPEG is then decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps that box's short side >= size pixels (full size if the box is smaller), and
    the box is resized to size × size, bilinear. Same box as inception_crop on a full decode
    with the same rng; only the decode resolution differs.
    """
    if size < 1:
        raise ValueError(f"clipa_crop: size must be >= 1, got {size!r}")
    if not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"clipa_crop: area must satisfy 0 < lo <= hi <= 1, got {area!r}")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if rng is None:
        side = min(width, height)
        x, y, w, h = (width - side) // 2, (height - side) // 2, side, side
    else:
        x, y, w, h = sample_crop(width, height, rng, area, ratio)
    # decoded scale s <= short // min_side <= min(w, h) / size: the box keeps >= size px
    image, scale = _load_reduced(image, math.ceil(size * min(width, height) / min(w, h)))
    box = (x / scale, y / scale, min((x + w) / scale, image.width),
           min((y + h) / scale, image.height))
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image, np.uint8)
