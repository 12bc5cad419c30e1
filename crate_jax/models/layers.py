"""Primitives shared by every model: parameters with logical axis names, LayerNorm, Dense,
patch stems, position embeddings, stochastic depth (DropPath) and LayerScale.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `classes`, or None). The names say what an axis is;
`crate_jax.parallel` maps them onto mesh axes. `eager_sharding=False` keeps model construction
independent of any mesh, so the same module builds on a laptop and under `jax.set_mesh`.

Dtypes: parameters are stored in `param_dtype` and cast to the compute `dtype` where they are
used, so bf16 compute runs on fp32 master weights. LayerNorm statistics are always fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

normal = jax.nn.initializers.normal
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
lecun_normal = jax.nn.initializers.lecun_normal
xavier_uniform = jax.nn.initializers.xavier_uniform


def torch_default_kernel(in_axis=-2, out_axis=-1) -> Initializer:
    """PyTorch's nn.Linear weight default, U(±1/√fan_in) (kaiming_uniform with a = √5)."""
    return jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=in_axis,
                                                out_axis=out_axis)


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's nn.Linear bias default, U(±1/√fan_in)."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes,
          dtype: jnp.dtype) -> nnx.Param:
    """A parameter initialised by `init` that carries the logical axis names `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                     eager_sharding=False)


class LayerNorm(nnx.Module):
    """y = (x − mean(x)) / sqrt(var(x) + eps) · scale + bias, over the last axis, in fp32."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = "embed",
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Dense(nnx.Module):
    """y = x·W (+ b), W of shape (in, out)."""

    def __init__(self, din: int, dout: int, *, axes: Axes, use_bias: bool = True,
                 kernel_init: Initializer | None = None, bias_init: Initializer = zeros,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init or lecun_normal(), (din, dout), axes, param_dtype)
        self.bias = param(rngs, bias_init, (dout,), (axes[1],), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) → (B, N, P·P·C): row-major grid, each patch flattened in (p1 p2 c) order."""
    return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch, p2=patch)


class LinearPatchStem(nnx.Module):
    """CRATE stem: E = LN_d( LN_patch(patchify(x)) · W + b ), W of shape (P·P·C, d)."""

    def __init__(self, patch: int, channels: int, width: int, *, eps: float,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.patch = patch
        patch_dim = patch * patch * channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_in = LayerNorm(patch_dim, eps=eps, axis_name=None, **kw)
        # the reference's nn.Linear, with PyTorch's default initialisation
        self.proj = Dense(patch_dim, width, axes=(None, "embed"),
                          kernel_init=torch_default_kernel(),
                          bias_init=torch_default_bias(patch_dim), **kw)
        self.norm_out = LayerNorm(width, eps=eps, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.norm_out(self.proj(self.norm_in(patchify(images, self.patch))))


class ConvPatchStem(nnx.Module):
    """CRATE-α / ViT stem: a VALID convolution with kernel = stride = P.

    The kernel is stored as the (P, P, C, d) HWIO convolution kernel; because the patches do not
    overlap the convolution is exactly patchify(x) · reshape(kernel, (P·P·C, d)) (+ b), which is
    how it is computed (one large matmul instead of a strided convolution).
    """

    def __init__(self, patch: int, channels: int, width: int, *, use_bias: bool,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
                 kaiming: bool = True):
        self.patch = patch
        self.dtype = dtype
        # over the fan-in P·P·C: kaiming-uniform (the CRATE-α reference) or lecun-normal
        # (big_vision's ViT); zero bias
        scaling = (jax.nn.initializers.kaiming_uniform if kaiming else
                   jax.nn.initializers.lecun_normal)
        fan_in_init = scaling(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(rngs, fan_in_init, (patch, patch, channels, width),
                            (None, None, None, "embed"), param_dtype)
        self.bias = param(rngs, zeros, (width,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, images: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        x = patchify(images.astype(self.dtype), self.patch) @ kernel.reshape(-1, kernel.shape[-1])
        if self.bias is not None:
            x = x + self.bias[...].astype(self.dtype)
        return x


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos embedding (height·width, dim), row-major grid.

    ω_i = temperature^(−i/(dim/4 − 1)), i < dim/4; for a cell at row y, column x:
    [sin(xω), cos(xω), sin(yω), cos(yω)].
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {dim}")
    y, x = np.mgrid[:height, :width]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / max(dim // 4 - 1, 1))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def mae_sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table (height·width, dim), row-major grid: the CRATE-MAE
    position table (docs/design.md §1). CRATE-α keeps `sincos_2d`.

    ω_i = 10000^(−i/(dim/4)), i < dim/4 (the exponent divides by dim/4, where `sincos_2d`
    divides by dim/4 − 1); for the cell at row y, column x:
    [sin(xω), cos(xω), sin(yω), cos(yω)] — the column index first, as MAE's
    meshgrid(w, h) grid gives it to the first half of the channels. Computed in float32
    arithmetic, as MAE's NumPy code computes it, so that it is bitwise the table a released
    checkpoint stores.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {dim}")
    quarter = dim // 4
    exponent = np.arange(quarter, dtype=np.float32) / np.float32(quarter)
    omega = np.float32(1.0) / np.float32(10_000.0) ** exponent
    y, x = np.mgrid[:height, :width].astype(np.float32)
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


POSEMB_TABLES = {"sincos2d": sincos_2d, "sincos2d_mae": mae_sincos_2d}


class PositionEmbedding(nnx.Module):
    """The position table for [prefix tokens, patches]: learned (rows ~ N(0, std)) or fixed
    2-D sin-cos ('sincos2d': big_vision's, CRATE-α; 'sincos2d_mae': MAE's, CRATE-MAE) with
    zero rows for the prefix (cls) tokens. Shape (1, prefix + N, d)."""

    def __init__(self, grid: tuple[int, int], width: int, *, kind: str, num_prefix: int = 1,
                 init_std: float = 0.02, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        rows = grid[0] * grid[1] + num_prefix
        if kind == "learn":
            self.embedding = param(rngs, normal(init_std), (1, rows, width),
                                   (None, None, "embed"), param_dtype)
        elif kind in POSEMB_TABLES:
            # A Variable but not a Param: saved with the model, never trained or decayed.
            table = np.concatenate([np.zeros((num_prefix, width), np.float32),
                                    POSEMB_TABLES[kind](*grid, width)])
            self.embedding = nnx.Variable(jnp.asarray(table[None]))
        else:
            raise ValueError(f"posemb must be 'learn' or one of {sorted(POSEMB_TABLES)}, got "
                             f"{kind!r}")

    def __call__(self) -> jax.Array:
        return self.embedding[...]


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    """Stochastic depth on a residual branch x (B, ...): each sample's whole branch is zeroed
    with probability `rate` and the survivors scaled by 1/(1 − rate). `rate` may be traced
    (each scanned layer has its own)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


class StochasticDepth(nnx.Module):
    """The DropPath randomness of a layer stack: one key per layer and branch, drawn from
    the 'dropout' stream; none in `model.eval()` mode (deterministic)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.deterministic = False
        self.rngs = rngs["dropout"].fork()

    def keys(self, layers: int) -> jax.Array | None:
        """(layers, 2) keys, one per residual branch of each layer; None when deterministic."""
        if self.deterministic:
            return None
        return jax.random.split(self.rngs(), (layers, 2))


class LayerScale(nnx.Module):
    """y = γ ⊙ x, with γ ∈ R^d initialised to a small constant (CaiT)."""

    def __init__(self, width: int, init_value: float, *, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.gamma = param(rngs, jax.nn.initializers.constant(init_value), (width,),
                           ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)

