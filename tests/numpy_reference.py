"""Independent NumPy reference for CRATE, CRATE-alpha and a plain ViT.

Written from the equations of docs/design.md sections 1-3 only, as a slow but
transparent oracle for the JAX code. Everything is computed in float64.
Tokens are row vectors: a sequence batch Z has shape (B, N, d); images are
NHWC arrays (B, H, W, C).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _f64(x: ArrayLike) -> Array:
    """Return ``x`` as a float64 ndarray."""
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------
# Elementary operations
# ---------------------------------------------------------------------------


def layer_norm(x: ArrayLike, scale: ArrayLike, bias: ArrayLike, eps: float) -> Array:
    """LN(x) = (x - mean) / sqrt(var + eps) * scale + bias, last axis, biased var."""
    x = _f64(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _f64(scale) + _f64(bias)


def gelu(x: ArrayLike) -> Array:
    """Exact GELU: x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))."""
    x = _f64(x)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def relu(x: ArrayLike) -> Array:
    """ReLU(x) = max(x, 0)."""
    return np.maximum(_f64(x), 0.0)


def softmax(x: ArrayLike, axis: int = -1) -> Array:
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x) along ``axis``.

    Entries equal to -inf get probability 0; a slice that is entirely -inf gives NaN.
    """
    x = _f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def patchify(images: ArrayLike, patch: int) -> Array:
    """'b (h p1) (w p2) c -> b (h w) (p1 p2 c)': (B,H,W,C) -> (B, N, patch*patch*C)."""
    x = _f64(images)
    b, h, w, c = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {(h, w)} not divisible by patch {patch}")
    gh, gw = h // patch, w // patch
    x = x.reshape(b, gh, patch, gw, patch, c)  # b h p1 w p2 c
    x = x.transpose(0, 1, 3, 2, 4, 5)  # b h w p1 p2 c
    return x.reshape(b, gh * gw, patch * patch * c)


def conv_stem(
    images: ArrayLike, kernel: ArrayLike, bias: ArrayLike | None = None
) -> Array:
    """VALID conv, kernel = stride = P, HWIO kernel (P,P,C,d); output (B, N, d).

    out[b, i*gw + j, o] =
        sum_{p1,p2,c} img[b, i*P+p1, j*P+p2, c] * kernel[p1,p2,c,o] + bias[o].
    An einsum over a (B, H/P, P, W/P, P, C) view, independent of ``patchify``.
    """
    x = _f64(images)
    k = _f64(kernel)
    p1, p2, cin, _ = k.shape
    b, h, w, c = x.shape
    if c != cin or p1 != p2:
        raise ValueError(f"kernel {k.shape} incompatible with images {x.shape}")
    gh, gw = h // p1, w // p2
    view = x[:, : gh * p1, : gw * p2, :].reshape(b, gh, p1, gw, p2, c)
    out = np.einsum("bipjqc,pqco->bijo", view, k)
    if bias is not None:
        out = out + _f64(bias)
    return out.reshape(b, gh * gw, k.shape[-1])


def _attention_mask(
    n: int, causal: bool, key_mask: ArrayLike | None
) -> NDArray[np.bool_] | None:
    """Boolean (B or 1, 1, N, N) mask: True where query i may attend to key j."""
    mask = None
    if causal:
        mask = np.tril(np.ones((n, n), dtype=bool))[None, None]
    if key_mask is not None:
        km = np.asarray(key_mask, dtype=bool)[:, None, None, :]
        mask = km if mask is None else (mask & km)
    return mask


def _attend(
    q: Array, k: Array, v: Array, causal: bool, key_mask: ArrayLike | None
) -> tuple[Array, Array]:
    """Per head A = softmax(q k^T / sqrt(p)), masked; returns (A v, A)."""
    p = q.shape[-1]
    scores = np.einsum("bhip,bhjp->bhij", q, k) / math.sqrt(p)
    mask = _attention_mask(q.shape[2], causal, key_mask)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    attn = softmax(scores, axis=-1)
    return np.einsum("bhij,bhjp->bhip", attn, v), attn


def _split_heads(x: Array, heads: int) -> Array:
    """(B, N, K*p) -> (B, K, N, p), head k taking columns k*p:(k+1)*p."""
    b, n, kp = x.shape
    if kp % heads:
        raise ValueError(f"width {kp} not divisible by heads {heads}")
    return x.reshape(b, n, heads, kp // heads).transpose(0, 2, 1, 3)


def _merge_heads(x: Array) -> Array:
    """(B, K, N, p) -> (B, N, K*p)."""
    b, k, n, p = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, k * p)


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


