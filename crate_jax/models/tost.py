"""ToST for images (RobinWu218/ToST tost_vision/tost.py, XCiT-derived; docs/design.md §1):

    E   = ConvBN stem(x)                  3×3 stride-2 convolutions, BatchNorm, GELU between
    Z⁰  = E + Fourier(grid)·W_pos + b_pos   fixed 2-D Fourier features through a 1×1 convolution
    Zᴸ  = Encoder(Z⁰)                      L layers of Z += γ₁⊙TSSA(Z); Z += γ₂⊙MLP(Z)
    Z'  = CA₂(CA₁([cls; Zᴸ]))              2 class-attention blocks (CaiT): only cls queries
    y   = Head(LN(Z')[:, 0])

Names: 'tost-{t,s}-12/16', 'tost-{t,s,m,l}-24/16' (and /8: a 3-convolution stem); t 192 wide
(4 heads), s 384 (8), m 512 (8), l 768 (16). LayerScale γ init 1.0 for 12 layers, 1e-5 for 24.
The stem's BatchNorm statistics are nnx.BatchStat state: batch statistics in training (means
over the global batch: under jit with the batch sharded over the data axes that mean is the
all-device one, as SyncBatchNorm's), running statistics in eval.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.models.config import TowerConfig, _check
from crate_jax.models.encoder import Encoder
from crate_jax.models.layers import (
    Dense,
    LayerNorm,
    normal,
    ones,
    param,
    torch_default_bias,
    torch_default_kernel,
    zeros,
)

# size letter: (width, heads); depth and patch come from the name
TOST_SIZES = {"t": (192, 4), "s": (384, 8), "m": (512, 8), "l": (768, 16)}
TOST_DEPTHS = {12: ("t", "s"), 24: ("t", "s", "m", "l")}
_TOST_NAME = re.compile(r"^tost-(?P<size>[tsml])-(?P<depth>\d+)/(?P<patch>\d+)$", re.IGNORECASE)
FOURIER_HIDDEN = 32  # Fourier features per axis (the reference's hidden_dim)


def is_tost_name(name: str) -> bool:
    return bool(_TOST_NAME.match(name.strip()))


def available_tost() -> list[str]:
    return [f"tost-{s}-{d}/16" for d, sizes in TOST_DEPTHS.items() for s in sizes]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToSTConfig(TowerConfig):
    """A ToST image classifier (num_classes=0: the cls feature after the final norm)."""

    block: str = "tost"
    patch_size: int = 16
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    class_attention_layers: int = 2
    layer_norm_eps: float | None = 1e-6
    batch_norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.1  # PyTorch's: running ← (1 − m)·running + m·batch

    def __post_init__(self):
        super().__post_init__()
        _check(self.block == "tost", "block", f"a ToST model's block is 'tost', got "
               f"{self.block!r}")
        _check(self.patch_size in (8, 16), "patch_size",
               f"the ToST convolutional stem makes patches of 8 or 16, got {self.patch_size}")
        _check(self.image_size % self.patch_size == 0, "image_size",
               f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        _check(self.width % 8 == 0, "width", f"the stem needs width divisible by 8, got "
               f"{self.width}")
        _check(self.num_classes >= 0, "num_classes", f"must be ≥ 0, got {self.num_classes}")
        _check(self.class_attention_layers >= 0, "class_attention_layers",
               f"must be ≥ 0, got {self.class_attention_layers}")
        _check(0 < self.batch_norm_momentum <= 1, "batch_norm_momentum",
               f"must be in (0, 1], got {self.batch_norm_momentum}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


def tost_config_for(name: str, **overrides) -> ToSTConfig:
    """'tost-s-12/16' → its ToSTConfig, overrides applied."""
    match = _TOST_NAME.match(name.strip())
    if not match:
        raise ValueError(f"unknown ToST name {name!r}; known: {', '.join(available_tost())}")
    size, depth = match["size"].lower(), int(match["depth"])
    if depth not in TOST_DEPTHS or size not in TOST_DEPTHS[depth]:
        raise ValueError(f"unknown ToST name {name!r}: no size {size!r} with {depth} layers; "
                         f"known: {', '.join(available_tost())}")
    width, heads = TOST_SIZES[size]
    fields = dict(width=width, heads=heads, depth=depth, patch_size=int(match["patch"]),
                  layer_scale_init=1.0 if depth == 12 else 1e-5)
    known = {f.name for f in dataclasses.fields(ToSTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown} for {name!r}; settings are "
                         f"{sorted(known)}")
    return ToSTConfig(**{**fields, **overrides})


class BatchNorm(nnx.Module):
    """y = (x − μ)/√(σ² + eps)·scale + bias over the channels of NHWC x, in float32.

    Training (use_running_average=False): μ, σ² the batch's (biased σ²); the running
    statistics move as PyTorch's: r ← (1 − m)·r + m·(μ, σ²·n/(n−1)) (unbiased σ² there).
    Eval: the running statistics. They are nnx.BatchStat, not Params: never trained.
    """

    def __init__(self, channels: int, *, axis_name: str | None, eps: float, momentum: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps, self.momentum = eps, momentum
        self.use_running_average = False
        self.scale = param(rngs, ones, (channels,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros, (channels,), (axis_name,), param_dtype)
        stat = dict(out_sharding=(axis_name,), eager_sharding=False)
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), **stat)
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), **stat)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = x32.mean(axes)
            var = jnp.square(x32 - mean).mean(axes)
            n = math.prod(x.shape[:-1])
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = ((1 - m) * self.var[...]
                             + m * jax.lax.stop_gradient(var) * n / max(n - 1, 1))
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class ConvBNStem(nnx.Module):
    """XCiT's ConvPatchEmbed: log2(P) convolutions 3×3, stride 2, padding 1, no bias, each
    followed by BatchNorm, GELU between them; widths d/8, d/4, d/2, d (P = 16) or d/4, d/2,
    d (P = 8). NHWC in, (B, N, d) out, N = (H/P)·(W/P) in row-major order."""

    def __init__(self, cfg: ToSTConfig, *, rngs: nnx.Rngs):
        d, pdt = cfg.width, cfg.storage_dtype
        steps = int(math.log2(cfg.patch_size))
        widths = [cfg.channels] + [d >> (steps - 1 - i) for i in range(steps)]
        self.dtype = cfg.compute_dtype
        self.steps = steps
        for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
            last = i == steps - 1
            axes = (None, None, None, "embed" if last else None)
            # PyTorch's Conv2d default, U(±1/√fan_in): the reference leaves convolutions be
            init = torch_default_kernel(in_axis=(0, 1, 2), out_axis=3)
            # named attributes, not a list: plain string keys in checkpoints and converters
            setattr(self, f"conv_{i}", param(rngs, init, (3, 3, cin, cout), axes, pdt))
            setattr(self, f"norm_{i}", BatchNorm(cout, axis_name=axes[-1],
                                                 eps=cfg.batch_norm_eps,
                                                 momentum=cfg.batch_norm_momentum,
                                                 param_dtype=pdt, rngs=rngs))

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype)
        for i in range(self.steps):
            kernel, norm = getattr(self, f"conv_{i}"), getattr(self, f"norm_{i}")
            if i:
                x = jax.nn.gelu(x, approximate=False)
            x = jax.lax.conv_general_dilated(
                x, kernel[...].astype(self.dtype), (2, 2), ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = norm(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def fourier_features(height: int, width: int, hidden: int = FOURIER_HIDDEN,
                     temperature: float = 10_000.0) -> np.ndarray:
    """(height·width, 2·hidden) features of DETR/XCiT's PositionalEncodingFourier:
    y = 2π·(row + 1)/(height + 1e-6), x likewise; ω_i = temperature^(2⌊i/2⌋/hidden);
    per axis [sin(v/ω₀), cos(v/ω₁), sin(v/ω₂), …]; y's features first, then x's."""
    eps, scale = 1e-6, 2 * math.pi
    rows, cols = np.mgrid[1:height + 1, 1:width + 1].astype(np.float32)
    y = rows / (height + eps) * scale
    x = cols / (width + eps) * scale
    dim_t = temperature ** (2 * (np.arange(hidden) // 2) / hidden)

    def encode(v):
        pos = v[..., None] / dim_t
        out = np.empty_like(pos)
        out[..., 0::2], out[..., 1::2] = np.sin(pos[..., 0::2]), np.cos(pos[..., 1::2])
        return out

    return np.concatenate([encode(y), encode(x)], -1).reshape(height * width, -1)


class ClassAttentionBlock(nnx.Module):
    """CaiT's class-attention block as the reference runs it (tokens_norm=True):

        X₁  = LN₁(Z)
        A   = softmax_j(q_cls·k_jᵀ/√p) per head, q = X₁·W_q + b (cls row only), k, v likewise
        Z   = Z + γ₁ ⊙ [ (A·V)·W_o + b_o ; X₁[1:] ]      (the patch rows add their LN₁ output)
        Z   = LN₂(Z)                                       (every token)
        Z   = Z + [ γ₂ ⊙ MLP(Z[0]) ; Z[1:] ]               (the patch rows are doubled)

    The patch rows follow the reference's code exactly (they feed the next block's keys).
    """

    def __init__(self, cfg: ToSTConfig, *, rngs: nnx.Rngs):
        d, k, pdt, dt = cfg.width, cfg.heads, cfg.storage_dtype, cfg.compute_dtype
        kw = dict(eps=cfg.eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.dtype = dt
        self.norm1 = LayerNorm(d, **kw)
        self.qkv = param(rngs, normal(0.02), (d, 3, k, d // k), ("embed", None, "heads", "kv"),
                         pdt)
        self.qkv_bias = param(rngs, zeros, (3, k, d // k), (None, "heads", "kv"), pdt)
        self.out = Dense(d, d, axes=("mlp", "embed"), kernel_init=normal(0.02), dtype=dt,
                         param_dtype=pdt, rngs=rngs)
        self.norm2 = LayerNorm(d, **kw)
        dense = dict(kernel_init=normal(0.02), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.fc1 = Dense(d, cfg.hidden_dim, axes=("embed", "mlp"), **dense)
        self.fc2 = Dense(cfg.hidden_dim, d, axes=("mlp", "embed"), **dense)
        init = jax.nn.initializers.constant(cfg.layer_scale_init)
        self.gamma1 = param(rngs, init, (d,), ("embed",), pdt)
        self.gamma2 = param(rngs, init, (d,), ("embed",), pdt)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(Z', the cls token's attention (B, K, N+1))."""
        x1 = self.norm1(z)
        qkv = jnp.einsum("bnd,dshk->sbnhk", x1, self.qkv[...].astype(self.dtype))
        q, k, v = qkv + self.qkv_bias[...].astype(self.dtype)[:, None, None]
        logits = jnp.einsum("bhk,bnhk->bhn", q[:, 0], k, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)
        cls = jnp.einsum("bhn,bnhk->bhk", attn.astype(v.dtype), v).reshape(z.shape[0], 1, -1)
        branch = jnp.concatenate([self.out(cls), x1[:, 1:]], axis=1)
        z = self.norm2(z + self.gamma1[...].astype(z.dtype) * branch)
        mlp_out = self.fc2(jax.nn.gelu(self.fc1(z[:, :1]), approximate=False))
        cls_update = self.gamma2[...].astype(z.dtype) * mlp_out
        return z + jnp.concatenate([cls_update, z[:, 1:]], axis=1), attn


