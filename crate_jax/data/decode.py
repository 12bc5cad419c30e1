"""Image decode and random-resized crop: libjpeg-turbo (TurboJPEG or simplejpeg), else Pillow.

    image_size           (width, height) from the header, no pixel decode
    decode_rgb           uint8 (H, W, 3); a JPEG at the smallest M/8 scale whose short side
                         is >= min_side
    random_resized_crop  uint8 (size, size, 3): the inception-style box on the full-resolution
                         size, decoded at the smallest M/8 scale that keeps the box >= size px

Path. A JPEG whose header libjpeg-turbo reads (YCbCr, RGB or greyscale) is decoded by
simplejpeg with DCT scaling M/8, M = 1 … 8 (libjpeg-turbo's factors, finer than PIL's
draft() 1/2, 1/4, 1/8), straight to RGB (greyscale is expanded to RGB by libjpeg-turbo, equal
to Pillow's convert("RGB")). Everything else goes through a full Pillow decode and
.convert("RGB"): PNG, WebP, GIF, ...; CMYK and YCCK JPEGs (Pillow honours the Adobe
inversion flag, libjpeg-turbo's CMYK -> RGB assumes it); and JPEGs that simplejpeg rejects
with strict=True — it raises ValueError on libjpeg *warnings* too, and Pillow still decodes a
JPEG whose warning is harmless. Truncated or corrupt data raises on both paths (ValueError from
simplejpeg, then OSError from Pillow, which with its default LOAD_TRUNCATED_IMAGES=False
refuses a truncated file even when only the EOI marker is missing); nothing here returns a
grey-filled partial image. EXIF orientation is not applied (as in images.to_pil).

Crops decode only their box. random_resized_crop asks jpeg_region (TurboJPEG 3's cropping
region, through ctypes) for just the box's rows and columns at scale M/8: the decode stops
after the box's last row and skips the IDCT, upsampling and colour conversion of everything
outside it. The pixels are the whole decode's, bit for bit, so the output is the same with or
without the library (tests/test_jpeg_region.py); anything the region decode rejects (a
warning, no EOI marker at the end, an unusual subsampling) goes down the whole-image path
above, which decides as before. On the 2-core machine this made the 84 px CLIPA crop 9-16 %
faster and the 224 px inception crop (smaller boxes) 41-49 % faster.

Scale choice. simplejpeg returns the smallest M/8 scale whose output is >= min_height *and*
>= min_width (output sides ceil(side · M / 8)); we pick M ourselves and pass both output sides
of that M as the minima, which pins the scale exactly (passing one side, or minima above the
image size, makes simplejpeg choose by its own rule).

Resize. The box, in decoded pixels (full-resolution box × M/8, snapped outwards to whole
pixels: at most one decoded pixel more on each side, which moves a random crop by less than
1.2 % of its side at 84 px), is resized with OpenCV. With M chosen as above the decoded box is
between size and 2·size pixels, so a 2-tap bilinear resize (half-pixel centres, no
antialiasing: tf.image.resize's default, as in big_vision and the official CLIPA input
pipeline) loses nothing that matters: the DCT scaling has already low-passed the image. It is
one cv2.warpAffine with cv2.resize(INTER_LINEAR)'s map and the flip folded in (within 1 grey
level of resize + flip). A box of 2·size or more (non-JPEG input, decoded at full size) is
area-averaged instead (cv2.INTER_AREA), then cv2.flip. Measured on the 2-core machine, one
thread, the box resize alone (uint8, 3 channels, img/s):

    box -> output       Pillow BILINEAR  cv2.INTER_AREA  INTER_LINEAR + flip  warpAffine (used)
    160 x 197 -> 84          4,400           4,500            40,000              59,000
    260 x 297 -> 224         1,200           1,200             8,300              14,000

so Pillow's antialiased resize costs as much as the decode itself at 224 px. Whole
random_resized_crop on photo-like 300-1,000 px JPEGs of ~36 KiB (benchmarks/input_pipeline.py
gives the current figures): a whole-image decode at M/8 takes 0.5-1.1 ms, the box alone
(jpeg_region) 10-45 % less, the resize 0.02 ms at 84 px and 0.07 ms at 224 px.

The decoded scales. libjpeg-turbo's SIMD IDCTs cover 1/8, 2/8, 4/8 and 8/8; the generic ones
are slower than a full decode (same images, img/s of the decode alone):

    M/8     1/8    2/8    3/8    4/8    5/8    6/8    7/8    8/8
    img/s  2,160  1,800  1,140  1,450   620    510    360    900

Error vs. the reference (full-size Pillow decode + antialiased BILINEAR resize of the exact
box): mean |diff| below 4 grey levels on photo-like images (tests/test_decode.py).
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from crate_jax.data import jpeg_region

# The input pipeline runs this on its own thread pool; OpenCV's pool on top would
# oversubscribe the cores.
cv2.setNumThreads(1)
# libjpeg-turbo decodes these JPEG colour spaces to RGB itself; CMYK / YCCK go to Pillow.
_PILLOW_COLORSPACES = ("CMYK", "YCCK")
# The scales M/8 we decode at: the SIMD ones (timings of all eight in the module docstring).
_FAST_SCALES = (1, 2, 4, 8)


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that libjpeg-turbo decodes to RGB, else None (Pillow's job).
    Read by jpeg_region when it has its library: simplejpeg releases the GIL for this
    microsecond call, which with several decode threads invites a hand-over per image."""
    if jpeg_region.available():
        parsed = jpeg_region.header(data)
        if parsed is None:  # not a JPEG, or one libjpeg-turbo cannot parse or warns about
            return None
        height, width, colorspace = parsed
    else:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a JPEG, or one libjpeg-turbo cannot parse
            return None
    return None if colorspace in _PILLOW_COLORSPACES else (int(height), int(width))


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header (JPEG via libjpeg-turbo, anything else via Pillow)."""
    header = _jpeg_header(data)
    if header is not None:
        return header[1], header[0]
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        return image.size


def _scaled(side: int, m: int) -> int:
    """libjpeg's output side at scale m / 8: ceil(side · m / 8)."""
    return -(-side * m // 8)


def _decode_jpeg(data: bytes, height: int, width: int, m: int) -> np.ndarray:
    """simplejpeg at exactly scale m / 8 (ValueError on anything libjpeg complains about)."""
    if max(height, width) < 8:
        # both sides < 8: neighbouring m can give the same output size, so the scale would
        # be ambiguous; such images are too small to gain anything from scaling
        m = 8
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=_scaled(height, m),
                                  min_width=_scaled(width, m), strict=True)


