"""CRATE-MAE and ViT-MAE: the decoder layer and the whole CRATE-MAE forward against the NumPy
reference of docs/design.md §1 (the official crate_ae: conv stem, MAE's sin-cos table, LayerNorm eps
1e-5 in the blocks and 1e-6 in the final norms), the stem, the table, the masking count, the
loss, the initialisation, the registry sizes, and hidden pixels never reaching a prediction.
The release layout and a PyTorch module of it: test_crate_mae_release.py."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx
from model_utils import flat_params, randomize

from crate_jax import models
from crate_jax.evals.reconstruction import eval_masks, masked_mse, mean_colour_mse, unpatchify
from crate_jax.models.autoencoder import DecoderLayer, hidden_count, mask_from_noise, random_mask
from crate_jax.models.config import TowerConfig
from crate_jax.models.layers import mae_sincos_2d, sincos_2d
from crate_jax.tasks.mae import mae_loss, patch_targets

TINY = dict(image_size=16, width=32, depth=2, heads=4)


def _images(seed=0, n=2, size=16):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _ln(x, flat, name, eps=1e-5):
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
    """CRATE-MAE with mask tokens in the encoder, written out from docs/design.md §1: the conv
    stem without LayerNorm, MAE's table, block LayerNorms eps 1e-5, final ones 1e-6."""
    x = ref.conv_stem(images, p["backbone/stem/kernel"], p["backbone/stem/bias"])
    x = np.where(mask[..., None], p["mask_token"][0], x)
    grid = images.shape[1] // patch
    x = x + ref.mae_sincos_2d(grid, grid, x.shape[-1])
    cls = np.broadcast_to(p["backbone/cls"], (len(x), 1, x.shape[-1]))
    z = np.concatenate([cls, x], axis=1)
    for i in range(depth):
        name = f"backbone/encoder/layers/{i}"
        z_half = z + _mssa(z, p, f"{name}/attn", heads)
        z = ref.ista_three_matmul(_ln(z_half, p, f"{name}/sparse/norm"),
                                  p[f"{name}/sparse/weight"], 0.1, 0.5)
    z = _ln(z, p, "backbone/norm", eps=1e-6)
    for i in range(depth):
        name = f"decoder/layers/{i}"
        d = z.shape[-1]
        z = ref.crate_decoder_layer(
            z, p[f"{name}/norm/scale"], p[f"{name}/norm/bias"], p[f"{name}/weight"],
            p[f"{name}/attn/norm/scale"], p[f"{name}/attn/norm/bias"],
            p[f"{name}/attn/proj"].reshape(d, -1), p[f"{name}/attn/out"].reshape(-1, d),
            p[f"{name}/attn/out_bias"], heads=heads, eps=1e-5)
    z = _ln(z, p, "decoder_norm", eps=1e-6)
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


@pytest.mark.parametrize("n,ratio,hidden", [(64, 0.6, 39), (16, 0.75, 12), (196, 0.75, 147),
                                            (49, 0.75, 37), (10, 0.55, 6)])
def test_masking_count_and_order_are_maes(n, ratio, hidden):
    """len_keep = int(N·(1 − r)) (64 at 0.6 keeps 25, hides 39, where round(r·N) would hide
    38), and the patches kept are those of the smallest noise, as the NumPy reference."""
    assert hidden_count(ratio, n) == hidden
    noise = np.random.default_rng(n).uniform(size=(3, n)).astype(np.float32)
    mask, visible = mask_from_noise(jnp.asarray(noise), ratio)
    want = ref.mae_mask(noise, ratio)
    np.testing.assert_array_equal(np.asarray(mask), want)
    assert (want.sum(1) == hidden).all()
    np.testing.assert_array_equal(np.asarray(visible), np.nonzero(~want)[1].reshape(3, -1))


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
    # the training loss: masked patches of the whole batch, targets with ddof 1 (+ 1e-6)
    loss = mae_loss(jnp.asarray(pred), target, jnp.asarray(mask))
    np.testing.assert_allclose(loss, ref.mae_loss(pred, images, mask, 4, norm_pix), rtol=1e-5)
    if norm_pix:  # the unbiased variance, not the biased one: the two differ measurably
        biased = (ref.patchify(images, 4) - ref.patchify(images, 4).mean(-1, keepdims=True)) \
            / np.sqrt(ref.patchify(images, 4).var(-1, keepdims=True) + 1e-6)
        assert np.abs(np.asarray(target) - biased).max() > 1e-3
        np.testing.assert_allclose(np.asarray(target).var(-1, ddof=1), 1.0, rtol=1e-4)
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
    assert (enc.width, enc.depth, enc.heads, enc.lam) == (768, 12, 12, 0.5)
    assert (enc.eps, enc.final_eps, enc.patch_stem, enc.posemb) == (1e-5, 1e-6, "conv",
                                                                    "sincos2d_mae")
    assert (cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads) == (768, 12, 12)
    large = models.registry.mae_config_for("crate-mae-l/16")
    assert (large.decoder_width, large.decoder_depth, large.decoder_heads) == (1024, 24, 16)
    # the official mae_crate_base's trained parameters (its state_dict without the two fixed
    # tables and the never-called decoder_embed): the conv stem, cls, 12 encoder layers, norm,
    # mask token, 12 decoder layers, decoder norm, pixel head
    d, patch_dim = 768, 768
    layer = 3 * d * d + 5 * d  # U, U_out + b, W and two LayerNorms: the same both ways
    want = (d * patch_dim + d) + d + 12 * layer + 2 * d + d + 12 * layer + 2 * d \
        + (d * patch_dim + patch_dim)
    assert _count("crate-mae-b/16") == want == 43_745_280
    vit = models.registry.mae_config_for("vit-mae-b/16")
    assert (vit.decoder_width, vit.decoder_depth, vit.decoder_heads) == (512, 8, 16)
    assert not vit.mask_in_encoder and cfg.mask_in_encoder
    assert vit.encoder.posemb == "sincos2d"  # the ViT-MAE baseline keeps its table
    # MAE's ViT-B/16: 85.8M encoder (sin-cos positions, no head) + 26.4M decoder
    assert _count("vit-mae-b/16") == pytest.approx(111.9e6, rel=0.01)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("crate-mae-t/4", num_classes=10, **TINY)
    with pytest.raises(ValueError, match="decoder_width"):
        models.create("crate-mae-t/4", decoder_width=30, **TINY)