def mssa(
    z: ArrayLike,
    U: ArrayLike,
    U_out: ArrayLike,
    b_out: ArrayLike | None = None,
    *,
    heads: int,
    causal: bool = False,
    key_mask: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """MSSA on normalised z: W = z U, heads W_k, A_k = softmax(W_k W_k^T / sqrt(p)).

    Returns (concat_k(A_k W_k) U_out (+ b_out), attention maps (B, K, N, N)).
    ``causal`` masks keys j > i; ``key_mask`` (B, N) bool, False marks a padding key.
    """
    w = _split_heads(_f64(z) @ _f64(U), heads)
    o, attn = _attend(w, w, w, causal, key_mask)
    out = _merge_heads(o) @ _f64(U_out)
    if b_out is not None:
        out = out + _f64(b_out)
    return out, attn


def ista_three_matmul(x: ArrayLike, W: ArrayLike, eta: float, lam: float) -> Array:
    """CRATE ISTA step: ReLU(x + eta * (x W - x W^T W) - eta * lam)."""
    x = _f64(x)
    W = _f64(W)
    return relu(x + eta * (x @ W - (x @ W.T) @ W) - eta * lam)


def crate_decoder_layer(
    z: ArrayLike, ln_scale: ArrayLike, ln_bias: ArrayLike, W: ArrayLike,
    attn_ln_scale: ArrayLike, attn_ln_bias: ArrayLike, U: ArrayLike, U_out: ArrayLike,
    b_out: ArrayLike, *, heads: int, eps: float,
) -> Array:
    """CRATE decoder layer (docs/design.md §1, CRATE autoencoder blocks):
    G = LN(z) W^T, then z' = G - MSSA(LN(G))."""
    g = layer_norm(z, ln_scale, ln_bias, eps) @ _f64(W).T
    o, _ = mssa(layer_norm(g, attn_ln_scale, attn_ln_bias, eps), U, U_out, b_out, heads=heads)
    return g - o


def mae_targets(images: ArrayLike, patch: int, norm_pix: bool) -> Array:
    """MAE pixel targets (B, N, P*P*C); with norm_pix each patch standardised with its
    unbiased variance (ddof 1, torch's Tensor.var) + 1e-6 under the root."""
    target = patchify(images, patch)
    if norm_pix:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
            target.var(-1, ddof=1, keepdims=True) + 1e-6)
    return target


def masked_patch_mse(pred: ArrayLike, images: ArrayLike, mask: ArrayLike, patch: int,
                     norm_pix: bool) -> Array:
    """MAE loss per example: mean over masked patches of the per-patch pixel MSE, targets
    as ``mae_targets``."""
    per_patch = ((_f64(pred) - mae_targets(images, patch, norm_pix)) ** 2).mean(-1)
    m = np.asarray(mask, np.float64)
    return (per_patch * m).sum(-1) / m.sum(-1)


def mae_loss(pred: ArrayLike, images: ArrayLike, mask: ArrayLike, patch: int,
             norm_pix: bool) -> float:
    """The CRATE-MAE (and MAE) loss, a scalar: the per-patch pixel MSE summed over the
    hidden patches (mask True) of the whole batch, divided by their number."""
    per_patch = ((_f64(pred) - mae_targets(images, patch, norm_pix)) ** 2).mean(-1)
    m = np.asarray(mask, np.float64)
    return float((per_patch * m).sum() / m.sum())


def mae_mask(noise: ArrayLike, ratio: float) -> NDArray[np.bool_]:
    """MAE's masking from per-patch noise (B, N): each row's patches in ascending order of
    noise, the first len_keep = int(N * (1 - ratio)) kept, the rest hidden (True)."""
    noise = np.asarray(noise)
    n = noise.shape[1]
    keep = int(n * (1 - ratio))
    order = np.argsort(noise, axis=1, kind="stable")
    mask = np.ones(noise.shape, bool)
    np.put_along_axis(mask, order[:, :keep], False, axis=1)
    return mask