def _decode_pillow(data: bytes) -> np.ndarray:
    """Full Pillow decode to RGB; OSError on truncated or unreadable data."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _decode(data: bytes, header: tuple[int, int] | None, m: int) -> tuple[np.ndarray, int]:
    """(RGB array, m actually used): simplejpeg at m / 8 when it can, else Pillow at 8 / 8."""
    if header is not None:
        try:
            return _decode_jpeg(data, *header, m), (m if max(header) >= 8 else 8)
        except ValueError:
            pass  # strict libjpeg warning or corrupt data: Pillow decides (raises if corrupt)
    return _decode_pillow(data), 8


def decode_rgb(data: bytes, min_side: int | None = None) -> np.ndarray:
    """Decode to uint8 (H, W, 3). A JPEG is decoded at the smallest scale M/8 (M = 1 … 8)
    whose short side is still >= min_side (full size when min_side is None or the image is
    smaller); other formats, CMYK JPEGs and JPEGs simplejpeg rejects decode at full size
    through Pillow. ValueError or OSError for corrupt or truncated data."""
    if min_side is not None and min_side < 1:
        raise ValueError(f"decode_rgb: min_side must be >= 1, got {min_side!r}")
    header = _jpeg_header(data)
    m = 8
    if header is not None and min_side is not None:
        short = min(header)
        m = next((k for k in _FAST_SCALES if _scaled(short, k) >= min_side), 8)
    return _decode(data, header, m)[0]


def sample_crop(width: int, height: int, rng: np.random.Generator,
                area: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(x, y, w, h) drawn exactly as images.inception_crop draws its box (same rng use):
    up to 10 tries of (area fraction uniform, log-aspect uniform, x, y), then the centre
    square of the short side."""
    for _ in range(10):
        target = rng.uniform(*area) * width * height
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, w, h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def _pixel_box(box: tuple[float, float, float, float], width: int,
               height: int) -> tuple[int, int, int, int]:
    """`box` (x0, y0, x1, y1 in pixels of a width x height image) snapped outwards to whole
    pixels and kept inside the image, at least one pixel each way."""
    left, top = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
    right = min(max(math.ceil(box[2]), left + 1), width)
    bottom = min(max(math.ceil(box[3]), top + 1), height)
    return left, top, right, bottom