class ToSTVision(nnx.Module):
    """Images (B, H, W, C) → logits (B, classes) in float32, or the cls feature (B, d) when
    num_classes=0; with collect=True, (output, intermediates) as the VisionTransformer's
    (tokens_in, and stacked over layers tokens_mssa, tokens_out, codes = the MLP hidden
    activations, attention = Π (L, B, K, N)) plus class_attention (B, K, N+1) per block."""

    def __init__(self, cfg: ToSTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pdt, dt = cfg.width, cfg.storage_dtype, cfg.compute_dtype
        self.stem = ConvBNStem(cfg, rngs=rngs)
        # the reference's 1×1 Conv2d keeps PyTorch's default initialisation
        self.pos_proj = Dense(2 * FOURIER_HIDDEN, d, axes=(None, "embed"),
                              kernel_init=torch_default_kernel(),
                              bias_init=torch_default_bias(2 * FOURIER_HIDDEN), dtype=dt,
                              param_dtype=pdt, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.cls = param(rngs, normal(0.02), (1, 1, d), (None, None, "embed"), pdt)
        for i in range(cfg.class_attention_layers):
            setattr(self, f"class_block_{i}", ClassAttentionBlock(cfg, rngs=rngs))
        self.norm = LayerNorm(d, eps=cfg.eps, dtype=jnp.float32, param_dtype=pdt, rngs=rngs)
        self.head = (Dense(d, cfg.num_classes, axes=("embed", "classes"),
                           kernel_init=normal(0.02), dtype=jnp.float32, param_dtype=pdt,
                           rngs=rngs) if cfg.num_classes else None)

    def embed(self, images: jax.Array) -> jax.Array:
        """Z⁰ = stem(x) + Fourier(grid)·W_pos + b_pos, (B, N, d)."""
        cfg = self.cfg
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(f"images of shape {images.shape[1:]} do not match image_size="
                             f"{cfg.image_size}, channels={cfg.channels} (NHWC expected)")
        patches = self.stem(images)
        features = jnp.asarray(fourier_features(*cfg.grid), patches.dtype)
        return patches + self.pos_proj(features)[None]

    def encode(self, images: jax.Array, *, collect: bool = False):
        """([cls; tokens] after the class-attention blocks (B, 1 + N, d), intermediates)."""
        z0 = self.embed(images)
        z, inter = self.encoder(z0, collect=collect)
        cls = jnp.broadcast_to(self.cls[...].astype(z.dtype), (z.shape[0], 1, z.shape[-1]))
        z = jnp.concatenate([cls, z], axis=1)
        cls_maps = []
        for i in range(self.cfg.class_attention_layers):
            z, attn = getattr(self, f"class_block_{i}")(z)
            cls_maps.append(attn)
        if inter is not None:
            inter["tokens_in"] = z0
            inter["class_attention"] = cls_maps
        return z, inter

    def __call__(self, images: jax.Array, *, collect: bool = False):
        z, inter = self.encode(images, collect=collect)
        features = self.norm(z)[:, 0]
        out = (features if self.head is None else self.head(features)).astype(jnp.float32)
        return (out, inter) if collect else out