def odl(
    x: ArrayLike, D: ArrayLike, D1: ArrayLike, eta: float, lam: float, steps: int
) -> tuple[Array, Array]:
    """CRATE-alpha ODL: A_0 = 0, A_{k+1} = ReLU(A_k - eta (A_k D^T - x) D - eta lam).

    Returns (A_steps D1^T, A_steps); D and D1 are (d, C*d).
    """
    x = _f64(x)
    D = _f64(D)
    a = np.zeros((*x.shape[:-1], D.shape[1]))
    for _ in range(steps):
        a = relu(a - eta * ((a @ D.T - x) @ D) - eta * lam)
    return a @ _f64(D1).T, a


def mhsa(
    x: ArrayLike,
    Wq: ArrayLike,
    bq: ArrayLike,
    Wk: ArrayLike,
    bk: ArrayLike,
    Wv: ArrayLike,
    bv: ArrayLike,
    Wo: ArrayLike,
    bo: ArrayLike,
    *,
    heads: int,
    causal: bool = False,
    key_mask: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """ViT MHSA: Q,K,V = x W + b split into heads, A = softmax(Q_k K_k^T / sqrt(p)).

    Returns (concat_k(A_k V_k) Wo + bo, attention maps (B, K, N, N)).
    Weights are in (in, out) orientation.
    """
    x = _f64(x)
    q = _split_heads(x @ _f64(Wq) + _f64(bq), heads)
    k = _split_heads(x @ _f64(Wk) + _f64(bk), heads)
    v = _split_heads(x @ _f64(Wv) + _f64(bv), heads)
    o, attn = _attend(q, k, v, causal, key_mask)
    return _merge_heads(o) @ _f64(Wo) + _f64(bo), attn


def mlp(
    x: ArrayLike, W1: ArrayLike, b1: ArrayLike, W2: ArrayLike, b2: ArrayLike
) -> Array:
    """ViT MLP: GELU(x W1 + b1) W2 + b2."""
    return gelu(_f64(x) @ _f64(W1) + _f64(b1)) @ _f64(W2) + _f64(b2)


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Array:
    """2-D sin-cos embedding (h*w, dim): [sin(x w), cos(x w), sin(y w), cos(y w)].

    omega_i = temperature ** -(i / (dim/4 - 1)), i < dim/4; (y, x) = (row, col) of each
    row-major grid position. For dim == 4 the single frequency is omega_0 = 1.
    """
    if dim % 4:
        raise ValueError(f"dim {dim} must be a multiple of 4")
    q = dim // 4
    i = np.arange(q, dtype=np.float64)
    expo = i / (q - 1) if q > 1 else np.zeros(1)
    omega = 1.0 / temperature**expo
    y, x = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    xo = x.reshape(-1)[:, None] * omega[None, :]
    yo = y.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(xo), np.cos(xo), np.sin(yo), np.cos(yo)], axis=1)


def mae_sincos_2d(h: int, w: int, dim: int) -> Array:
    """MAE's 2-D sin-cos table (h*w, dim), the CRATE-MAE position table.

    The grid is np.meshgrid(columns, rows) (columns first); the first dim/2 channels encode
    grid[0] (the column index), the last dim/2 grid[1] (the row index); each half is
    [sin(pos * omega), cos(pos * omega)] with omega_i = 10000 ** -(i / (dim/4)), i < dim/4.
    """
    if dim % 4:
        raise ValueError(f"dim {dim} must be a multiple of 4")
    q = dim // 4
    omega = 10000.0 ** -(np.arange(q, dtype=np.float64) / q)
    grid = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))

    def half(pos: Array) -> Array:
        angle = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    return np.concatenate([half(grid[0]), half(grid[1])], axis=1)


# ---------------------------------------------------------------------------
# Full models
# ---------------------------------------------------------------------------


def _unwrap_state_dict(sd: Mapping[str, Any]) -> dict[str, Array]:
    """Strip a {'state_dict': ...} wrapper and 'module.' prefixes; cast to float64."""
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    out = {}
    for key, val in sd.items():
        name = key.removeprefix("module.")
        out[name] = _f64(val)
    return out


def _count_layers(keys: Any, pattern: str) -> int:
    """Number of layers = 1 + the largest index ``pattern`` captures in ``keys``."""
    rx = re.compile(pattern)
    idx = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(idx) + 1 if idx else 0