def _resize(region: np.ndarray, size: int, mirror: bool) -> np.ndarray:
    """`region` resized to uint8 (size, size, 3), mirrored left-right if `mirror`: bilinear
    below a 2x downscale, area average from 2x on.

    Bilinear is one cv2.warpAffine whose map is cv2.resize's INTER_LINEAR one, output pixel
    (u, v) <- region ((u + ½)·sx − ½, (v + ½)·sy − ½) with s = region side / size, edges
    clamped, and the mirror folded in (u -> size − 1 − u): the same taps as resize + flip up
    to warpAffine's 1/32-pixel position rounding (at most 1 grey level), in one pass."""
    height, width = region.shape[:2]
    if min(height, width) >= 2 * size:
        out = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)
        return cv2.flip(out, 1) if mirror else out
    sx, sy = width / size, height / size
    a, b = (-sx, (size - 0.5) * sx - 0.5) if mirror else (sx, 0.5 * sx - 0.5)
    inverse_map = np.array([[a, 0.0, b], [0.0, sy, 0.5 * sy - 0.5]])
    return cv2.warpAffine(region, inverse_map, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _decode_box(data: bytes, header: tuple[int, int], m: int,
                box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of the full-resolution `box` (x, y, w, h) of a JPEG, decoded at scale
    m / 8 and snapped outwards to whole decoded pixels: only that region through TurboJPEG
    when the library is there, else the whole image (simplejpeg, or Pillow at 8 / 8)."""
    x, y, w, h = box
    height, width = header
    if jpeg_region.available() and max(header) >= 8:
        scale = m / 8
        left, top, right, bottom = _pixel_box(
            (x * scale, y * scale, (x + w) * scale, (y + h) * scale),
            _scaled(width, m), _scaled(height, m))
        try:
            return jpeg_region.decode_region(data, m, left, top, right, bottom)
        except ValueError:
            pass  # strict libjpeg warning or corrupt data: the whole-image path decides
    array, m = _decode(data, header, m)
    scale = m / 8
    left, top, right, bottom = _pixel_box((x * scale, y * scale, (x + w) * scale,
                                           (y + h) * scale), array.shape[1], array.shape[0])
    return array[top:bottom, left:right]


def random_resized_crop(data: bytes, rng: np.random.Generator | None, size: int, *,
                        area: tuple[float, float] = (0.4, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = False) -> np.ndarray:
    """Random resized crop to uint8 (size, size, 3), decoding no more pixels than it needs.

    The box is drawn on the full-resolution (header) size exactly as augment.clipa_crop /
    images.inception_crop draw it (area fraction uniform in `area`, aspect log-uniform in
    `ratio`; rng None: the centre square of the short side). The image is decoded at the
    smallest scale M/8 that keeps the box's short side >= size decoded pixels (full size for
    non-JPEGs) and the box is resized to size × size (bilinear; area average when the decoded
    box is 2·size or more, i.e. for non-JPEGs). rng use, in order: the box
    draws of sample_crop, then — only if flip — one rng.random(), < 0.5 mirroring the output
    left-right. rng None: centre crop, never flipped.
    """
    if size < 1:
        raise ValueError(f"random_resized_crop: size must be >= 1, got {size!r}")
    if not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"random_resized_crop: area must satisfy 0 < lo <= hi <= 1, "
                         f"got {area!r}")
    header = _jpeg_header(data)
    # non-JPEGs: the full decode gives the size (no randomness involved, so the order of
    # decode and draws does not change the rng stream)
    array = _decode_pillow(data) if header is None else None
    height, width = header if header is not None else array.shape[:2]
    if rng is None:
        side = min(width, height)
        x, y, w, h = (width - side) // 2, (height - side) // 2, side, side
    else:
        x, y, w, h = sample_crop(width, height, rng, area, ratio)
    mirror = flip and rng is not None and rng.random() < 0.5
    if array is None:
        # the box's short side is min(w, h) · m / 8 decoded pixels (exact, not rounded up)
        m = next((k for k in _FAST_SCALES if min(w, h) * k >= 8 * size), 8)
        region = _decode_box(data, header, m, (x, y, w, h))
    else:
        left, top, right, bottom = _pixel_box((x, y, x + w, y + h), width, height)
        region = array[top:bottom, left:right]
    return _resize(region, size, mirror)