def test_stem_is_a_convolution_with_bias_and_no_layernorm():
    model = models.create("crate-mae-t/4", **TINY)
    randomize(model, seed=7)
    images = _images(seed=3)
    p = flat_params(model)
    assert not any(k.startswith("backbone/stem/norm") for k in p)
    want = ref.conv_stem(images, p["backbone/stem/kernel"], p["backbone/stem/bias"])
    np.testing.assert_allclose(model.backbone.stem(jnp.asarray(images)), want, rtol=1e-5,
                               atol=1e-5)
    # Z⁰ = [cls; E] + P with P MAE's table (cls row zero)
    z0 = np.asarray(model.backbone.embed(jnp.asarray(images)))
    table = ref.mae_sincos_2d(4, 4, 32)
    np.testing.assert_allclose(z0[:, 1:], want + table, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z0[:, 0], np.broadcast_to(p["backbone/cls"][0], (2, 32)),
                               rtol=1e-6)


def test_mae_sincos_table_matches_numpy_and_differs_from_crate_alphas():
    # a non-square grid pins the order: the first half of the channels is the column index
    got = mae_sincos_2d(3, 5, 16)
    want = ref.mae_sincos_2d(3, 5, 16)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    row, col = 1, 3  # the cell at row 1, column 3: index 1·5 + 3
    omega = 10000.0 ** -(np.arange(4) / 4)  # D/4 = 4 frequencies, exponent i / (D/4)
    np.testing.assert_allclose(got[row * 5 + col], np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]),
        rtol=1e-6, atol=1e-6)
    # CRATE-α's table (exponent i / (D/4 − 1)) is another table, and stays as it was
    assert np.abs(sincos_2d(3, 5, 16) - got).max() > 1e-2
    np.testing.assert_allclose(sincos_2d(3, 5, 16), ref.sincos_2d(3, 5, 16), atol=1e-6)
    model = models.create("crate-mae-t/4", **TINY)
    np.testing.assert_allclose(np.asarray(model.backbone.posemb())[0],
                               np.concatenate([np.zeros((1, 32)), ref.mae_sincos_2d(4, 4, 32)]),
                               atol=1e-6)


def test_initialisation_is_the_official_crate_aes():
    """xavier-uniform Linear weights with zero biases, the stem xavier over its (d, P²·C)
    view with torch's default conv bias, cls and mask token N(0, 0.02), the dictionaries
    kaiming-uniform (crate_ae's initialize_weights)."""
    d = 256
    model = models.create("crate-mae-t/16", seed=3, image_size=32, width=d, depth=1, heads=4)
    p = flat_params(model)

    def uniform_bound(x, bound):  # a U(±bound) sample: within it, and filling it
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
        # the sample std of n uniform draws errs by about √(0.8/4n): 3 of those allowed
        np.testing.assert_allclose(x.std(), bound / np.sqrt(3),
                                   rtol=max(0.02, 3 * np.sqrt(0.2 / x.size)))

    uniform_bound(p["backbone/stem/kernel"], np.sqrt(6 / (768 + d)))
    uniform_bound(p["backbone/stem/bias"], 1 / np.sqrt(768))
    for prefix in ("backbone/encoder/layers/0/attn", "decoder/layers/0/attn"):
        uniform_bound(p[f"{prefix}/proj"], np.sqrt(6 / (2 * d)))
        uniform_bound(p[f"{prefix}/out"], np.sqrt(6 / (2 * d)))
        assert not p[f"{prefix}/out_bias"].any()
    uniform_bound(p["backbone/encoder/layers/0/sparse/weight"], np.sqrt(6 / d))
    uniform_bound(p["decoder/layers/0/weight"], np.sqrt(6 / d))
    for key in ("backbone/cls", "mask_token"):
        np.testing.assert_allclose(p[key].std(), 0.02, rtol=0.15)
    assert not p["pred/bias"].any()


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
