"""crate_jax.data.jpeg_region: region decodes equal the whole decode sliced, bit for bit."""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import io
import platform
import sys

import numpy as np
import pytest
import simplejpeg
from image_utils import photo
from PIL import Image

from crate_jax.data import decode, jpeg_region

SUBSAMPLINGS = ("444", "422", "420", "440", "411", "Gray")
# requirements.txt installs the library on Linux x86-64, where the first test insists on it;
# elsewhere the region tests run when a system libturbojpeg >= 3 was found
REQUIRED_HERE = (sys.platform == "linux" and platform.machine() == "x86_64"
                 and sys.version_info < (3, 14))  # the marker of the line in requirements.txt
pytestmark = pytest.mark.skipif(not (REQUIRED_HERE or jpeg_region.available()),
                                reason="no TurboJPEG >= 3 library on this platform")


def _photo_array(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like image plus sensor noise: chroma detail, so that upsampling errors show."""
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 3))
    return np.clip(np.asarray(photo(width, height, seed), np.float32) + noise, 0, 255).astype(
        np.uint8)


def _jpeg(width: int, height: int, subsampling: str, seed: int = 0) -> bytes:
    array = _photo_array(width, height, seed)
    if subsampling == "Gray":
        grey = np.asarray(Image.fromarray(array).convert("L"))[..., None]
        return simplejpeg.encode_jpeg(np.ascontiguousarray(grey), 90, "GRAY", "Gray")
    return simplejpeg.encode_jpeg(array, 90, "RGB", subsampling)


def _whole(data: bytes, m: int) -> np.ndarray:
    """simplejpeg's decode of the whole image at exactly m / 8 (the reference)."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    out = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height * m // 8),
                                 min_width=-(-width * m // 8))
    assert out.shape[:2] == (-(-height * m // 8), -(-width * m // 8))
    return out


def _regions(width: int, height: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The edge cases (whole image, one pixel at each corner, first and last rows and
    columns) and random regions."""
    regions = [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, width, height),
               (0, height - 1, width, height), (width - 1, 0, width, height)]
    for _ in range(16):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        regions.append((left, top, int(rng.integers(left + 1, width + 1)),
                        int(rng.integers(top + 1, height + 1))))
    return regions


def test_the_library_is_found_where_requirements_install_it():
    assert jpeg_region.available(), "pip install -r requirements.txt installs turbojpeg"
    assert "turbojpeg" in jpeg_region.library_path()


def test_only_the_decode_releases_the_gil():
    """The setup calls keep the GIL (PyDLL: no hand-over to another thread's Python work in
    the middle of a crop); tj3Decompress8 releases it (CDLL), so decode threads overlap."""
    lib = jpeg_region._library()
    keeps_gil = ctypes._FUNCFLAG_PYTHONAPI
    for name in ("tj3DecompressHeader", "tj3Get", "tj3SetScalingFactor",
                 "tj3SetCroppingRegion"):
        assert getattr(lib, name)._flags_ & keeps_gil, name
    assert not lib.decompress._flags_ & keeps_gil


@pytest.mark.parametrize("subsampling", SUBSAMPLINGS)
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_region_equals_the_whole_decode_sliced(subsampling, m):
    data = _jpeg(211, 157, subsampling, seed=m)  # odd sides: partial iMCUs on both edges
    whole = _whole(data, m)
    height, width = whole.shape[:2]
    for left, top, right, bottom in _regions(width, height, np.random.default_rng(m)):
        region = jpeg_region.decode_region(data, m, left, top, right, bottom)
        np.testing.assert_array_equal(region, whole[top:bottom, left:right],
                                      err_msg=f"{subsampling} m={m} {left, top, right, bottom}")


def test_progressive_jpeg_goes_to_the_whole_image_path(monkeypatch):
    """A progressive JPEG gains nothing from a region (every scan is decoded): decode_region
    declines it and random_resized_crop decodes it whole, to the pixels it gives without the
    library."""
    buffer = io.BytesIO()
    Image.fromarray(_photo_array(300, 200, 5)).save(buffer, "JPEG", quality=85,
                                                     progressive=True)
    data = buffer.getvalue()
    with pytest.raises(ValueError, match="progressive"):
        jpeg_region.decode_region(data, 2, 0, 0, 10, 10)
    crops = [decode.random_resized_crop(data, np.random.default_rng(s), 64) for s in range(4)]
    monkeypatch.setattr(jpeg_region, "available", lambda: False)
    for seed, crop in enumerate(crops):
        np.testing.assert_array_equal(
            crop, decode.random_resized_crop(data, np.random.default_rng(seed), 64))


def test_twelve_bit_jpeg_is_declined():
    """libjpeg-turbo writes 12-bit JPEGs through TurboJPEG's tj3Compress12: ours declines
    them (not 8-bit RGB), and the whole-image path decides."""
    lib = jpeg_region._library()
    handle = lib.tj3Init(0)  # TJINIT_COMPRESS
    try:
        image = (np.asarray(photo(40, 24), np.uint16) * 16).astype(np.int16)
        for param, value in ((4, 2), (3, 90)):  # TJPARAM_SUBSAMP 4:2:0, TJPARAM_QUALITY
            assert lib.tj3Set(handle, param, value) == 0
        out, size = ctypes.c_void_p(), ctypes.c_size_t()
        status = lib.tj3Compress12(ctypes.c_void_p(handle),
                                   image.ctypes.data_as(ctypes.c_void_p), 40, 0, 24, 0,
                                   ctypes.byref(out), ctypes.byref(size))
        assert status == 0, lib.tj3GetErrorStr(handle)
        data = ctypes.string_at(out, size.value)
        lib.tj3Free(out)
    finally:
        lib.tj3Destroy(handle)
    assert data[:2] == b"\xff\xd8" and b"\xff\xc1" in data[:400]  # SOF1: extended, 12-bit
    with pytest.raises(ValueError, match="not 8-bit"):
        jpeg_region.decode_region(data, 8, 0, 0, 10, 10)


def test_bad_input_raises_value_error():
    data = _jpeg(120, 90, "420")
    marker = data.index(b"\xff\xda")
    cases = {"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 20 + b"\xff\xd9",
             "empty": b"", "warning": data[:marker] + b"\x12\x34\x56" + data[marker:]}
    for name, bad in cases.items():
        # the region lies above the truncation: the EOI check, not the decode, rejects it
        match = "EOI" if name in ("truncated", "empty") else "libjpeg-turbo"
        with pytest.raises(ValueError, match=match):
            jpeg_region.decode_region(bad, 8, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="outside the 30 x 23 image at scale 2/8"):
        jpeg_region.decode_region(data, 2, 0, 0, 31, 10)
    with pytest.raises(ValueError, match="scale m"):
        jpeg_region.decode_region(data, 3, 0, 0, 10, 10)


def test_threads_decode_side_by_side():
    """Each thread has its own decompressor, and the calls run outside the GIL."""
    jobs = []
    for seed, subsampling in enumerate(("444", "420", "422", "Gray") * 4):
        data = _jpeg(160 + 8 * seed, 120, subsampling, seed)
        jobs.append((data, (1, 2, 4, 8)[seed % 4], 1, 2, 15, 13))
    expected = [jpeg_region.decode_region(*job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda job: jpeg_region.decode_region(*job), jobs))
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("subsampling", ["444", "422", "420", "Gray"])
def test_random_resized_crop_is_the_same_with_and_without_the_library(subsampling,
                                                                      monkeypatch):
    images = [_jpeg(w, h, subsampling, seed) for seed, (w, h) in
              enumerate([(640, 480), (333, 517), (1000, 750), (97, 131)])]

    def crops() -> list[np.ndarray]:
        out = []
        for seed, data in enumerate(images):
            for size, area in ((84, (0.4, 1.0)), (224, (0.08, 1.0)), (32, (0.08, 0.2))):
                rng = np.random.default_rng(seed)
                out += [decode.random_resized_crop(data, rng, size, area=area, flip=True)
                        for _ in range(4)]
        return out

    with_region = crops()
    monkeypatch.setattr(jpeg_region, "available", lambda: False)
    for a, b in zip(with_region, crops(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_library_without_turbojpeg_3_is_not_used(monkeypatch):
    libc = ctypes.util.find_library("c")
    assert libc
    monkeypatch.setattr(jpeg_region, "_candidate_paths", lambda: ["/no/such/lib.so", libc])
    jpeg_region._library.cache_clear()
    try:
        assert not jpeg_region.available()
        data = _jpeg(200, 150, "420")
        crop = decode.random_resized_crop(data, np.random.default_rng(0), 64)  # simplejpeg
        assert crop.shape == (64, 64, 3)
    finally:
        jpeg_region._library.cache_clear()


def test_header_agrees_with_simplejpeg():
    """jpeg_region.header (the GIL held) gives simplejpeg's height, width and colour space;
    None for what libjpeg-turbo cannot read or warns about."""
    cases = [_jpeg(211, 157, subsampling) for subsampling in SUBSAMPLINGS]
    for mode in ("CMYK", "RGB"):
        buffer = io.BytesIO()
        Image.fromarray(_photo_array(64, 48, 2)).convert(mode).save(
            buffer, "JPEG", quality=90, progressive=mode == "RGB")
        cases.append(buffer.getvalue())
    for data in cases:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        expected = (height, width, "GRAY" if colorspace == "Gray" else colorspace)
        assert jpeg_region.header(data) == expected
    data = cases[0]
    marker = data.index(b"\xff\xda")
    for bad in (b"", b"not a jpeg", data[:marker] + b"\x12\x34\x56" + data[marker:]):
        assert jpeg_region.header(bad) is None
    buffer = io.BytesIO()
    Image.fromarray(_photo_array(20, 10, 0)).save(buffer, "PNG")
    assert jpeg_region.header(buffer.getvalue()) is None
    assert decode.image_size(cases[2]) == (211, 157)  # through header()
