"""Closed-form checks of tests/numpy_reference.py (small shapes, fast)."""

import math

import numpy as np
import pytest
from numpy_reference import (
    conv_stem,
    crate_alpha_npz_forward,
    crate_alpha_torch_forward,
    crate_torch_forward,
    gelu,
    ista_three_matmul,
    layer_norm,
    mhsa,
    mlp,
    mssa,
    odl,
    patchify,
    sincos_2d,
    softmax,
    vit_forward,
)

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def _inline_softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_softmax_rows_sum_to_one_and_stable() -> None:
    x = _rand(3, 4, 5) * 50.0
    x[0, 0, 0] = 1e4
    s = softmax(x)
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-12)
    assert np.all(s >= 0) and np.all(np.isfinite(s))
    np.testing.assert_allclose(softmax(np.array([0.0, math.log(3.0)])), [0.25, 0.75])


def test_layer_norm_zero_mean_unit_var() -> None:
    x = _rand(2, 3, 16) * 4.0 + 7.0
    y = layer_norm(x, np.ones(16), np.zeros(16), 0.0)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-12)
    y2 = layer_norm(x, 2.0 * np.ones(16), np.full(16, 3.0), 0.0)
    np.testing.assert_allclose(y2, 2.0 * y + 3.0, atol=1e-12)


def test_gelu_known_values() -> None:
    np.testing.assert_allclose(
        gelu(np.array([0.0, 1.0, -1.0, 10.0])),
        [0.0, 0.8413447460685429, -0.15865525393145707, 10.0],
        rtol=1e-12,
        atol=1e-15,
    )


def test_patchify_literal() -> None:
    img = np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1)
    expected = np.array(
        [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]],
        dtype=np.float64,
    )
    np.testing.assert_array_equal(patchify(img, 2), expected)


def test_patchify_channel_order() -> None:
    # 2x2 image, 2 channels, one 2x2 patch: order (p1 p2 c).
    img = np.arange(8, dtype=np.float64).reshape(1, 2, 2, 2)
    np.testing.assert_array_equal(patchify(img, 2), [[[0, 1, 2, 3, 4, 5, 6, 7]]])


def test_sincos_literal() -> None:
    s1, c1 = 0.8414709848078965, 0.5403023058681398
    expected = np.array([[0.0, 1.0, 0.0, 1.0], [s1, c1, 0.0, 1.0]])
    np.testing.assert_allclose(sincos_2d(1, 2, 4), expected, atol=1e-15)
    # dim 8, 2x1 grid: omega = [1, 1/T]; position 1 has y = 1, x = 0.
    t = 10000.0
    expected8 = np.array(
        [
            [0, 0, 1, 1, 0, 0, 1, 1],
            [0, 0, 1, 1, s1, math.sin(1 / t), c1, math.cos(1 / t)],
        ],
        dtype=np.float64,
    )
    np.testing.assert_allclose(sincos_2d(2, 1, 8), expected8, atol=1e-15)


def test_mssa_one_head_identity_closed_form() -> None:
    b, n, d = 2, 5, 6
    z = _rand(b, n, d)
    u_out = _rand(d, d)
    b_out = _rand(d)
    out, attn = mssa(z, np.eye(d), u_out, b_out, heads=1)
    a = _inline_softmax(np.einsum("bid,bjd->bij", z, z) / math.sqrt(d))
    np.testing.assert_allclose(attn[:, 0], a, atol=1e-12)
    np.testing.assert_allclose(
        out, np.einsum("bij,bjd->bid", a, z) @ u_out + b_out, atol=1e-12
    )


