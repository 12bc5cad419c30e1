"""CRATE-MAE and ViT-MAE: the decoder layer and the whole CRATE-MAE forward against the NumPy
reference of DESIGN.md §1, the masking, the loss, the registry sizes, and hidden pixels never
reaching a prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx
from model_utils import flat_params, randomize

from crate_jax import models
from crate_jax.evals.reconstruction import eval_masks, mean_colour_mse, unpatchify
from crate_jax.models.autoencoder import DecoderLayer, random_mask
from crate_jax.models.config import TowerConfig
from crate_jax.tasks.mae import masked_mse, patch_targets

TINY = dict(image_size=16, width=32, depth=2, heads=4)


def _images(seed=0, n=2, size=16):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _ln(x, flat, name, eps=1e-6):
    return ref.layer_norm(x, flat[f"{name}/scale"], flat[f"{name}/bias"], eps)


def _mssa(x, flat, name, heads):
    d = x.shape[-1]
    return ref.mssa(_ln(x, flat, f"{name}/norm"), flat[f"{name}/proj"].reshape(d, -1),
                    flat[f"{name}/out"].reshape(-1, d), flat.get(f"{name}/out_bias"),
                    heads=heads)[0]


def test_decoder_layer_matches_numpy():
    cfg = TowerConfig(block="crate", width=32, depth=1, heads=4, layer_norm_eps=1e-6)
    layer = DecoderLayer(cfg, rngs=nnx.Rngs(0))
    randomize(layer, seed=3)
    z = np.random.default_rng(1).normal(size=(2, 5, 32)).astype(np.float32)
    p = flat_params(layer)
    want = ref.crate_decoder_layer(
        z, p["norm/scale"], p["norm/bias"], p["weight"], p["attn/norm/scale"],
        p["attn/norm/bias"], p["attn/proj"].reshape(32, -1), p["attn/out"].reshape(-1, 32),
        p["attn/out_bias"], heads=4, eps=1e-6)
    np.testing.assert_allclose(layer(jnp.asarray(z)), want, rtol=1e-4, atol=1e-4)


def numpy_crate_mae(p: dict, images: np.ndarray, mask: np.ndarray, *, patch: int, depth: int,
                    heads: int) -> np.ndarray:
    """CRATE-MAE with mask tokens in the encoder, written out from DESIGN.md §1."""
    x = ref.patchify(images, patch)
    x = _ln(x, p, "backbone/stem/norm_in")
    x = x @ p["backbone/stem/proj/kernel"] + p["backbone/stem/proj/bias"]
    x = _ln(x, p, "backbone/stem/norm_out")
    x = np.where(mask[..., None], p["mask_token"][0], x)
    grid = images.shape[1] // patch
    x = x + ref.sincos_2d(grid, grid, x.shape[-1])
    cls = np.broadcast_to(p["backbone/cls"], (len(x), 1, x.shape[-1]))
    z = np.concatenate([cls, x], axis=1)
    for i in range(depth):
        name = f"backbone/encoder/layers/{i}"
        z_half = z + _mssa(z, p, f"{name}/attn", heads)
        z = ref.ista_three_matmul(_ln(z_half, p, f"{name}/sparse/norm"),
                                  p[f"{name}/sparse/weight"], 0.1, 0.5)
    z = _ln(z, p, "backbone/norm")
    for i in range(depth):
        name = f"decoder/layers/{i}"
        d = z.shape[-1]
        z = ref.crate_decoder_layer(
            z, p[f"{name}/norm/scale"], p[f"{name}/norm/bias"], p[f"{name}/weight"],
            p[f"{name}/attn/norm/scale"], p[f"{name}/attn/norm/bias"],
            p[f"{name}/attn/proj"].reshape(d, -1), p[f"{name}/attn/out"].reshape(-1, d),
            p[f"{name}/attn/out_bias"], heads=heads, eps=1e-6)
    z = _ln(z, p, "decoder_norm")
    return (z @ p["pred/kernel"] + p["pred/bias"])[:, 1:]


def test_crate_mae_forward_matches_numpy():
    model = models.create("crate-mae-t/4", **TINY)
    randomize(model, seed=5, std=0.1)
    images = _images()
    mask, visible = random_mask(jax.random.key(0), 2, 16, 0.75)
    got = model.reconstruct(jnp.asarray(images), mask, visible)
    want = numpy_crate_mae(flat_params(model), images, np.asarray(mask), patch=4, depth=2,
                           heads=4)
    assert got.shape == (2, 16, 4 * 4 * 3)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name,overrides", [
    ("crate-mae-t/4", {}),
    ("crate-mae-t/4", {"mask_in_encoder": False}),
    ("vit-mae-ti/4", {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}),
])
def test_hidden_pixels_never_reach_a_prediction(name, overrides):
    model = models.create(name, **TINY, **overrides)
    randomize(model, seed=2, std=0.1)
    images = _images(seed=1)
    mask, visible = random_mask(jax.random.key(1), 2, 16, 0.75)
    pixel_mask = np.asarray(unpatchify(np.repeat(np.asarray(mask)[..., None], 48, -1),
                                       (4, 4), 4))
    other = np.where(pixel_mask, _images(seed=9), images)  # new pixels in hidden patches only
    base = model.reconstruct(jnp.asarray(images), mask, visible)
    np.testing.assert_allclose(model.reconstruct(jnp.asarray(other), mask, visible), base,
                               rtol=1e-5, atol=1e-5)
    visible_changed = np.where(pixel_mask, images, _images(seed=9))
    moved = np.abs(model.reconstruct(jnp.asarray(visible_changed), mask, visible) - base).max()
    assert moved > 1e-3  # and the visible ones do


def test_random_mask_hides_exactly_the_ratio_and_differs_per_example():
    mask, visible = random_mask(jax.random.key(3), 64, 49, 0.75)
    mask, visible = np.asarray(mask), np.asarray(visible)
    assert (mask.sum(1) == 37).all() and visible.shape == (64, 12)
    assert (np.diff(visible, axis=1) > 0).all()  # ascending, no repeats
    assert not mask[np.arange(64)[:, None], visible].any()
    assert len({m.tobytes() for m in mask}) == 64
    # every position is hidden about 3/4 of the time
    assert 0.6 < mask.mean(0).min() and mask.mean(0).max() < 0.9
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(jax.random.key(0), 1, 4, 1.0)


def test_eval_masks_depend_only_on_the_example_index():
    index = jnp.arange(10)
    whole, _ = eval_masks(index, 16, 0.75)
    halves = jnp.concatenate([eval_masks(index[:3], 16, 0.75)[0],
                              eval_masks(index[3:], 16, 0.75)[0]])
    np.testing.assert_array_equal(whole, halves)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_matches_numpy(norm_pix):
    images = _images(seed=4, n=3)
    pred = np.random.default_rng(5).normal(size=(3, 16, 48)).astype(np.float32)
    mask = np.asarray(random_mask(jax.random.key(2), 3, 16, 0.5)[0])
    target = patch_targets(jnp.asarray(images), 4, norm_pix)
    got = masked_mse(jnp.asarray(pred), target, jnp.asarray(mask))
    np.testing.assert_allclose(got, ref.masked_patch_mse(pred, images, mask, 4, norm_pix),
                               rtol=1e-5)
    # the baseline: each image's mean colour predicted for every pixel
    mean = np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape)
    np.testing.assert_allclose(
        mean_colour_mse(jnp.asarray(images), 4, jnp.asarray(mask)),
        ref.masked_patch_mse(ref.patchify(mean, 4), images, mask, 4, False), rtol=1e-5)


def _count(name, **overrides):
    return models.count_params(nnx.eval_shape(lambda: models.create(name, **overrides)))


def test_registry_sizes_and_parameter_counts():
    cfg = models.registry.mae_config_for("crate-mae-b/16")
    enc = cfg.encoder
    assert (enc.width, enc.depth, enc.heads, enc.lam, enc.eps) == (768, 12, 12, 0.5, 1e-6)
    assert (cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads) == (768, 12, 12)
    # CRATE-B/16 without its head (DESIGN.md §2: 22,796,008 with a 1000-class head, whose
    # posemb is learned): the encoder, plus mask token, decoder, decoder LN and pixel head
    d, n, patch_dim = 768, 196, 768
    encoder = 22_796_008 - (d * 1000 + 1000) - (n + 1) * d
    decoder_layer = d * d + 2 * d + (2 * d * d + d) + 2 * d  # W, LN, MSSA (U, U_out, b), LN
    want = encoder + d + 12 * decoder_layer + 2 * d + (d * patch_dim + patch_dim)
    assert _count("crate-mae-b/16") == want
    vit = models.registry.mae_config_for("vit-mae-b/16")
    assert (vit.decoder_width, vit.decoder_depth, vit.decoder_heads) == (512, 8, 16)
    assert not vit.mask_in_encoder and cfg.mask_in_encoder
    # MAE's ViT-B/16: 85.8M encoder (sin-cos positions, no head) + 26.4M decoder
    assert _count("vit-mae-b/16") == pytest.approx(111.9e6, rel=0.01)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("crate-mae-t/4", num_classes=10, **TINY)
    with pytest.raises(ValueError, match="decoder_width"):
        models.create("crate-mae-t/4", decoder_width=30, **TINY)


@pytest.mark.parametrize("ratio,message", [(1.5, "mask_ratio=1.5 hides 24 of 16 patches"),
                                           (0.99, "mask_ratio=0.99 hides 16 of 16 patches")])
def test_a_mask_ratio_that_hides_nothing_or_everything_fails_before_the_run(tmp_path, ratio,
                                                                            message):
    import os
    import sys

    from crate_jax.train.loop import train_and_evaluate
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import demo_mae

    config = demo_mae.get_config("smoke")
    config.mask_ratio = ratio
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
