"""Position-table and patch-kernel resizing, and checkpoint adaptation for finetuning, against
independent NumPy computations (half-pixel bilinear matrices built here from the formula)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crate_jax import models
from crate_jax.models import layer_stack
from crate_jax.models.resize import adapt_for_finetune, resize_patch_kernel, resize_posemb

TINY = dict(width=32, depth=2, heads=4, image_size=32)


# --- NumPy reference: half-pixel bilinear, clamped ------------------------------------------

def np_bilinear_1d(old: int, new: int) -> np.ndarray:
    """(new, old) matrix: x_old = (x_new + 0.5)·old/new − 0.5 clamped to [0, old − 1], then
    linear interpolation between its two neighbours."""
    mat = np.zeros((new, old))
    for i in range(new):
        x = np.clip((i + 0.5) * old / new - 0.5, 0.0, old - 1)
        lo = int(np.floor(x))
        hi = min(lo + 1, old - 1)
        frac = x - lo
        mat[i, lo] += 1.0 - frac
        mat[i, hi] += frac
    return mat


def np_resize2d(x: np.ndarray, new: tuple[int, int]) -> np.ndarray:
    """Resize the two leading axes of x (H, W, ...) bilinearly."""
    my, mx = np_bilinear_1d(x.shape[0], new[0]), np_bilinear_1d(x.shape[1], new[1])
    return np.einsum("ia,jb,ab...->ij...", my, mx, x)


def np_patch_matrix(old: int, new: int) -> np.ndarray:
    """B (new², old²): vec(resize(x)) = B vec(x), row-major vec."""
    m = np_bilinear_1d(old, new)
    return np.kron(m, m)


def _abstract(name, **overrides):
    """The model's structure without running its initialisers (their eager compilation is what
    makes building a model slow); `_load` makes it concrete."""
    return nnx.eval_shape(lambda: models.create(name, **{**TINY, **overrides}))


def _params(model, seed):
    """Seeded noise for every parameter (LayerNorm scales near 1), as a pure dict; it stands
    in for the model's initialisation (target) or a pretrained checkpoint (source)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return 1.0 + noise if path[-1].key == "scale" else noise

    return jax.tree_util.tree_map_with_path(
        draw, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _load(model, params):
    """Merge a pure parameter dict into `model` and switch it to eval mode."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    model.eval()
    return model


@nnx.jit
def _forward(model, images):
    return model(images)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + "/") if isinstance(v, dict) else {key: np.asarray(v)}
    return out


def _images(size=32, batch=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)),
                       jnp.float32)


# --- resize_posemb --------------------------------------------------------------------------

def test_posemb_same_grid_is_identity():
    table = np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize_posemb(table, (4, 4)), table)
    np.testing.assert_array_equal(resize_posemb(table, (4, 4), method="bicubic"), table)


@pytest.mark.parametrize("old,new", [(4, 8), (3, 7)])
def test_posemb_linear_table_upsampled_exactly(old, new):
    rng = np.random.default_rng(1)
    d = 32
    a, b, c = rng.normal(size=(3, d))
    r, col = np.mgrid[:old, :old]
    cells = a * r[..., None] + b * col[..., None] + c  # (old, old, d), linear in (row, col)
    cls = rng.normal(size=(1, d))
    table = np.concatenate([cls, cells.reshape(-1, d)])[None].astype(np.float32)

    out = np.asarray(resize_posemb(table, (new, new)))
    assert out.shape == (1, 1 + new * new, d)
    np.testing.assert_array_equal(out[0, 0], table[0, 0])  # cls row untouched
    coord = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
    want = a * coord[:, None, None] + b * coord[None, :, None] + c
    np.testing.assert_allclose(out[0, 1:].reshape(new, new, d), want, rtol=1e-5, atol=1e-5)


def test_posemb_non_square_grid_and_prefix():
    rng = np.random.default_rng(2)
    table = rng.normal(size=(1, 2 + 2 * 3, 5)).astype(np.float32)
    out = np.asarray(resize_posemb(table, (4, 6), old_grid=(2, 3), num_prefix=2))
    assert out.shape == (1, 2 + 24, 5)
    np.testing.assert_array_equal(out[0, :2], table[0, :2])
    want = np_resize2d(table[0, 2:].reshape(2, 3, 5), (4, 6))
    np.testing.assert_allclose(out[0, 2:].reshape(4, 6, 5), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,grid", [("bilinear", (4, 4)), ("bilinear", (5, 11)),
                                         ("bicubic", (12, 12))])
def test_posemb_constant_stays_constant(method, grid):
    table = np.full((1, 1 + 64, 4), 0.25, np.float32)
    table[0, 0] = 7.0
    out = np.asarray(resize_posemb(table, grid, method=method))
    assert out.shape == (1, 1 + grid[0] * grid[1], 4)
    np.testing.assert_array_equal(out[0, 0], 7.0)
    np.testing.assert_allclose(out[0, 1:], 0.25, rtol=1e-5)


def test_posemb_errors():
    table = np.zeros((1, 1 + 6, 4), np.float32)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_posemb(table, (4, 4))
    with pytest.raises(ValueError, match="does not match"):
        resize_posemb(table, (4, 4), old_grid=(2, 2))
    with pytest.raises(ValueError, match="method"):
        resize_posemb(table, (4, 4), old_grid=(2, 3), method="nearest")
    with pytest.raises(ValueError, match="prefix"):
        resize_posemb(np.zeros((1, 17), np.float32), (2, 2))


# --- resize_patch_kernel --------------------------------------------------------------------

def test_pi_upsample_preserves_tokens():
    rng = np.random.default_rng(3)
    p, new, c, d = 8, 16, 3, 5
    w = rng.normal(size=(p, p, c, d)).astype(np.float32)
    w_new = np.asarray(resize_patch_kernel(w, new))
    assert w_new.shape == (new, new, c, d)
    x = rng.normal(size=(10, p, p, c))
    x_up = np.stack([np_resize2d(xi, (new, new)) for xi in x])
    tokens = np.einsum("nhwc,hwcd->nd", x, w)
    tokens_up = np.einsum("nhwc,hwcd->nd", x_up, w_new)
    np.testing.assert_allclose(tokens_up, tokens, rtol=1e-4, atol=1e-4 * np.abs(tokens).max())
    # and it is the minimum-norm solution pinv(Bᵀ) w = B (BᵀB)⁻¹ w
    b = np_patch_matrix(p, new)
    want = b @ np.linalg.solve(b.T @ b, w.reshape(p * p, -1))
    np.testing.assert_allclose(w_new.reshape(new * new, -1), want, rtol=1e-4, atol=1e-5)


def test_pi_downsample_is_least_squares():
    rng = np.random.default_rng(4)
    p, new = 16, 14
    w = rng.normal(size=(p, p, 2, 3)).astype(np.float32)
    w_new = np.asarray(resize_patch_kernel(w, new))
    assert w_new.shape == (new, new, 2, 3)
    b = np_patch_matrix(p, new)
    want, *_ = np.linalg.lstsq(b.T, w.reshape(p * p, -1), rcond=None)
    np.testing.assert_allclose(w_new.reshape(new * new, -1), want, rtol=1e-4, atol=1e-4)


def test_kernel_bilinear_and_identity():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 4, 3, 2)).astype(np.float32)
    np.testing.assert_array_equal(resize_patch_kernel(w, 4), w)
    np.testing.assert_array_equal(resize_patch_kernel(w, 4, method="bilinear"), w)
    out = np.asarray(resize_patch_kernel(w, 6, method="bilinear"))
    np.testing.assert_allclose(out, np_resize2d(w, (6, 6)), rtol=1e-5, atol=1e-6)
    assert resize_patch_kernel(w.astype(jnp.bfloat16), 6).dtype == jnp.bfloat16
    # under jit (a size not built before: B is then built while tracing)
    jitted = jax.jit(lambda k: resize_patch_kernel(k, 5, method="bilinear"))(w)
    np.testing.assert_allclose(jitted, np_resize2d(w, (5, 5)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        resize_patch_kernel(w, 6, method="bicubic")
    with pytest.raises(ValueError, match="square"):
        resize_patch_kernel(np.zeros((4, 3, 3, 2)), 6)


# --- adapt_for_finetune ---------------------------------------------------------------------

def test_adapt_crate_alpha_patch_and_resolution_change():
    tgt_model = _abstract("crate-alpha-ti/4", num_classes=7)
    src = _params(_abstract("crate-alpha-ti/8", num_classes=5), seed=1)
    tgt = _params(tgt_model, seed=2)

    new, notes = adapt_for_finetune(src, tgt)
    fs, ft, fn = _flat(src), _flat(tgt), _flat(new)
    assert {k: v.shape for k, v in fn.items()} == {k: v.shape for k, v in ft.items()}
    assert new["encoder"]["layers"]["sparse"]["D"].shape == (2, 32, 128)  # stacked kept

    # stem: PI-resized 8 -> 4 (a downsample: the least-squares solution of Bᵀŵ = w)
    b = np_patch_matrix(8, 4)
    want, *_ = np.linalg.lstsq(b.T, fs["stem/kernel"].reshape(64, -1), rcond=None)
    np.testing.assert_allclose(fn["stem/kernel"].reshape(16, -1), want, rtol=1e-4, atol=1e-5)
    # position table: cls row kept, 4x4 grid -> 8x8 bilinear
    pos_s, pos_n = fs["posemb/embedding"][0], fn["posemb/embedding"][0]
    np.testing.assert_array_equal(pos_n[0], pos_s[0])
    np.testing.assert_allclose(pos_n[1:].reshape(8, 8, 32),
                               np_resize2d(pos_s[1:].reshape(4, 4, 32), (8, 8)),
                               rtol=1e-5, atol=1e-6)
    # head: the target's init; everything else: the source, exactly
    for key in fn:
        if key.startswith("head/"):
            np.testing.assert_array_equal(fn[key], ft[key])
        elif key not in ("stem/kernel", "posemb/embedding"):
            np.testing.assert_array_equal(fn[key], fs[key], err_msg=key)
    text = "\n".join(notes)
    assert "posemb/embedding resized 4x4 -> 8x8" in text
    assert "stem/kernel resized 8x8 -> 4x4 (pi)" in text
    assert "head/kernel re-initialised" in text

    # merge into the target model and run it
    model = _load(tgt_model, new)
    logits = _forward(model, _images())
    assert logits.shape == (2, 7) and bool(jnp.isfinite(logits).all())
    np.testing.assert_array_equal(np.asarray(model.stem.kernel[...]), fn["stem/kernel"])
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), ft["head/kernel"])


def test_adapt_same_model_reinit_head_keeps_features():
    src = _params(_abstract("crate-alpha-ti/8", num_classes=5), seed=3)
    tgt = _params(_abstract("crate-alpha-ti/8", num_classes=7), seed=4)
    new, notes = adapt_for_finetune(src, tgt)
    assert not any("resized" in n for n in notes)

    # feature towers (num_classes=0) loaded from the source and from the finetune params
    def features(params):
        tower = _abstract("crate-alpha-ti/8", num_classes=0)
        loaded, tower_notes = adapt_for_finetune(params, _params(tower, seed=9))
        assert any("head/kernel dropped" in n for n in tower_notes)
        return np.asarray(_forward(_load(tower, loaded), _images()))

    feats = features(src)
    assert feats.shape == (2, 32)
    np.testing.assert_array_equal(features(new), feats)
    # and the finetune model's head is its fresh one
    np.testing.assert_array_equal(new["head"]["kernel"], tgt["head"]["kernel"])
    np.testing.assert_array_equal(new["head"]["bias"], tgt["head"]["bias"])


def test_adapt_head_rules_and_dtype():
    src = _params(_abstract("crate-alpha-ti/8", num_classes=5), seed=0)
    same = _params(_abstract("crate-alpha-ti/8", num_classes=5), seed=1)
    new, _ = adapt_for_finetune(src, same, reinit_head=False)
    np.testing.assert_array_equal(new["head"]["kernel"], src["head"]["kernel"])
    other = _params(_abstract("crate-alpha-ti/8", num_classes=7), seed=1)
    new, notes = adapt_for_finetune(src, other, reinit_head=False)
    np.testing.assert_array_equal(new["head"]["kernel"], other["head"]["kernel"])
    assert any("head/kernel re-initialised: source shape (32, 5)" in n for n in notes)
    # without reinit_head the head must come from the source
    headless = {k: v for k, v in src.items() if k != "head"}
    with pytest.raises(ValueError, match="missing from source: head/bias, head/kernel"):
        adapt_for_finetune(headless, same, reinit_head=False)
    new, _ = adapt_for_finetune(headless, same)
    np.testing.assert_array_equal(new["head"]["kernel"], same["head"]["kernel"])
    # the target's dtypes win; abstract targets are fine
    abstract = nnx.to_pure_dict(nnx.state(
        _abstract("crate-alpha-ti/8", num_classes=5, param_dtype="bfloat16"), nnx.Param))
    new, notes = adapt_for_finetune(src, abstract, reinit_head=False)
    assert new["encoder"]["layers"]["sparse"]["D"].dtype == jnp.bfloat16
    assert any("cast float32 -> bfloat16" in n for n in notes)


def test_adapt_errors():
    src = _params(_abstract("crate-alpha-ti/8", num_classes=5), seed=0)
    tgt = _params(_abstract("crate-alpha-ti/4", num_classes=5), seed=1)

    narrow = _params(_abstract("crate-alpha-ti/8", num_classes=5, overcomplete_ratio=2), seed=1)
    with pytest.raises(ValueError, match=r"encoder/layers/0/sparse/D: source \(32, 128\) vs "
                                         r"target \(32, 64\)") as err:
        adapt_for_finetune(src, narrow)
    assert "encoder/layers/1/sparse/D1" in str(err.value)

    per_layer = layer_stack.unstack_layers(src)  # a source in the per-layer layout
    pruned = {**per_layer, "encoder": {"layers": {
        0: per_layer["encoder"]["layers"][0],
        1: {**per_layer["encoder"]["layers"][1], "attn": {}}}}}
    with pytest.raises(ValueError, match=r"missing from source: .*encoder/layers/1/attn/proj"):
        adapt_for_finetune(pruned, tgt)

    extra = {**src, "extra": {"w": np.zeros(3)}}
    with pytest.raises(ValueError, match="not in target: extra/w"):
        adapt_for_finetune(extra, tgt)

    with pytest.raises(ValueError, match=r"stem/kernel.*resize_stem=False"):
        adapt_for_finetune(src, tgt, resize_stem=False)

    crate_src = _params(_abstract("crate-t/8", num_classes=5), seed=0)
    crate_tgt = _params(_abstract("crate-t/4", num_classes=5), seed=1)
    with pytest.raises(ValueError, match="CRATE linear stem cannot be resized") as err:
        adapt_for_finetune(crate_src, crate_tgt)
    assert "stem/proj/kernel (192, 32) -> (48, 32)" in str(err.value)
    # CRATE at a new resolution, same patch: fine (only the position table changes)
    crate_big = _params(_abstract("crate-t/8", num_classes=5, image_size=64), seed=1)
    new, notes = adapt_for_finetune(crate_src, crate_big)
    assert new["posemb"]["embedding"].shape == (1, 65, 32)
    assert any("resized 4x4 -> 8x8" in n for n in notes)
