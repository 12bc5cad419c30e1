"""Decode only a region of a JPEG, at a DCT scale, through libjpeg-turbo's TurboJPEG 3 API.

    available      whether a TurboJPEG >= 3.0 library was found
    header         (height, width, colour space) of a JPEG, or None
    decode_region  uint8 (bottom - top, right - left, 3): rows top:bottom, columns left:right
                   of the image decoded at scale m / 8 (coordinates in decoded pixels)

Why. At 84 px almost all of a random crop's time is libjpeg-turbo's Huffman decoding, which
DCT scaling does not shorten. TurboJPEG 3's cropping region (tj3SetCroppingRegion) stops the
decode after the region's last row, and runs IDCT, upsampling and colour conversion only for
the region's columns and rows (the rows above it are still Huffman-decoded). simplejpeg does
not expose it, so this module calls the library through ctypes; the decode releases the GIL.

The pixels are the full decode's, bit for bit (tests/test_jpeg_region.py checks this against
simplejpeg for every chroma subsampling and scale). Two details make that so:
  * the region's left edge must sit on an iMCU column (the MCU width at this scale), so we
    decode from the iMCU column at or left of `left` and slice;
  * libjpeg-turbo's fancy (triangle-filter) chroma upsampling treats the decoded region's
    left and right edges as image edges, which changes the edge columns of 4:2:2 and 4:2:0
    images, so we decode one iMCU more on each side (within the image) and slice it off.

The library. The `turbojpeg` wheel (requirements.txt, Linux x86-64) ships libturbojpeg built
from libjpeg-turbo 3.0; we load that file, not the wheel's Python module. Elsewhere a system
libturbojpeg of version 3 or later is used when ctypes finds one; without either, `available()`
is False and decode.py decodes the whole image with simplejpeg (same pixels, slower).

Errors. Warnings are errors here (TJPARAM_STOPONWARNING), like simplejpeg's strict mode: any
libjpeg complaint raises ValueError, and decode.py then falls back to simplejpeg and Pillow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import pathlib
import threading

import numpy as np

# TurboJPEG 3 constants (turbojpeg.h): init types, parameters, pixel format, subsamplings
_TJINIT_DECOMPRESS = 1
_TJPARAM_STOPONWARNING, _TJPARAM_SUBSAMP, _TJPARAM_JPEGWIDTH, _TJPARAM_JPEGHEIGHT = 0, 4, 5, 6
_TJPARAM_PRECISION, _TJPARAM_COLORSPACE, _TJPARAM_PROGRESSIVE = 7, 8, 12
_TJCS_NAMES = ("RGB", "YCbCr", "GRAY", "CMYK", "YCCK")  # by TJCS value
_TJPF_RGB = 0
# iMCU width in pixels at full scale, by TJSAMP (444, 422, 420, GRAY, 440, 411, 441)
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)
# scale m / 8 as the reduced fraction TurboJPEG lists among its scaling factors
_FACTOR = {1: (1, 8), 2: (1, 4), 4: (1, 2), 8: (1, 1)}
_EOI = b"\xff\xd9"  # the end-of-image marker


class _ScalingFactor(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int),
                ("h", ctypes.c_int)]


def _candidate_paths() -> list[str]:
    """The turbojpeg wheel's bundled library first, then the system's."""
    paths = []
    spec = importlib.util.find_spec("turbojpeg")
    if spec is not None and spec.origin:
        bundled = pathlib.Path(spec.origin).parent / "turbojpeg.libs"
        paths += [str(p) for p in sorted(bundled.glob("libturbojpeg*"))]
    system = ctypes.util.find_library("turbojpeg")
    return paths + ([system] if system else [])


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    handle, buffer = ctypes.c_void_p, ctypes.c_char_p
    signatures = {
        "tj3Init": ([ctypes.c_int], handle),
        "tj3Destroy": ([handle], None),
        "tj3Set": ([handle, ctypes.c_int, ctypes.c_int], ctypes.c_int),
        "tj3Get": ([handle, ctypes.c_int], ctypes.c_int),
        "tj3DecompressHeader": ([handle, buffer, ctypes.c_size_t], ctypes.c_int),
        "tj3SetScalingFactor": ([handle, _ScalingFactor], ctypes.c_int),
        "tj3SetCroppingRegion": ([handle, _Region], ctypes.c_int),
        "tj3Decompress8": ([handle, buffer, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int,
                            ctypes.c_int], ctypes.c_int),
        "tj3GetErrorStr": ([handle], ctypes.c_char_p),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


@functools.cache
def _library() -> ctypes.PyDLL | None:
    """The library, its functions called with the GIL held (PyDLL), except `decompress`
    (tj3Decompress8 through CDLL), which releases it. Each GIL release is a point where a
    decode thread can be made to wait for the others' Python work; the setup calls take a
    microsecond each, so only the decode itself releases the GIL."""
    for path in _candidate_paths():
        try:
            lib = ctypes.PyDLL(path)
        except OSError:
            continue
        if hasattr(lib, "tj3SetCroppingRegion"):  # TurboJPEG 3.0 or later
            lib = _declare(lib)
            lib.decompress = _declare(ctypes.CDLL(path)).tj3Decompress8
            return lib
    return None


def available() -> bool:
    """Whether a TurboJPEG >= 3.0 library was found (else decode.py decodes whole images)."""
    return _library() is not None


def library_path() -> str | None:
    """The file of the TurboJPEG library in use, None without one."""
    lib = _library()
    return None if lib is None else lib._name


class _Handle:
    """One decompressor per thread (a TurboJPEG handle is not thread-safe)."""

    def __init__(self, lib: ctypes.PyDLL):
        self.lib, self.pointer = lib, lib.tj3Init(_TJINIT_DECOMPRESS)
        if not self.pointer:
            raise MemoryError("tj3Init failed")
        lib.tj3Set(self.pointer, _TJPARAM_STOPONWARNING, 1)
        self.parsed: bytes | None = None  # the data whose header the handle holds

    def read_header(self, data: bytes) -> None:
        """Parse `data`'s header into the handle, unless the handle holds that very object's
        already (decode.py reads the header, then decodes the region of the same bytes)."""
        if self.parsed is not data:
            self.check(self.lib.tj3DecompressHeader(self.pointer, data, len(data)))
            self.parsed = data

    def __del__(self):
        if getattr(self, "pointer", None):
            self.lib.tj3Destroy(self.pointer)

    def check(self, status: int) -> None:
        if status != 0:
            message = self.lib.tj3GetErrorStr(self.pointer).decode()
            # a handle that stopped on a warning keeps failing (libjpeg-turbo 3.0): the
            # thread's next call gets a fresh one
            _local.handle = None
            raise ValueError(f"libjpeg-turbo: {message}")


_local = threading.local()


def _handle() -> _Handle:
    handle = getattr(_local, "handle", None)
    if handle is None:
        lib = _library()
        if lib is None:
            raise RuntimeError("jpeg_region: no TurboJPEG >= 3.0 library (see available())")
        handle = _local.handle = _Handle(lib)
    return handle


def header(data: bytes) -> tuple[int, int, str] | None:
    """(height, width, colour space name) from a JPEG's header, None when libjpeg-turbo
    cannot read it or warns. The same as simplejpeg.decode_jpeg_header's first three, but
    with the GIL held: a call this short should not hand the GIL to another thread."""
    handle, data = _handle(), bytes(data)
    lib, pointer = handle.lib, handle.pointer
    try:
        handle.read_header(data)
    except ValueError:
        return None
    colorspace = lib.tj3Get(pointer, _TJPARAM_COLORSPACE)
    name = _TJCS_NAMES[colorspace] if 0 <= colorspace < len(_TJCS_NAMES) else "unknown"
    return (lib.tj3Get(pointer, _TJPARAM_JPEGHEIGHT), lib.tj3Get(pointer, _TJPARAM_JPEGWIDTH),
            name)


def decode_region(data: bytes, m: int, left: int, top: int, right: int,
                  bottom: int) -> np.ndarray:
    """Rows top:bottom and columns left:right of the JPEG decoded at scale m / 8 (m in 1, 2,
    4, 8; coordinates in pixels of the scaled image, whose sides are ceil(side · m / 8)) as
    uint8 RGB, equal to slicing the whole decode. ValueError for data libjpeg-turbo rejects
    or warns about, for data that does not end in the EOI marker (the decode stops at the
    region's last row, so it would not see a truncation below it), for progressive and for
    12- or 16-bit JPEGs, for a subsampling without a known iMCU size, and for a region
    outside the scaled image: decode.py decodes all of these whole."""
    if m not in _FACTOR:
        raise ValueError(f"jpeg_region: scale m must be one of {sorted(_FACTOR)}, got {m!r}")
    data = bytes(data)
    if not data.endswith(_EOI):
        # truncated, or bytes after the image: a region above the damage would decode where
        # the whole decode fails, so these go to the whole-image path, which decides
        raise ValueError("jpeg_region: the data does not end in the EOI marker")
    handle = _handle()
    lib, pointer = handle.lib, handle.pointer
    handle.read_header(data)
    if lib.tj3Get(pointer, _TJPARAM_PRECISION) != 8 or lib.tj3Get(pointer, _TJPARAM_PROGRESSIVE):
        # progressive: every scan is decoded whatever the region, so nothing is saved, and
        # simplejpeg's newer libjpeg-turbo is faster; 12- and 16-bit: not 8-bit RGB output
        raise ValueError("jpeg_region: a progressive or not 8-bit JPEG is decoded whole")
    subsampling = lib.tj3Get(pointer, _TJPARAM_SUBSAMP)
    if not 0 <= subsampling < len(_MCU_WIDTH):
        raise ValueError(f"jpeg_region: chroma subsampling {subsampling} has no iMCU width")
    width = -(-lib.tj3Get(pointer, _TJPARAM_JPEGWIDTH) * m // 8)
    height = -(-lib.tj3Get(pointer, _TJPARAM_JPEGHEIGHT) * m // 8)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"jpeg_region: region x {left}:{right}, y {top}:{bottom} is outside "
                         f"the {width} x {height} image at scale {m}/8")
    mcu = -(-_MCU_WIDTH[subsampling] * m // 8)  # the scaled iMCU width (TJSCALED)
    x0 = max(left // mcu * mcu - mcu, 0)  # iMCU-aligned, one iMCU of margin
    x1 = min(right + mcu, width)
    handle.check(lib.tj3SetScalingFactor(pointer, _ScalingFactor(*_FACTOR[m])))
    handle.check(lib.tj3SetCroppingRegion(pointer, _Region(x0, top, x1 - x0, bottom - top)))
    out = np.empty((bottom - top, x1 - x0, 3), np.uint8)
    handle.check(lib.decompress(pointer, data, len(data), out.ctypes.data, 0, _TJPF_RGB))
    return out[:, left - x0:right - x0]