def test_mssa_heads_are_column_blocks() -> None:
    b, n, d, k = 1, 4, 6, 3
    p = d // k
    z = _rand(b, n, d)
    u = _rand(d, d)
    u_out = _rand(d, d)
    out, attn = mssa(z, u, u_out, heads=k)
    assert attn.shape == (b, k, n, n)
    total = np.zeros((b, n, d))
    for h in range(k):
        w = z @ u[:, h * p : (h + 1) * p]
        a = _inline_softmax(np.einsum("bip,bjp->bij", w, w) / math.sqrt(p))
        total += (a @ w) @ u_out[h * p : (h + 1) * p]
    np.testing.assert_allclose(out, total, atol=1e-12)


def test_mssa_causal_and_key_mask() -> None:
    b, n, d = 2, 4, 4
    z = _rand(b, n, d)
    u_out = _rand(d, d)
    out, attn = mssa(z, np.eye(d), u_out, heads=2, causal=True)
    assert np.all(np.triu(attn[0, 0], 1) == 0)
    np.testing.assert_allclose(out[:, 0], z[:, 0] @ u_out, atol=1e-12)
    km = np.array([[True, True, False, True], [True, False, False, False]])
    out2, attn2 = mssa(z, np.eye(d), u_out, heads=2, key_mask=km)
    assert np.all(attn2[0, :, :, 2] == 0)
    # batch 1 sees only key 0, so every query returns z_0 U_out.
    np.testing.assert_allclose(out2[1], np.tile(z[1, 0] @ u_out, (n, 1)), atol=1e-12)


def test_ista_zero_w_and_fused_form() -> None:
    x = _rand(2, 3, 5)
    eta, lam = 0.1, 0.1
    np.testing.assert_allclose(
        ista_three_matmul(x, np.zeros((5, 5)), eta, lam), np.maximum(x - eta * lam, 0.0)
    )
    w = _rand(5, 5)
    m = np.eye(5) + eta * (w - w.T @ w)
    np.testing.assert_allclose(
        ista_three_matmul(x, w, eta, lam),
        np.maximum(x @ m - eta * lam, 0.0),
        atol=1e-12,
    )


def test_odl_closed_forms() -> None:
    x = _rand(2, 3, 4)
    d1 = _rand(4, 16)
    dec, code = odl(x, np.zeros((4, 16)), d1, 0.1, 0.1, 2)
    assert np.all(code == 0) and np.all(dec == 0)
    dmat = _rand(4, 16)
    dec1, code1 = odl(x, dmat, d1, 0.1, 0.2, 1)
    a1 = np.maximum(0.1 * x @ dmat - 0.1 * 0.2, 0.0)
    np.testing.assert_allclose(code1, a1, atol=1e-12)
    np.testing.assert_allclose(dec1, a1 @ d1.T, atol=1e-12)
    _, code2 = odl(x, dmat, d1, 0.1, 0.2, 2)
    a2 = np.maximum(a1 - 0.1 * (a1 @ dmat.T - x) @ dmat - 0.1 * 0.2, 0.0)
    np.testing.assert_allclose(code2, a2, atol=1e-12)


def test_mhsa_identity_matches_mssa_and_mlp() -> None:
    x = _rand(2, 5, 6)
    eye, zero = np.eye(6), np.zeros(6)
    wo = _rand(6, 6)
    a, attn_a = mhsa(x, eye, zero, eye, zero, eye, zero, wo, zero, heads=3)
    b, attn_b = mssa(x, eye, wo, heads=3)
    np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(attn_a, attn_b, atol=1e-12)
    w1, b1, w2, b2 = _rand(6, 8), _rand(8), _rand(8, 6), _rand(6)
    h = x @ w1 + b1
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    np.testing.assert_allclose(mlp(x, w1, b1, w2, b2), h @ w2 + b2, atol=1e-12)


def test_conv_stem_explicit_loop() -> None:
    img = _rand(2, 6, 4, 3)
    k = _rand(2, 2, 3, 5)
    bias = _rand(5)
    out = conv_stem(img, k, bias)
    exp = np.zeros((2, 6, 5))
    for bb in range(2):
        for i in range(3):
            for j in range(2):
                for o in range(5):
                    exp[bb, i * 2 + j, o] = (
                        np.sum(
                            img[bb, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] * k[..., o]
                        )
                        + bias[o]
                    )
    np.testing.assert_allclose(out, exp, atol=1e-12)


