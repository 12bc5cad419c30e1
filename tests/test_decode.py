"""crate_jax.data.decode against Pillow: scale choice, crop geometry and rng use, fallbacks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from image_utils import photo as _photo
from PIL import Image

from crate_jax.data import decode, images, jpeg_region


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpeg_960x720() -> bytes:
    return _encode(_photo(960, 720, seed=1), quality=90)


def test_image_size_from_header(jpeg_960x720):
    assert decode.image_size(jpeg_960x720) == (960, 720)
    assert decode.image_size(_encode(_photo(50, 30), "PNG")) == (50, 30)


@pytest.mark.parametrize("min_side,shape", [(None, (720, 960)), (1, (90, 120)),
                                            (90, (90, 120)), (91, (180, 240)),
                                            (180, (180, 240)), (181, (360, 480)),
                                            (361, (720, 960)), (5000, (720, 960))])
def test_decode_rgb_picks_the_smallest_simd_scale(jpeg_960x720, min_side, shape):
    # scales 1/8, 2/8, 4/8, 8/8 only: 3/8 ... 7/8 are slower than 4/8 or a full decode
    out = decode.decode_rgb(jpeg_960x720, min_side)
    assert out.shape == (*shape, 3) and out.dtype == np.uint8


def test_decode_rgb_odd_sides_round_up():
    data = _encode(_photo(481, 363), quality=90)
    assert decode.decode_rgb(data, 46).shape == (46, 61, 3)  # ceil(363 / 8), ceil(481 / 8)
    assert decode.decode_rgb(data, 47).shape == (91, 121, 3)  # 2/8: ceil(726 / 8), ...


def test_full_decode_equals_pillow(jpeg_960x720):
    ours = decode.decode_rgb(jpeg_960x720).astype(np.int16)
    reference = np.asarray(Image.open(io.BytesIO(jpeg_960x720)).convert("RGB"), np.int16)
    # both are libjpeg(-turbo) with the same IDCT; at most rounding in the upsampling differs
    assert np.abs(ours - reference).max() <= 2
    assert np.abs(ours - reference).mean() < 0.2


def test_scaled_decode_is_a_downscaled_image(jpeg_960x720):
    quarter = decode.decode_rgb(jpeg_960x720, 181).astype(np.float32)  # 4/8: 480 x 360
    full = Image.open(io.BytesIO(jpeg_960x720)).convert("RGB")
    reference = np.asarray(full.resize((480, 360), Image.BOX), np.float32)
    assert np.abs(quarter - reference).mean() < 2


def _reference_crop(data: bytes, seed: int, size: int, area) -> np.ndarray:
    """The crop on a full-size Pillow decode: same box, exact antialiased bilinear."""
    full = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(images.inception_crop(full, np.random.default_rng(seed), size, area=area))


@pytest.mark.parametrize("size,area", [(84, (0.4, 1.0)), (224, (0.08, 1.0)), (32, (0.08, 0.2))])
def test_random_resized_crop_matches_full_decode_reference(jpeg_960x720, size, area):
    for seed in range(5):
        ours = decode.random_resized_crop(jpeg_960x720, np.random.default_rng(seed), size,
                                          area=area)
        reference = _reference_crop(jpeg_960x720, seed, size, area)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
        assert diff.mean() < 4, (seed, diff.mean())


@pytest.mark.parametrize("region_decode", [True, False])
def test_random_resized_crop_decodes_enough_and_no_more(jpeg_960x720, monkeypatch,
                                                        region_decode):
    """The scale m is the coarsest that keeps the box's short side >= size, on both decode
    paths (TurboJPEG region decode, and whole-image simplejpeg without the library)."""
    decoded = []
    if region_decode:
        if not jpeg_region.available():
            pytest.skip("no TurboJPEG >= 3 library (tests/test_jpeg_region.py insists on "
                        "one where requirements.txt installs it)")
        real_region = jpeg_region.decode_region

        def recording(data, m, *region):
            out = real_region(data, m, *region)
            decoded.append(m)  # only region decodes that worked, not silent fallbacks
            return out

        monkeypatch.setattr(jpeg_region, "decode_region", recording)
    else:
        monkeypatch.setattr(jpeg_region, "available", lambda: False)
        real = decode._decode_jpeg

        def recording(data, height, width, m):
            decoded.append(m)
            return real(data, height, width, m)

        monkeypatch.setattr(decode, "_decode_jpeg", recording)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        decode.random_resized_crop(jpeg_960x720, rng, 84, area=(0.08, 1.0))
        _, _, w, h = decode.sample_crop(960, 720, np.random.default_rng(seed), (0.08, 1.0),
                                        (3 / 4, 4 / 3))
        m = decoded[-1]
        assert min(w, h) * m / 8 >= 84  # the box keeps >= 84 decoded pixels
        smaller = [k for k in (1, 2, 4) if k < m]
        assert not smaller or min(w, h) * smaller[-1] / 8 < 84  # and no coarser scale would
    assert len(decoded) == 20 and len(set(decoded)) > 1


def test_rng_use_is_the_box_draws_then_one_flip_draw(jpeg_960x720):
    for seed in range(3):
        used, expected = np.random.default_rng(seed), np.random.default_rng(seed)
        decode.random_resized_crop(jpeg_960x720, used, 84, flip=True)
        decode.sample_crop(960, 720, expected, (0.4, 1.0), (3 / 4, 4 / 3))
        expected.random()
        assert used.random() == expected.random()
        no_flip = np.random.default_rng(seed)
        decode.random_resized_crop(jpeg_960x720, no_flip, 84)
        assert no_flip.random() == _after_box(seed).random()


def _after_box(seed: int) -> np.random.Generator:
    rng = np.random.default_rng(seed)
    decode.sample_crop(960, 720, rng, (0.4, 1.0), (3 / 4, 4 / 3))
    return rng


def test_flip_mirrors_exactly_when_its_draw_says_so(jpeg_960x720):
    outcomes = set()
    for seed in range(12):
        flipped = decode.random_resized_crop(jpeg_960x720, np.random.default_rng(seed), 84,
                                             flip=True)
        plain = decode.random_resized_crop(jpeg_960x720, np.random.default_rng(seed), 84)
        mirrored = _after_box(seed).random() < 0.5
        outcomes.add(mirrored)
        np.testing.assert_array_equal(flipped, plain[:, ::-1] if mirrored else plain)
    assert outcomes == {True, False}


def test_determinism_and_centre_crop(jpeg_960x720):
    a = decode.random_resized_crop(jpeg_960x720, np.random.default_rng(7), 84, flip=True)
    b = decode.random_resized_crop(jpeg_960x720, np.random.default_rng(7), 84, flip=True)
    np.testing.assert_array_equal(a, b)
    centre = decode.random_resized_crop(jpeg_960x720, None, 84, flip=True)  # never flipped
    full = Image.open(io.BytesIO(jpeg_960x720)).convert("RGB")
    reference = np.asarray(full.resize((84, 84), Image.BILINEAR, box=(120, 0, 840, 720)))
    assert np.abs(centre.astype(np.int16) - reference.astype(np.int16)).mean() < 3


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"),
                                      ("WEBP", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK")])
def test_other_formats_and_colour_spaces_match_pillow(fmt, mode):
    image = _photo(300, 220, seed=3).convert(mode)
    data = _encode(image, fmt, **({"quality": 95} if fmt != "PNG" else {}))
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    full = decode.decode_rgb(data).astype(np.int16)
    assert full.shape == reference.shape
    assert np.abs(full - reference).max() <= 2  # CMYK through Pillow: its Adobe inversion
    crop = decode.random_resized_crop(data, np.random.default_rng(0), 64)
    expected = _reference_crop(data, 0, 64, (0.4, 1.0)).astype(np.int16)
    assert crop.shape == (64, 64, 3)
    assert np.abs(crop.astype(np.int16) - expected).mean() < 4


def test_jpeg_that_libjpeg_warns_about_goes_to_pillow():
    data = _encode(_photo(200, 150), quality=90)
    marker = data.index(b"\xff\xda")  # start of scan
    # garbage before a marker: libjpeg warns ("extraneous bytes"), simplejpeg's strict mode
    # raises, Pillow decodes the image unchanged
    warned = data[:marker] + b"\x12\x34\x56" + data[marker:]
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode.decode_rgb(warned), pillow)
    assert decode.random_resized_crop(warned, np.random.default_rng(0), 32).shape == (32, 32, 3)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_data_raises(jpeg_960x720, damage):
    data = {"truncated": jpeg_960x720[: len(jpeg_960x720) // 2],
            "garbage": bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)),
            "empty": b""}[damage]
    with pytest.raises((OSError, ValueError)):
        decode.random_resized_crop(data, np.random.default_rng(0), 84)
    with pytest.raises((OSError, ValueError)):
        decode.decode_rgb(data)


def test_tiny_images_and_upscaling():
    tiny = _encode(_photo(6, 5), quality=95)
    assert decode.decode_rgb(tiny, 1).shape == (5, 6, 3)  # below 8 px: never scaled
    assert decode.random_resized_crop(tiny, np.random.default_rng(0), 16).shape == (16, 16, 3)
    small = _encode(_photo(40, 30), quality=95)
    up = decode.random_resized_crop(small, None, 84)  # 30 x 30 centre square, upscaled
    centre = np.asarray(Image.open(io.BytesIO(small)).convert("RGB")
                        .resize((84, 84), Image.BILINEAR, box=(5, 0, 35, 30)), np.int16)
    assert np.abs(up.astype(np.int16) - centre).mean() < 4


def test_bad_arguments_are_named(jpeg_960x720):
    with pytest.raises(ValueError, match="size"):
        decode.random_resized_crop(jpeg_960x720, None, 0)
    with pytest.raises(ValueError, match="area"):
        decode.random_resized_crop(jpeg_960x720, None, 84, area=(0.5, 0.2))
    with pytest.raises(ValueError, match="min_side"):
        decode.decode_rgb(jpeg_960x720, 0)


@pytest.mark.parametrize("shape,size", [((197, 160), 84), ((297, 260), 224), ((90, 84), 84),
                                        ((30, 41), 84), ((5, 6), 16), ((1, 1), 8)])
def test_resize_is_bilinear_resize_then_flip(shape, size):
    """_resize's single warpAffine against cv2.resize(INTER_LINEAR) and cv2.flip: within one
    grey level, on down- and upscales, both ways round."""
    import cv2
    rng = np.random.default_rng(0)
    region = rng.integers(0, 256, (*shape, 3), np.uint8)
    region = cv2.GaussianBlur(region, (3, 3), 1.0) if min(shape) >= 3 else region
    plain = cv2.resize(region, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    for mirror, expected in ((False, plain), (True, plain[:, ::-1])):
        out = decode._resize(region, size, mirror)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(np.int16) - expected).max() <= 1, (shape, size, mirror)
