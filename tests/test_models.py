"""Whole models: forwards against the NumPy reference in the checkpoint layouts, parameter
counts of docs/design.md §2, jit/grad, bf16, intermediates, text tower, and configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx
from model_utils import (
    crate_alpha_npz_layout,
    crate_torch_layout,
    flat_params,
    randomize,
    vit_npz_layout,
)

from crate_jax import models
from crate_jax.models import layer_stack

TINY = dict(width=32, depth=2, heads=4, image_size=16, num_classes=5)


def _images(batch=2, size=16, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _tiny(name, seed=1, **overrides):
    model = models.create(name, **{**TINY, **overrides})
    randomize(model, seed)
    model.eval()
    return model


# --- forwards against the reference --------------------------------------------------------

@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_crate_matches_reference(pool):
    model = _tiny("crate-t/8", pool=pool)
    images = _images()
    logits, inter = model(jnp.asarray(images), collect=True)
    want, want_inter = ref.crate_torch_forward(crate_torch_layout(flat_params(model)), images,
                                               heads=4, patch=8, pool=pool,
                                               return_intermediates=True)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    for key in ("tokens_mssa", "tokens_out", "attention"):
        np.testing.assert_allclose(inter[key], np.stack(want_inter[key]), rtol=1e-4, atol=1e-4)
    # CRATE's code is the ISTA output itself
    np.testing.assert_array_equal(inter["codes"], inter["tokens_out"])


@pytest.mark.parametrize("pool,posemb", [("cls", "learn"), ("gap", "learn"), ("cls", "sincos2d")])
def test_crate_alpha_matches_reference(pool, posemb):
    model = _tiny("crate-alpha-ti/8", pool=pool, posemb=posemb)
    images = _images()
    logits, inter = model(jnp.asarray(images), collect=True)
    params = crate_alpha_npz_layout(flat_params(model))
    if posemb == "sincos2d":
        params["pos_embedding"] = np.asarray(model.posemb())
    want, want_inter = ref.crate_alpha_npz_forward(params, images, patch=8, pool=pool,
                                                   return_intermediates=True)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    for key in ("tokens_mssa", "tokens_out", "codes", "attention"):
        np.testing.assert_allclose(inter[key], np.stack(want_inter[key]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inter["tokens_in"], np.reshape(want_inter["tokens_in"], (2, 5, 32)),
                               rtol=1e-5, atol=1e-5)


def test_crate_alpha_config_knobs_reach_the_math():
    """The overcomplete ratio, ISTA steps, η and λ from the config change the computation
    exactly as the reference says."""
    knobs = dict(overcomplete_ratio=2, ista_steps=3, eta=0.05, lam=0.2)
    model = _tiny("crate-alpha-ti/8", **knobs)
    images = _images()
    want = ref.crate_alpha_npz_forward(crate_alpha_npz_layout(flat_params(model)), images,
                                       patch=8, eta=0.05, lam=0.2, steps=3)
    np.testing.assert_allclose(model(jnp.asarray(images)), want, rtol=1e-4, atol=1e-4)
    assert model.encoder.layer(0).sparse.D.shape == (32, 64)
    assert model.encoder.layers.sparse.D.shape == (model.cfg.depth, 32, 64)


def test_crate_alpha_encoder_without_head_returns_features():
    model = _tiny("crate-alpha-ti/8", num_classes=0, pool="gap")
    images = _images()
    want = ref.crate_alpha_npz_forward(crate_alpha_npz_layout(flat_params(model)), images,
                                       patch=8, pool="gap")
    out = model(jnp.asarray(images))
    assert out.shape == (2, 32)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_vit_matches_reference(pool):
    model = _tiny("vit-ti/8", pool=pool, mlp_dim=48)
    images = _images()
    want = ref.vit_forward(vit_npz_layout(flat_params(model)), images, heads=4, patch=8,
                           pool=pool)
    np.testing.assert_allclose(model(jnp.asarray(images)), want, rtol=1e-4, atol=1e-4)


def test_pool_setting_is_honoured():
    """The reference silently ignores pool_type; ours must not."""
    images = jnp.asarray(_images())
    cls_model = _tiny("crate-alpha-ti/8", pool="cls")
    gap_model = _tiny("crate-alpha-ti/8", pool="gap")
    assert not np.allclose(cls_model(images), gap_model(images))


# --- parameter counts (docs/design.md §2), never materialised ----------------------------------

PARAM_COUNTS = {
    "crate-t/16": 6_090_856, "crate-s/16": 13_116_328, "crate-b/16": 22_796_008,
    "crate-l/16": 77_641_192,
    "crate-alpha-b/32": 73_985_512, "crate-alpha-b/16": 72_328_936,
    "crate-alpha-b/8": 72_338_152, "crate-alpha-l/32": 255_982_568,
    "crate-alpha-l/14": 253_650_920, "crate-alpha-l/8": 253_786_088,
    "vit-b/16": 86_567_656,  # timm / big_vision ViT-B/16
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
    abstract = nnx.eval_shape(lambda: models.create(name, num_classes=1000))
    assert models.count_params(abstract) == PARAM_COUNTS[name]


def test_parameter_count_h14_without_head():
    abstract = nnx.eval_shape(lambda: models.create("crate-alpha-H/14", num_classes=0))
    assert models.count_params(abstract) == 525_538_560


@pytest.mark.parametrize("size", ["Ti", "S", "B", "L", "H", "g", "G", "e"])
def test_every_crate_alpha_size_builds_abstractly(size):
    abstract = nnx.eval_shape(lambda: models.create(f"crate-alpha-{size}/14"))
    width, depth, heads = models.registry.VISION_SIZES["crate_alpha"][size]
    layers = abstract.encoder.layers  # stacked: a leading axis of length depth
    assert layers.attn.proj.shape == (depth, width, heads, width // heads)
    assert layers.sparse.D.shape == (depth, width, 4 * width)
    assert layers.sparse.D.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


# --- logical axis names, dtypes, jit and grad --------------------------------------------

def test_every_parameter_has_logical_axes():
    for name in ("crate-t/8", "crate-alpha-ti/8", "vit-ti/8"):
        model = models.create(name, **TINY)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == var[...].ndim, (name, path, axes)
    text = models.create("text-ti", width=32, depth=1, heads=4, vocab_size=50, eot_id=49)
    assert text.token_embedding.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_jit_and_grad_on_tiny_model():
    for name in ("crate-t/8", "crate-alpha-ti/8", "vit-ti/8"):
        model = _tiny(name)
        model.train()
        images = jnp.asarray(_images())
        labels = jnp.array([1, 3])

        @nnx.jit
        def loss_and_grad(model, images, labels):
            def loss_fn(model):
                logits = model(images)
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                                     labels[:, None], axis=1))
            return nnx.value_and_grad(loss_fn)(model)

        loss, grads = loss_and_grad(model, images, labels)
        assert np.isfinite(float(loss))
        leaves = jax.tree.leaves(grads)
        assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
        for g in leaves:
            assert np.isfinite(np.asarray(g)).all()
        # every parameter receives gradient (the whole graph is wired)
        assert all(float(jnp.abs(g).max()) > 0 for g in leaves), name


@pytest.mark.parametrize("name", ["crate-t/8", "crate-alpha-ti/8"])
def test_bf16_compute_close_to_fp32(name):
    fp32 = _tiny(name, seed=2)
    bf16 = _tiny(name, seed=2, dtype="bfloat16")
    images = jnp.asarray(_images())
    for var in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
        assert var.dtype == jnp.float32  # fp32 master weights
    a, b = np.asarray(fp32(images)), np.asarray(bf16(images))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max() + 1e-3)
    assert not np.array_equal(a, b)  # the bf16 path really computes in bf16


def test_remat_policies_give_the_same_gradients():
    images = jnp.asarray(_images())

    def grads(remat):
        model = _tiny("crate-alpha-ti/8", remat=remat)
        return nnx.grad(lambda m: jnp.sum(m(images) ** 2))(model)

    base = jax.tree.leaves(grads("none"))
    for policy in ("minimal", "dots", "full"):
        for a, b in zip(base, jax.tree.leaves(grads(policy)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_is_applied_in_the_backward_pass():
    model = models.create("crate-alpha-ti/8", **TINY, remat="full")
    images = jnp.asarray(_images())
    jaxpr = jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(images))))(model)
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)
    plain = models.create("crate-alpha-ti/8", **TINY, remat="none")
    jaxpr = jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(images))))(plain)
    assert "remat" not in str(jaxpr) and "checkpoint" not in str(jaxpr)


# --- intermediates ------------------------------------------------------------------------

def test_intermediates_do_not_change_the_output():
    model = _tiny("crate-alpha-ti/8")
    images = jnp.asarray(_images())
    plain = model(images)
    out, inter = model(images, collect=True)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)
    n = 1 + (16 // 8) ** 2
    assert inter["tokens_mssa"].shape == (2, 2, n, 32)
    assert inter["codes"].shape == (2, 2, n, 128)
    assert inter["attention"].shape == (2, 2, 4, n, n)
    np.testing.assert_allclose(inter["attention"].sum(-1), 1.0, rtol=1e-5)
    # the last layer's output tokens are what the head sees
    np.testing.assert_allclose(model.head(model.norm(inter["tokens_out"][-1])[:, 0]), plain,
                               rtol=1e-5, atol=1e-5)


def test_patch_keep_drops_patches():
    model = _tiny("crate-alpha-ti/4")
    images = jnp.asarray(_images())
    everything = jnp.tile(jnp.arange(16)[None], (2, 1))
    np.testing.assert_allclose(model(images, patch_keep=everything), model(images),
                               rtol=1e-5, atol=1e-5)
    keep = jnp.array([[0, 5, 9, 15], [1, 2, 3, 4]])
    _, inter = model(images, patch_keep=keep, collect=True)
    full = model.embed(images)
    np.testing.assert_allclose(inter["tokens_in"][0, 1:], full[0, 1 + np.array([0, 5, 9, 15])],
                               rtol=1e-6)
    assert inter["tokens_in"].shape == (2, 5, 32)


# --- text tower --------------------------------------------------------------------------

def _text(**overrides):
    cfg = dict(width=32, depth=2, heads=4, vocab_size=50, context_length=12, eot_id=49)
    model = models.create("text-ti", **{**cfg, **overrides})
    randomize(model, 4, std=0.1)
    model.eval()
    return model


def _tokens():
    tokens = np.zeros((2, 12), np.int32)
    tokens[0, :6] = [3, 7, 8, 9, 10, 49]
    tokens[1, :4] = [5, 6, 11, 49]
    return tokens


@pytest.mark.parametrize("block", ["vit", "crate_alpha"])
def test_causal_text_tower_ignores_the_future(block):
    model = _text(block=block)
    tokens = _tokens()
    changed = tokens.copy()
    changed[0, 4:6] = [20, 21]  # after position 3
    _, a = model(jnp.asarray(tokens), collect=True)
    _, b = model(jnp.asarray(changed), collect=True)
    np.testing.assert_allclose(a["tokens_out"][:, 0, :4], b["tokens_out"][:, 0, :4], rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(a["tokens_out"][:, 0, 4:6], b["tokens_out"][:, 0, 4:6])


def test_text_pooling():
    tokens = _tokens()
    model = _text()
    idx = np.asarray(model.pool_index(jnp.asarray(tokens)))
    np.testing.assert_array_equal(idx, [5, 3])
    no_eot = tokens.copy()
    no_eot[1, 3] = 12
    np.testing.assert_array_equal(model.pool_index(jnp.asarray(no_eot)), [5, 3])

    features, inter = model(jnp.asarray(tokens), collect=True)
    final = np.asarray(model.norm(inter["tokens_out"][-1]))
    np.testing.assert_allclose(features, final[[0, 1], [5, 3]], rtol=1e-5, atol=1e-5)

    mean_model = _text(pool="mean", causal=False)
    feats, inter = mean_model(jnp.asarray(tokens), collect=True)
    final = np.asarray(mean_model.norm(inter["tokens_out"][-1]))
    np.testing.assert_allclose(feats[1], final[1, :4].mean(0), rtol=1e-5, atol=1e-5)


def test_bidirectional_text_masks_padding():
    """Padding keys are masked: more padding leaves the features of the real tokens alone."""
    model = _text(causal=False, pool="mean", context_length=16)
    tokens = _tokens()
    padded = np.zeros((2, 16), np.int32)
    padded[:, :12] = tokens
    np.testing.assert_allclose(model(jnp.asarray(tokens)), model(jnp.asarray(padded)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="context_length"):
        model(jnp.zeros((2, 17), jnp.int32))


def test_pool_positions_first_last_and_last_token():
    tokens = jnp.asarray(_tokens())
    last = _text(pool="last", causal=False)
    np.testing.assert_array_equal(last.pool_index(tokens), [11, 11])
    np.testing.assert_array_equal(_text(pool="first").pool_index(tokens), [0, 0])
    np.testing.assert_array_equal(_text(pool="last_token").pool_index(tokens), [5, 3])
    features, inter = last(tokens, collect=True)
    final = np.asarray(last.norm(inter["tokens_out"][-1]))
    np.testing.assert_allclose(features, final[:, -1], rtol=1e-5, atol=1e-5)


def _numpy_clipa_text(params: dict, tokens: np.ndarray) -> np.ndarray:
    """CLIPA's text tower in NumPy: pre-norm ViT blocks, no attention mask, GELU (tanh),
    final LayerNorm, the last position."""
    def ln(x, p, eps=1e-6):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    x = params["token_embedding"][tokens] + params["pos_embedding"][0, :tokens.shape[1]]
    for i in sorted(params["encoder"]["layers"]):
        layer = params["encoder"]["layers"][i]
        a = layer["attn"]
        y = ln(x, a["norm"])
        q, k, v = (np.einsum("bnd,dhk->bhnk", y, a[n]) + a[n + "_bias"][None, :, None]
                   for n in ("query", "key", "value"))
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        w = np.exp(logits - logits.max(-1, keepdims=True))
        o = (w / w.sum(-1, keepdims=True)) @ v
        x = x + np.einsum("bhnk,hkd->bnd", o, a["out"]) + a["out_bias"]
        m = layer["sparse"]
        h = gelu_tanh(ln(x, m["norm"]) @ m["fc1"]["kernel"] + m["fc1"]["bias"])
        x = x + h @ m["fc2"]["kernel"] + m["fc2"]["bias"]
    return ln(x, params["norm"])[:, -1]


def test_clipa_text_tower_against_numpy():
    """clipa-text: bidirectional, nothing masked (padding changes the feature, unlike a masked
    tower), pooled at the last position, GELU-tanh MLP."""
    model = models.create("clipa-text-b", width=32, depth=2, heads=4, vocab_size=50)
    cfg = model.cfg
    assert (cfg.causal, cfg.mask_padding, cfg.pool, cfg.mlp_activation, cfg.context_length,
            cfg.heads) == (False, False, "last", "gelu_tanh", 32, 4)
    randomize(model, 4, std=0.1)
    model.eval()
    tokens = np.zeros((2, 32), np.int32)
    tokens[0, :6] = [3, 7, 8, 9, 10, 12]
    tokens[1, :3] = [5, 6, 11]
    params = layer_stack.unstack_layers(
        jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    want = _numpy_clipa_text(params, tokens)
    np.testing.assert_allclose(model(jnp.asarray(tokens)), want, rtol=1e-4, atol=1e-5)
    shorter = model(jnp.asarray(tokens[:, :16]))  # less padding: another last position
    assert not np.allclose(shorter, want, atol=1e-3)


@pytest.mark.parametrize("size,width,depth,heads", [("b", 512, 12, 8), ("l", 768, 12, 12),
                                                    ("h", 1024, 24, 16)])
def test_clipa_text_sizes_and_parameter_count(size, width, depth, heads):
    """The CLIPA text family: per layer 12w² + 13w (attention 4w² + 4w, MLP 8w² + 5w, two
    LayerNorms 4w), plus the 32,000-row table, 32 positions and the final LayerNorm."""
    model = nnx.eval_shape(lambda: models.create(f"clipa-text-{size}"))
    assert (model.cfg.width, model.cfg.depth, model.cfg.heads) == (width, depth, heads)
    want = depth * (12 * width ** 2 + 13 * width) + 32_000 * width + 32 * width + 2 * width
    assert models.count_params(model) == want


# --- configuration errors ----------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,field", [
    ("crate-alpha-b/16", dict(heads=7), "width"),
    ("crate-alpha-b/16", dict(image_size=225), "image_size"),
    ("crate-b/16", dict(pool="max"), "pool"),
    ("crate-alpha-b/16", dict(remat="sometimes"), "remat"),
    ("crate-alpha-b/16", dict(dtype="float8"), "dtype"),
    ("crate-alpha-b/16", dict(ista_steps=0), "ista_steps"),
    ("crate-alpha-b/16", dict(attention_impl="flash"), "attention_impl"),
    ("crate-alpha-b/16", dict(depth_multiplier=2), "depth_multiplier"),
    ("text-b", dict(pool="eot"), "eot_id"),
    ("crate-alpha-text-b", dict(eot_id=5, vocab_size=4), "eot_id"),
    ("text-b", dict(pool="cls"), "pool"),
    ("clipa-text-h", dict(mlp_activation="relu"), "mlp_activation"),
    ("crate-alpha-text-b", dict(mlp_activation="gelu_tanh", eot_id=1), "mlp_activation"),
])
def test_bad_configuration_names_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        models.config_for(name, **overrides)


@pytest.mark.parametrize("name", ["crate-z/16", "resnet-50", "crate-alpha-b", "text-b/16",
                                  "crate-alpha-t/16", "clipa-text-ti"])
def test_unknown_model_name(name):
    with pytest.raises(ValueError, match="unknown model name"):
        models.create(name)


def test_names_are_case_insensitive_except_giant_sizes():
    assert models.config_for("CRATE-ALPHA-L/14").width == 1024
    assert models.config_for("crate-alpha-ti/16").width == 192
    assert models.config_for("crate-alpha-g/14").width == 1408
    assert models.config_for("crate-alpha-G/14").width == 1664


def test_image_shape_mismatch_is_reported():
    model = models.create("crate-alpha-ti/8", **TINY)
    with pytest.raises(ValueError, match="image_size"):
        model(jnp.zeros((1, 32, 32, 3)))


# --- FLOPs against docs/design.md §2 (counted on the traced forward's jaxpr, abstract) ---------

def _forward_gflops_per_image(name: str, batch: int) -> float:
    from crate_jax import perf

    abstract = nnx.eval_shape(lambda: models.create(name))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    images = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)
    flops = perf.traced_flops(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, images)
    return flops / batch / 1e9


@pytest.mark.parametrize("name", ["crate-t/16"])
def test_jaxpr_flops_match_xla_on_unrolled_layers(name):
    """XLA counts a while-loop body once, so it is the reference only for the unrolled stack;
    the jaxpr count is the same for the scanned and the unrolled model."""
    from crate_jax import perf

    counts = {}
    for scan in (True, False):
        abstract = nnx.eval_shape(lambda scan=scan: models.create(name, depth=3,
                                                                   scan_layers=scan))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

        def forward(p, x, graphdef=graphdef, rest=rest):
            return nnx.merge(graphdef, p, rest)(x)

        counts[scan] = perf.traced_flops(forward, params, images)
        if not scan:
            xla = perf.xla_flops(jax.jit(forward).lower(params, images).compile())
    assert counts[True] == counts[False]
    assert counts[True] == pytest.approx(xla, rel=0.005)


@pytest.mark.parametrize("name,gflops,rel", [
    ("crate-alpha-b/16", 52.0, 0.005), ("crate-alpha-l/14", 240.0, 0.005),
    ("vit-b/16", 35.3, 0.015),
])
def test_forward_flops_match_design(name, gflops, rel):
    assert _forward_gflops_per_image(name, 1) == pytest.approx(gflops, rel=rel)


def test_crate_fused_ista_flops():
    """docs/design.md's 15.7 GFLOPs for CRATE-B/16 is the three-matmul ISTA. The fused form saves
    4d² FLOPs per token per layer and pays 2d³ per layer per step for M, amortised here over
    a batch of 64 images."""
    d, layers, tokens, batch = 768, 12, 197, 64
    expected = 15.7 - (layers * tokens * 4 * d * d - layers * 2 * d**3 / batch) / 1e9
    assert _forward_gflops_per_image("crate-b/16", batch) == pytest.approx(expected, rel=0.01)