def _alpha_npz(
    d: int, heads: int, patch: int, n: int, depth: int, classes: int | None
) -> dict:
    p = {
        "embedding/kernel": _rand(patch, patch, 3, d),
        "embedding/bias": _rand(d),
        "cls": _rand(1, 1, d),
        "pos_embedding": _rand(1, n + 1, d),
        "encoder_norm/scale": 1 + 0.1 * _rand(d),
        "encoder_norm/bias": 0.1 * _rand(d),
    }
    for i in range(depth):
        pre = f"Transformer/encoderblock_{i}"
        att = f"{pre}/MultiHeadDotProductSubspaceAttention_0"
        p[f"{pre}/LayerNorm_0/scale"] = 1 + 0.1 * _rand(d)
        p[f"{pre}/LayerNorm_0/bias"] = 0.1 * _rand(d)
        p[f"{att}/proj/kernel"] = _rand(d, heads, d // heads) / math.sqrt(d)
        p[f"{att}/out/kernel"] = _rand(heads, d // heads, d) / math.sqrt(d)
        p[f"{pre}/LayerNorm_1/scale"] = 1 + 0.1 * _rand(d)
        p[f"{pre}/LayerNorm_1/bias"] = 0.1 * _rand(d)
        p[f"{pre}/OvercompleteISTABlock_0/D"] = _rand(d, 4 * d) / math.sqrt(d)
        p[f"{pre}/OvercompleteISTABlock_0/D1"] = _rand(d, 4 * d) / math.sqrt(d)
    if classes is not None:
        p["head/kernel"] = _rand(d, classes)
        p["head/bias"] = _rand(classes)
    return p


def test_alpha_npz_stem_matches_patchify() -> None:
    d, patch = 8, 2
    img = _rand(2, 4, 6, 3)
    p = _alpha_npz(d, 2, patch, 6, 0, None)
    _, inter = crate_alpha_npz_forward(p, img, patch=patch, return_intermediates=True)
    tokens = inter["tokens_in"][0]
    expect = (
        patchify(img, patch) @ p["embedding/kernel"].reshape(-1, d)
        + p["embedding/bias"]
    )
    np.testing.assert_allclose(
        tokens[:, 1:] - p["pos_embedding"][:, 1:], expect, atol=1e-12
    )
    np.testing.assert_allclose(
        tokens[:, 0] - p["pos_embedding"][:, 0], p["cls"][:, 0].repeat(2, 0), atol=1e-12
    )


def test_alpha_npz_forward_shapes_and_pools() -> None:
    d, heads, patch = 8, 2, 2
    img = _rand(2, 4, 4, 3)
    p = _alpha_npz(d, heads, patch, 4, 2, 5)
    logits, inter = crate_alpha_npz_forward(
        p, img, patch=patch, return_intermediates=True
    )
    assert logits.shape == (2, 5)
    assert len(inter["codes"]) == 2 and inter["codes"][0].shape == (2, 5, 4 * d)
    assert inter["attention"][1].shape == (2, heads, 5, 5)
    z = inter["tokens_out"][-1]
    zn = layer_norm(z, p["encoder_norm/scale"], p["encoder_norm/bias"], 1e-6)
    np.testing.assert_allclose(
        logits, zn[:, 0] @ p["head/kernel"] + p["head/bias"], atol=1e-12
    )
    gap = crate_alpha_npz_forward(p, img, patch=patch, pool="gap")
    np.testing.assert_allclose(
        gap, zn[:, 1:].mean(1) @ p["head/kernel"] + p["head/bias"], atol=1e-12
    )
    with pytest.raises(ValueError):
        crate_alpha_npz_forward(p, img, patch=patch, pool="bogus")


def test_alpha_torch_matches_npz_port() -> None:
    d, heads, patch, depth = 8, 2, 2, 2
    img = _rand(1, 4, 4, 3)
    p = _alpha_npz(d, heads, patch, 4, depth, 3)
    sd = {
        "conv1.weight": p["embedding/kernel"].transpose(3, 2, 0, 1),
        "conv1.bias": p["embedding/bias"],
        "cls_token": p["cls"],
        "pos_embedding": p["pos_embedding"],
        "mlp_head.0.weight": p["encoder_norm/scale"],
        "mlp_head.0.bias": p["encoder_norm/bias"],
        "mlp_head.1.weight": p["head/kernel"].T,
        "mlp_head.1.bias": p["head/bias"],
    }
    for i in range(depth):
        pre, t = f"Transformer/encoderblock_{i}", f"transformer.layers.{i}"
        att = f"{pre}/MultiHeadDotProductSubspaceAttention_0"
        sd[f"{t}.0.norm.weight"] = p[f"{pre}/LayerNorm_0/scale"]
        sd[f"{t}.0.norm.bias"] = p[f"{pre}/LayerNorm_0/bias"]
        sd[f"{t}.0.fn.qkv.weight"] = p[f"{att}/proj/kernel"].reshape(d, d).T
        sd[f"{t}.0.fn.to_out.0.weight"] = p[f"{att}/out/kernel"].reshape(d, d).T
        sd[f"{t}.1.norm.weight"] = p[f"{pre}/LayerNorm_1/scale"]
        sd[f"{t}.1.norm.bias"] = p[f"{pre}/LayerNorm_1/bias"]
        sd[f"{t}.1.fn.D"] = p[f"{pre}/OvercompleteISTABlock_0/D"]
        sd[f"{t}.1.fn.D1"] = p[f"{pre}/OvercompleteISTABlock_0/D1"]
    a = crate_alpha_npz_forward(p, img, patch=patch)
    b = crate_alpha_torch_forward(sd, img, heads=heads, patch=patch, head_eps=1e-6)
    np.testing.assert_allclose(a, b, atol=1e-10)


def test_crate_torch_one_layer_inline() -> None:
    d, heads, patch, classes = 4, 2, 2, 3
    img = _rand(2, 4, 2, 1)  # 2 patches, patch_dim 4
    pd = patch * patch
    sd = {
        "cls_token": _rand(1, 1, d),
        "pos_embedding": _rand(1, 3, d),
        "to_patch_embedding.1.weight": np.ones(pd),
        "to_patch_embedding.1.bias": np.zeros(pd),
        "to_patch_embedding.2.weight": _rand(d, pd),
        "to_patch_embedding.2.bias": _rand(d),
        "to_patch_embedding.3.weight": np.ones(d),
        "to_patch_embedding.3.bias": np.zeros(d),
        "transformer.layers.0.0.norm.weight": np.ones(d),
        "transformer.layers.0.0.norm.bias": np.zeros(d),
        "transformer.layers.0.0.fn.qkv.weight": _rand(d, d),
        "transformer.layers.0.0.fn.to_out.0.weight": _rand(d, d),
        "transformer.layers.0.0.fn.to_out.0.bias": _rand(d),
        "transformer.layers.0.1.norm.weight": np.ones(d),
        "transformer.layers.0.1.norm.bias": np.zeros(d),
        "transformer.layers.0.1.fn.weight": _rand(d, d),
        "mlp_head.0.weight": np.ones(d),
        "mlp_head.0.bias": np.zeros(d),
        "mlp_head.1.weight": _rand(classes, d),
        "mlp_head.1.bias": _rand(classes),
    }

    def ln(v: np.ndarray) -> np.ndarray:
        c = v - v.mean(-1, keepdims=True)
        return c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)

    # Inline: image (2,4,2,1) with patch 2 -> patches are rows 0-1 and rows 2-3.
    patches = np.stack([img[:, 0:2].reshape(2, 4), img[:, 2:4].reshape(2, 4)], axis=1)
    x = ln(
        ln(patches) @ sd["to_patch_embedding.2.weight"].T
        + sd["to_patch_embedding.2.bias"]
    )
    z = np.concatenate([np.repeat(sd["cls_token"], 2, 0), x], 1) + sd["pos_embedding"]
    w = ln(z) @ sd["transformer.layers.0.0.fn.qkv.weight"].T
    heads_out = []
    for h in range(heads):
        wh = w[..., 2 * h : 2 * h + 2]
        heads_out.append(
            _inline_softmax(wh @ wh.transpose(0, 2, 1) / math.sqrt(2)) @ wh
        )
    o = (
        np.concatenate(heads_out, -1)
        @ sd["transformer.layers.0.0.fn.to_out.0.weight"].T
        + sd["transformer.layers.0.0.fn.to_out.0.bias"]
    )
    zh = z + o
    xx = ln(zh)
    wi = sd["transformer.layers.0.1.fn.weight"]
    zo = np.maximum(xx + 0.1 * (xx @ wi - xx @ wi.T @ wi) - 0.01, 0.0)
    expect = ln(zo[:, 0]) @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"]

    logits, inter = crate_torch_forward(
        sd, img, heads=heads, patch=patch, return_intermediates=True
    )
    np.testing.assert_allclose(inter["tokens_mssa"][0], zh, atol=1e-12)
    np.testing.assert_allclose(inter["tokens_out"][0], zo, atol=1e-12)
    np.testing.assert_allclose(logits, expect, atol=1e-12)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    mean = crate_torch_forward(wrapped, img, heads=heads, patch=patch, pool="mean")
    np.testing.assert_allclose(
        mean,
        ln(zo.mean(1)) @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"],
        atol=1e-12,
    )


def test_vit_forward_zero_residual_branches() -> None:
    # With zero out/Dense_1 weights and biases, each block is the identity.
    d, heads, patch = 4, 2, 2
    img = _rand(1, 4, 4, 3)
    p = {
        "embedding/kernel": _rand(patch, patch, 3, d),
        "embedding/bias": _rand(d),
        "cls": _rand(1, 1, d),
        "pos_embedding": _rand(1, 5, d),
        "encoder_norm/scale": np.ones(d),
        "encoder_norm/bias": np.zeros(d),
        "head/kernel": _rand(d, 2),
        "head/bias": _rand(2),
    }
    pre = "Transformer/encoderblock_0"
    att = f"{pre}/MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):
        p[f"{att}/{name}/kernel"] = _rand(d, heads, d // heads)
        p[f"{att}/{name}/bias"] = _rand(heads, d // heads)
    p[f"{att}/out/kernel"] = np.zeros((heads, d // heads, d))
    p[f"{att}/out/bias"] = np.zeros(d)
    for ln_name in ("LayerNorm_0", "LayerNorm_1"):
        p[f"{pre}/{ln_name}/scale"] = np.ones(d)
        p[f"{pre}/{ln_name}/bias"] = np.zeros(d)
    p[f"{pre}/MlpBlock_0/Dense_0/kernel"] = _rand(d, 8)
    p[f"{pre}/MlpBlock_0/Dense_0/bias"] = _rand(8)
    p[f"{pre}/MlpBlock_0/Dense_1/kernel"] = np.zeros((8, d))
    p[f"{pre}/MlpBlock_0/Dense_1/bias"] = np.zeros(d)
    out = vit_forward(p, img, heads=heads, patch=patch, pool="gap")
    tok = (
        patchify(img, patch) @ p["embedding/kernel"].reshape(-1, d)
        + p["embedding/bias"]
    )
    tok = tok + p["pos_embedding"][:, 1:]
    c = tok - tok.mean(-1, keepdims=True)
    zn = c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(
        out, zn.mean(1) @ p["head/kernel"] + p["head/bias"], atol=1e-12
    )
