"""RandAugment ops, colour jitter, reduced JPEG decode and the CLIPA crop."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from crate_jax.data import augment, images


def _natural(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Gradients + noise: every op changes it visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    array = base + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.int16)


# --- randaugment ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_keeps_size_and_mode(mode):
    image = _natural(40, 30).convert(mode)
    for seed in range(10):
        out = augment.randaugment(image, np.random.default_rng(seed), num_ops=3, magnitude=9)
        assert out.size == (40, 30) and out.mode == mode


def test_randaugment_deterministic_per_seed_and_varies_across_seeds():
    image = _natural()
    a = augment.randaugment(image, np.random.default_rng(7))
    b = augment.randaugment(image, np.random.default_rng(7))
    np.testing.assert_array_equal(_array(a), _array(b))
    outs = {_array(augment.randaugment(image, np.random.default_rng(s))).tobytes()
            for s in range(8)}
    assert len(outs) > 1


def test_randaugment_magnitude_zero_geometric_is_identity():
    image = _natural()
    for seed in range(5):
        out = augment.randaugment(image, np.random.default_rng(seed), num_ops=4, magnitude=0,
                                  ops=augment.GEOMETRIC_OPS)
        np.testing.assert_array_equal(_array(out), _array(image))
    for name in (*augment.GEOMETRIC_OPS, "Identity", "Solarize", "Posterize", "Color",
                 "Contrast", "Brightness", "Sharpness"):
        for sign in (-1, 1):
            out = augment._OPS[name](image, 0.0, sign)
            np.testing.assert_array_equal(_array(out), _array(image), err_msg=name)


def test_randaugment_rejects_out_of_range():
    image, rng = _natural(), np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_ops"):
        augment.randaugment(image, rng, num_ops=-1)
    with pytest.raises(ValueError, match="magnitude"):
        augment.randaugment(image, rng, magnitude=11)
    with pytest.raises(ValueError, match="magnitude"):
        augment.randaugment(image, rng, magnitude=-1)
    with pytest.raises(ValueError, match="ops"):
        augment.randaugment(image, rng, ops=["Blur"])


def test_op_table_is_the_standard_list():
    assert set(augment._OPS) == {
        "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY"}


def test_solarize_full_magnitude_inverts_everything_half_inverts_bright():
    image = _natural()
    pixels = _array(image)
    np.testing.assert_array_equal(_array(augment._OPS["Solarize"](image, 1.0, 1)), 255 - pixels)
    half = _array(augment._OPS["Solarize"](image, 0.5, 1))  # threshold 128
    np.testing.assert_array_equal(half, np.where(pixels >= 128, 255 - pixels, pixels))


@pytest.mark.parametrize(("fraction", "bits"), [(1.0, 4), (0.5, 6), (0.25, 7)])
def test_posterize_keeps_top_bits(fraction, bits):
    image = _natural()
    out = _array(augment._OPS["Posterize"](image, fraction, 1))
    mask = (0xFF << (8 - bits)) & 0xFF
    np.testing.assert_array_equal(out, _array(image) & mask)


@pytest.mark.parametrize(("fraction", "sign", "factor"), [(1.0, 1, 1.9), (1.0, -1, 0.1),
                                                          (0.5, 1, 1.45)])
def test_brightness_factor(fraction, sign, factor):
    image = Image.new("RGB", (8, 8), (100, 50, 20))
    out = _array(augment._OPS["Brightness"](image, fraction, sign))
    expected = np.clip(np.array([100, 50, 20]) * factor, 0, 255)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1)


@pytest.mark.parametrize("axis", ["X", "Y"])
@pytest.mark.parametrize("sign", [1, -1])
def test_translate_moves_marker(axis, sign):
    width, height = 40, 20
    array = np.zeros((height, width, 3), np.uint8)
    array[10, 20] = 255
    out = _array(augment._OPS["Translate" + axis](Image.fromarray(array), 0.5, sign))
    offset = round(0.45 * 0.5 * (width if axis == "X" else height))
    expected = (10, 20 + sign * offset) if axis == "X" else (10 + sign * offset, 20)
    bright = np.argwhere(out.sum(-1) == 3 * 255)
    assert [tuple(p) for p in bright] == [expected]
    # the uncovered strip on the side the content moved away from is grey
    along = out if axis == "Y" else out.transpose(1, 0, 2)
    strip = along[:offset] if sign == 1 else along[-offset:]
    assert (strip == 128).all() and (np.delete(along, np.s_[:offset] if sign == 1 else
                                              np.s_[-offset:], 0) != 128).all()


def test_rotate_keeps_centre_and_fills_corners_grey():
    image = Image.new("RGB", (41, 41), (200, 10, 10))
    out = _array(augment._OPS["Rotate"](image, 1.0, 1))  # 30 degrees
    np.testing.assert_array_equal(out[20, 20], [200, 10, 10])
    np.testing.assert_array_equal(out[0, 0], [128, 128, 128])


def test_shear_moves_rows():
    array = np.zeros((20, 20, 3), np.uint8)
    array[10, 5] = 255
    out = _array(augment._OPS["ShearX"](Image.fromarray(array), 1.0, 1))  # x_in = x + 0.3 y
    # output (x, y) samples input x + 0.3 y: the marker lands at x = 5 - 3 (pixel centres:
    # 2.5 + 0.3 · 10.5 = 5.65); the grey fill enters from the right edge only
    assert out[10, :10, 0].argmax() == 2 and out[10, 2, 0] > 150
    assert out[[9, 11], :10].max() == 0 and out[:, :10].max() == out[10, 2, 0]
    np.testing.assert_array_equal(out[19, 19], [128, 128, 128])


def test_every_op_runs_at_full_magnitude():
    image = _natural()
    for name, op in augment._OPS.items():
        for sign in (-1, 1):
            out = op(image, 1.0, sign)
            assert out.size == image.size and out.mode == "RGB", name


# --- color_jitter -----------------------------------------------------------------------------


def test_color_jitter_zero_strength_is_identity():
    image = _natural()
    out = augment.color_jitter(image, np.random.default_rng(0), 0, 0, 0, 0)
    np.testing.assert_array_equal(_array(out), _array(image))


def test_color_jitter_deterministic_and_random():
    image = _natural()
    a = augment.color_jitter(image, np.random.default_rng(3), hue=0.1)
    b = augment.color_jitter(image, np.random.default_rng(3), hue=0.1)
    np.testing.assert_array_equal(_array(a), _array(b))
    assert a.size == image.size and a.mode == "RGB"
    c = augment.color_jitter(image, np.random.default_rng(4), hue=0.1)
    assert not np.array_equal(_array(a), _array(c))


def test_color_jitter_brightness_only_scales_uniform_image():
    image = Image.new("RGB", (4, 4), (100, 100, 100))
    out = _array(augment.color_jitter(image, np.random.default_rng(0), 0.5, 0, 0, 0))
    factor = np.random.default_rng(0)
    factor.permutation(1)
    expected = round(100 * factor.uniform(0.5, 1.5))
    assert abs(int(out[0, 0, 0]) - expected) <= 1


def test_color_jitter_rejects_bad_strengths():
    with pytest.raises(ValueError, match="brightness"):
        augment.color_jitter(_natural(), np.random.default_rng(0), brightness=-0.1)
    with pytest.raises(ValueError, match="hue"):
        augment.color_jitter(_natural(), np.random.default_rng(0), hue=0.6)


# --- decode_reduced / clipa_crop ---------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_480x360() -> bytes:
    return _encode(_natural(480, 360), "JPEG", quality=90)


def test_decode_reduced_jpeg(jpeg_480x360):
    image = augment.decode_reduced(jpeg_480x360, 84)
    assert image.mode == "RGB"
    assert 84 <= min(image.size) <= 180  # 360 // 84 = 4 -> 1/4 scale: 120 x 90
    assert image.size == (120, 90)
    assert augment.decode_reduced(jpeg_480x360, 100).size == (240, 180)  # 1/2
    assert augment.decode_reduced(jpeg_480x360, 200).size == (480, 360)  # full
    assert augment.decode_reduced(jpeg_480x360, 1000).size == (480, 360)
    assert augment.decode_reduced(jpeg_480x360, 40).size == (60, 45)  # 1/8


@pytest.mark.parametrize("min_side", [1, 23, 45, 46, 90, 91, 180, 181])
def test_decode_reduced_short_side_never_below_request(jpeg_480x360, min_side):
    short = min(augment.decode_reduced(jpeg_480x360, min_side).size)
    scale = next(s for s in (8, 4, 2, 1) if s <= max(1, 360 // min_side))
    assert short == -(-360 // scale)  # the largest DCT scale that keeps short >= min_side
    assert short >= min(min_side, 360)
    assert short < 2 * min_side or scale in (1, 8)


def test_decode_reduced_png_and_grayscale_jpeg():
    image = augment.decode_reduced(_encode(_natural(480, 360), "PNG"), 84)
    assert image.size == (480, 360) and image.mode == "RGB"
    gray = augment.decode_reduced(_encode(_natural(480, 360).convert("L"), "JPEG"), 84)
    assert gray.size == (120, 90) and gray.mode == "RGB"


def test_clipa_crop_shape_determinism_and_centre(jpeg_480x360):
    a = augment.clipa_crop(jpeg_480x360, np.random.default_rng(1), 84)
    b = augment.clipa_crop(jpeg_480x360, np.random.default_rng(1), 84)
    assert a.shape == (84, 84, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    c = augment.clipa_crop(jpeg_480x360, np.random.default_rng(2), 84)
    assert not np.array_equal(a, c)
    centre = augment.clipa_crop(jpeg_480x360, None, 84)
    assert centre.shape == (84, 84, 3) and centre.dtype == np.uint8
    # centre crop of the full image resized directly: close to the reduced-decode result
    full = Image.open(io.BytesIO(jpeg_480x360)).convert("RGB")
    direct = np.asarray(full.resize((84, 84), Image.BILINEAR, box=(60, 0, 420, 360)), np.int16)
    assert np.abs(direct - centre.astype(np.int16)).mean() < 6
    png = augment.clipa_crop(_encode(_natural(100, 80), "PNG"), np.random.default_rng(0), 32)
    assert png.shape == (32, 32, 3)


def test_clipa_crop_png_matches_inception_crop_exactly():
    png = _encode(_natural(100, 80), "PNG")
    full = Image.open(io.BytesIO(png)).convert("RGB")
    for seed in range(3):
        ours = augment.clipa_crop(png, np.random.default_rng(seed), 32)
        reference = images.inception_crop(full, np.random.default_rng(seed), 32, area=(0.4, 1.0))
        np.testing.assert_array_equal(ours, np.asarray(reference))


def test_clipa_crop_reduced_decode_keeps_enough_pixels(monkeypatch):
    jpeg = _encode(_natural(960, 720, seed=1), "JPEG", quality=90)
    full = Image.open(io.BytesIO(jpeg)).convert("RGB")
    scales = []
    load = augment._load_reduced

    def recording(image, min_side):
        out, scale = load(image, min_side)
        scales.append(scale)
        return out, scale

    monkeypatch.setattr(augment, "_load_reduced", recording)
    for seed in range(6):
        ours = augment.clipa_crop(jpeg, np.random.default_rng(seed), 84).astype(np.int16)
        reference = images.inception_crop(full, np.random.default_rng(seed), 84, area=(0.4, 1.0))
        # the same box; the reduced decode only changes the resampling slightly
        assert np.abs(ours - np.asarray(reference, np.int16)).mean() < 4
    # box short sides are >= sqrt(0.4 · 3/4) · 720 = 394 px, so at least 1/4 (98 px >= 84);
    # 1/8 where the box's short side is >= 8 · 84 = 672 px
    assert set(scales) <= {4.0, 8.0} and len(scales) == 6