def _prepend_cls_add_pos(x: Array, cls: Array, pos: Array) -> Array:
    """[cls; x] + pos, with cls (1,1,d) broadcast over the batch and pos (1, N+1, d)."""
    b = x.shape[0]
    cls_b = np.broadcast_to(cls.reshape(1, 1, -1), (b, 1, x.shape[-1]))
    return np.concatenate([cls_b, x], axis=1) + pos.reshape(1, -1, x.shape[-1])


def _linear_t(x: Array, sd: Mapping[str, Array], name: str) -> Array:
    """PyTorch nn.Linear: x W^T + b with W (out, in); bias optional."""
    y = x @ sd[f"{name}.weight"].T
    if f"{name}.bias" in sd:
        y = y + sd[f"{name}.bias"]
    return y


def _ln_t(x: Array, sd: Mapping[str, Array], name: str, eps: float) -> Array:
    """PyTorch nn.LayerNorm with ``{name}.weight`` / ``{name}.bias``."""
    return layer_norm(x, sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _ln_j(x: Array, p: Mapping[str, Array], name: str, eps: float) -> Array:
    """Flax LayerNorm with ``{name}/scale`` / ``{name}/bias``."""
    return layer_norm(x, p[f"{name}/scale"], p[f"{name}/bias"], eps)


def crate_torch_forward(
    sd: Mapping[str, Any],
    images: ArrayLike,
    *,
    heads: int,
    patch: int,
    pool: str = "cls",
    eta: float = 0.1,
    lam: float = 0.1,
    eps: float = 1e-5,
    return_intermediates: bool = False,
) -> Array | tuple[Array, dict[str, list[Array]]]:
    """CRATE classifier, PyTorch state_dict layout (NHWC images).

    Z_0 = [cls; LN(Linear(LN(patches)))] + pos; per layer
    Z_half = Z + MSSA(LN0(Z)) with U = qkv.weight^T, U_out = to_out.0.weight^T and
    bias to_out.0.bias;
    Z = ISTA(LN1(Z_half)) with W = fn.weight (no residual);
    logits = Linear(LN(pool(Z))), pool in {'cls', 'mean' (over all tokens)}.
    """
    p = _unwrap_state_dict(sd)
    x = patchify(images, patch)
    x = _ln_t(x, p, "to_patch_embedding.1", eps)
    x = _linear_t(x, p, "to_patch_embedding.2")
    x = _ln_t(x, p, "to_patch_embedding.3", eps)
    z = _prepend_cls_add_pos(x, p["cls_token"], p["pos_embedding"])
    inter: dict[str, list[Array]] = {
        "tokens_in": [z],
        "tokens_mssa": [],
        "tokens_out": [],
        "attention": [],
    }
    for i in range(_count_layers(p, r"transformer\.layers\.(\d+)\.")):
        pre = f"transformer.layers.{i}"
        o, attn = mssa(
            _ln_t(z, p, f"{pre}.0.norm", eps),
            p[f"{pre}.0.fn.qkv.weight"].T,
            p[f"{pre}.0.fn.to_out.0.weight"].T,
            p.get(f"{pre}.0.fn.to_out.0.bias"),
            heads=heads,
        )
        z_half = z + o
        z = ista_three_matmul(
            _ln_t(z_half, p, f"{pre}.1.norm", eps), p[f"{pre}.1.fn.weight"], eta, lam
        )
        inter["tokens_mssa"].append(z_half)
        inter["tokens_out"].append(z)
        inter["attention"].append(attn)
    if pool == "cls":
        pooled = z[:, 0]
    elif pool == "mean":
        pooled = z.mean(axis=1)
    else:
        raise ValueError(f"unknown pool {pool!r}")
    logits = _linear_t(_ln_t(pooled, p, "mlp_head.0", eps), p, "mlp_head.1")
    return (logits, inter) if return_intermediates else logits


def _pool_alpha(z: Array, pool: str) -> Array:
    """'cls' -> token 0; 'gap' -> mean over patch tokens 1..N."""
    if pool == "cls":
        return z[:, 0]
    if pool == "gap":
        return z[:, 1:].mean(axis=1)
    raise ValueError(f"unknown pool {pool!r}")


def crate_alpha_npz_forward(
    params: Mapping[str, Any],
    images: ArrayLike,
    *,
    patch: int,
    pool: str = "cls",
    eta: float = 0.1,
    lam: float = 0.1,
    steps: int = 2,
    eps: float = 1e-6,
    return_intermediates: bool = False,
) -> Array | tuple[Array, dict[str, list[Array]]]:
    """CRATE-alpha classifier, big_vision .npz layout (flat '/' keys, NHWC images).

    Z_0 = [cls; Conv_PxP(img)] + pos; per layer Z_half = Z + MSSA(LN0(Z)) (no out bias),
    Z = Z_half + ODL(LN1(Z_half)); out = head(pool(LN_enc(Z))), or pool(LN_enc(Z))
    when there is no head.
    Heads K are read from the (d, K, p) proj kernel.
    """
    p = {k: _f64(v) for k, v in params.items()}
    kernel = p["embedding/kernel"]
    if kernel.shape[0] != patch:
        raise ValueError(
            f"embedding kernel {kernel.shape} does not match patch {patch}"
        )
    x = conv_stem(images, kernel, p.get("embedding/bias"))
    z = _prepend_cls_add_pos(x, p["cls"], p["pos_embedding"])
    inter: dict[str, list[Array]] = {
        "tokens_in": [z],
        "tokens_mssa": [],
        "tokens_out": [],
        "attention": [],
        "codes": [],
    }
    for i in range(_count_layers(p, r"Transformer/encoderblock_(\d+)/")):
        pre = f"Transformer/encoderblock_{i}"
        att = f"{pre}/MultiHeadDotProductSubspaceAttention_0"
        proj = p[f"{att}/proj/kernel"]
        d, k_heads, hp = proj.shape
        o, attn = mssa(
            _ln_j(z, p, f"{pre}/LayerNorm_0", eps),
            proj.reshape(d, k_heads * hp),
            p[f"{att}/out/kernel"].reshape(k_heads * hp, -1),
            p.get(f"{att}/out/bias"),
            heads=k_heads,
        )
        z_half = z + o
        blk = f"{pre}/OvercompleteISTABlock_0"
        dec, code = odl(
            _ln_j(z_half, p, f"{pre}/LayerNorm_1", eps),
            p[f"{blk}/D"],
            p[f"{blk}/D1"],
            eta,
            lam,
            steps,
        )
        z = z_half + dec
        inter["tokens_mssa"].append(z_half)
        inter["tokens_out"].append(z)
        inter["attention"].append(attn)
        inter["codes"].append(code)
    pooled = _pool_alpha(_ln_j(z, p, "encoder_norm", eps), pool)
    out = pooled @ p["head/kernel"] + p["head/bias"] if "head/kernel" in p else pooled
    return (out, inter) if return_intermediates else out


def crate_alpha_torch_forward(
    sd: Mapping[str, Any],
    images: ArrayLike,
    *,
    heads: int,
    patch: int,
    eta: float = 0.1,
    lam: float = 0.1,
    steps: int = 2,
    eps: float = 1e-6,
    head_eps: float = 1e-5,
) -> Array:
    """CRATE-alpha classifier, PyTorch port layout (conv1 OIHW, NHWC images).

    Z_0 = [cls; Conv(img)] + pos; layers as in ``crate_alpha_npz_forward``
    (U = qkv.weight^T, U_out = to_out.0.weight^T); logits = Linear(LN_head(Z[:, 0])).
    """
    p = _unwrap_state_dict(sd)
    w = p["conv1.weight"]  # (d, C, P, P)
    if w.shape[-1] != patch:
        raise ValueError(f"conv1.weight {w.shape} does not match patch {patch}")
    x = conv_stem(images, w.transpose(2, 3, 1, 0), p.get("conv1.bias"))
    z = _prepend_cls_add_pos(x, p["cls_token"], p["pos_embedding"])
    for i in range(_count_layers(p, r"transformer\.layers\.(\d+)\.")):
        pre = f"transformer.layers.{i}"
        o, _ = mssa(
            _ln_t(z, p, f"{pre}.0.norm", eps),
            p[f"{pre}.0.fn.qkv.weight"].T,
            p[f"{pre}.0.fn.to_out.0.weight"].T,
            p.get(f"{pre}.0.fn.to_out.0.bias"),
            heads=heads,
        )
        z_half = z + o
        dec, _ = odl(
            _ln_t(z_half, p, f"{pre}.1.norm", eps),
            p[f"{pre}.1.fn.D"],
            p[f"{pre}.1.fn.D1"],
            eta,
            lam,
            steps,
        )
        z = z_half + dec
    return _linear_t(_ln_t(z[:, 0], p, "mlp_head.0", head_eps), p, "mlp_head.1")


def vit_forward(
    params: Mapping[str, Any],
    images: ArrayLike,
    *,
    heads: int,
    patch: int,
    pool: str = "cls",
    eps: float = 1e-6,
) -> Array:
    """Pre-norm ViT classifier, big_vision-style flat keys (NHWC images).

    Z_0 = [cls; Conv(img)] + pos; per layer Z = Z + MHSA(LN0(Z)), Z = Z + MLP(LN1(Z));
    out = head(pool(LN_enc(Z))), pool 'cls' or 'gap' (mean of patch tokens);
    the pooled features when there is no head.
    """
    p = {k: _f64(v) for k, v in params.items()}
    if p["embedding/kernel"].shape[0] != patch:
        raise ValueError(
            f"embedding kernel {p['embedding/kernel'].shape} vs patch {patch}"
        )
    x = conv_stem(images, p["embedding/kernel"], p.get("embedding/bias"))
    z = _prepend_cls_add_pos(x, p["cls"], p["pos_embedding"])
    for i in range(_count_layers(p, r"Transformer/encoderblock_(\d+)/")):
        pre = f"Transformer/encoderblock_{i}"
        att = f"{pre}/MultiHeadDotProductAttention_0"
        d = z.shape[-1]

        def qkv(name: str, att: str = att, d: int = d) -> tuple[Array, Array]:
            return p[f"{att}/{name}/kernel"].reshape(d, -1), p[
                f"{att}/{name}/bias"
            ].reshape(-1)

        wq, bq = qkv("query")
        wk, bk = qkv("key")
        wv, bv = qkv("value")
        wo = p[f"{att}/out/kernel"].reshape(-1, d)
        o, _ = mhsa(
            _ln_j(z, p, f"{pre}/LayerNorm_0", eps),
            wq,
            bq,
            wk,
            bk,
            wv,
            bv,
            wo,
            p[f"{att}/out/bias"],
            heads=heads,
        )
        z = z + o
        m = f"{pre}/MlpBlock_0"
        z = z + mlp(
            _ln_j(z, p, f"{pre}/LayerNorm_1", eps),
            p[f"{m}/Dense_0/kernel"],
            p[f"{m}/Dense_0/bias"],
            p[f"{m}/Dense_1/kernel"],
            p[f"{m}/Dense_1/bias"],
        )
    pooled = _pool_alpha(_ln_j(z, p, "encoder_norm", eps), pool)
    return pooled @ p["head/kernel"] + p["head/bias"] if "head/kernel" in p else pooled


# ---------------------------------------------------------------------------
# ToST: token statistics self-attention (docs/design.md section 1, "TSSA and ToST")
# ---------------------------------------------------------------------------


def tssa(
    x: ArrayLike, U: ArrayLike, b: ArrayLike, temp: ArrayLike, U_out: ArrayLike,
    b_out: ArrayLike, *, heads: int,
) -> tuple[Array, Array]:
    """TSSA on normalised x (B, N, d), one head and one sample at a time.

    W = x U + b; per head, column-normalised squares give the membership logits, Pi is the
    softmax over heads; q_k = sum_n Pi w^2 / (sum_n Pi + 1e-8); out = -Pi w / (1 + q_k).
    Returns (out (B, N, d), Pi (B, K, N)).
    """
    w = _split_heads(_f64(x) @ _f64(U) + _f64(b), heads)  # (B, K, N, p)
    bsz, k, n, _ = w.shape
    logits = np.zeros((bsz, k, n))
    for h in range(k):
        col_norm = np.sqrt((w[:, h] ** 2).sum(axis=1, keepdims=True))  # (B, 1, p)
        unit = w[:, h] / np.maximum(col_norm, 1e-12)
        logits[:, h] = (unit ** 2).sum(-1) * _f64(temp)[h]
    pi = softmax(logits, axis=1)
    out = np.zeros_like(w)
    for h in range(k):
        q = np.einsum("bn,bnp->bp", pi[:, h], w[:, h] ** 2)
        q = q / (pi[:, h].sum(-1)[:, None] + 1e-8)
        out[:, h] = -pi[:, h, :, None] * w[:, h] / (1.0 + q[:, None, :])
    return _merge_heads(out) @ _f64(U_out) + _f64(b_out), pi


def causal_tssa(
    x: ArrayLike, U: ArrayLike, b: ArrayLike, temp: ArrayLike, denom_bias: ArrayLike,
    U_out: ArrayLike, b_out: ArrayLike, *, heads: int,
) -> tuple[Array, Array]:
    """Causal TSSA, token by token: every statistic of token n sums over tokens m <= n.

    denom_bias (K, T): added to each of the p normalised squares of token n before the sum.
    Returns (out (B, N, d), Pi (B, K, N)).
    """
    w = _split_heads(_f64(x) @ _f64(U) + _f64(b), heads)  # (B, K, N, p)
    bsz, k, n, _ = w.shape
    beta = _f64(denom_bias)
    logits = np.zeros((bsz, k, n))
    for t in range(n):
        seen = (w[:, :, : t + 1] ** 2).sum(axis=2)  # (B, K, p)
        terms = w[:, :, t] ** 2 / np.maximum(seen, 1e-12) + beta[:, t][None, :, None]
        logits[:, :, t] = terms.sum(-1) * _f64(temp)[None, :]
    pi = softmax(logits, axis=1)
    out = np.zeros_like(w)
    for t in range(n):
        mass = pi[:, :, : t + 1].sum(-1)  # (B, K)
        q = np.einsum("bkm,bkmp->bkp", pi[:, :, : t + 1], w[:, :, : t + 1] ** 2)
        q = q / (mass[..., None] + 1e-8)
        out[:, :, t] = -pi[:, :, t, None] * w[:, :, t] / (1.0 + q)
    return _merge_heads(out) @ _f64(U_out) + _f64(b_out), pi


# ---------------------------------------------------------------------------
# SimDINO's objective (docs/design.md section 1, "SimDINO as the official code runs it")
# ---------------------------------------------------------------------------


def simdino_mcr_loss(
    student: ArrayLike, teacher: ArrayLike, *, eps: float, coeff: float = 1.0,
    expa_type: int = 1, reduce_cov: int = 0, devices: int = 1,
) -> tuple[float, float, float]:
    """(loss, C, E) as `devices` data-parallel workers compute them, averaged over the workers
    (the objective their averaged gradients descend). Crop-major features as the official loss
    views them: student (V, B, p) with the G global views first, teacher (G, B, p), unit rows;
    worker w holds rows w*m ... (w+1)*m - 1 of every view, m = B / devices.

    Per worker: C = sum of the mean cosines of every (teacher view i, student view v != i)
    pair / (G*V - G); E = gamma/G * sum_j sum(log diag chol(I + p/(m*N*eps) * Cov_j)) with
    Cov_j = W_jᵀW_j of its own rows, or summed over all workers (reduce_cov=1), W_j the
    student's global view j, or (student + teacher)/2 of it (expa_type=1);
    gamma = (p + N*m)/(p*N*m); loss = -coeff*C - E."""
    s, t = _f64(student), _f64(teacher)
    views, batch, p = s.shape
    g = t.shape[0]
    m = batch // devices
    own = s[:g] if expa_type == 0 else (s[:g] + t) / 2
    covs = np.stack([[own[j, w * m:(w + 1) * m].T @ own[j, w * m:(w + 1) * m]
                      for j in range(g)] for w in range(devices)])  # (N, G, p, p)
    if reduce_cov:
        covs = np.broadcast_to(covs.sum(0), covs.shape)
    scalar = p / (m * devices * eps)
    gamma = (p + devices * m) / (p * devices * m)
    results = []
    for w in range(devices):
        rows = slice(w * m, (w + 1) * m)
        pairs = [np.mean(np.sum(t[i, rows] * s[v, rows], -1) / (
            np.linalg.norm(t[i, rows], axis=-1) * np.linalg.norm(s[v, rows], axis=-1)))
            for i in range(g) for v in range(views) if v != i]
        comp = sum(pairs) / (g * views - g)
        expa = sum(np.log(np.diag(np.linalg.cholesky(np.eye(p) + scalar * covs[w, j]))).sum()
                   for j in range(g)) / g * gamma
        results.append((-coeff * comp - expa, comp, expa))
    loss, comp, expa = np.mean(results, axis=0)
    return float(loss), float(comp), float(expa)
