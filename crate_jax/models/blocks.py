"""The blocks: MSSA, ISTA (CRATE), ODL (CRATE-α), and the ViT MHSA/MLP for comparison.

Row convention: a token is a row vector, a sequence Z ∈ R^{N×d}; tensors are (B, N, d).
Each block applies its own pre-norm LayerNorm (docs/design.md §1) and returns only its branch;
the layers in `encoder.py` add residuals, DropPath and LayerScale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from crate_jax.models.layers import (
    Dense,
    LayerNorm,
    normal,
    param,
    torch_default_bias,
    torch_default_kernel,
    zeros,
)
from crate_jax.models.symmetric import gram, self_attention

kaiming_uniform = jax.nn.initializers.kaiming_uniform

# The values the remat policy 'minimal' (encoder.REMAT_POLICIES) keeps for the backward pass:
# the products that cost a matmul to recompute, and MSSA's softmax (symmetric.py's backward
# pass reads it). Everything else a layer computes (norms, activations, ReLU masks, MHSA's
# softmax) is recomputed from them in the backward pass.
SAVED_NAMES = ("attention_coords", "attention_out", "attention_weights", "sparse_code",
               "odl_residual", "mlp_hidden", "ista_matrix", "layer_mid")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def saved_relu(x: jax.Array, name: str) -> jax.Array:
    """max(x, 0) under the checkpoint name `name`. Its derivative reads that named output
    (y > 0) rather than x, so under the 'minimal' policy the saved code is all the backward
    pass needs for the ReLU's mask; x, a matmul away, is never recomputed."""
    return checkpoint_name(jnp.maximum(x, 0), name)


@saved_relu.defjvp
def _saved_relu_jvp(name: str, primals, tangents):
    # The name is applied here, at the level the remat policy sees (a nested saved_relu
    # call would hide it inside a custom_jvp_call, and its input would be recomputed).
    y = checkpoint_name(jnp.maximum(primals[0], 0), name)
    return y, jnp.where(y > 0, tangents[0], 0)


def attend(w_q: jax.Array, w_k: jax.Array, w_v: jax.Array, *, key_mask: jax.Array | None,
           is_causal: bool, implementation: str | None, return_weights: bool):
    """softmax(q kᵀ/√p) v per head, for (B, N, K, p) inputs.

    Without `return_weights` this is `jax.nn.dot_product_attention`, which picks the cuDNN
    flash kernel on GPU when `implementation='cudnn'`; the explicit softmax below runs only
    when the attention maps themselves are wanted.
    """
    if not return_weights:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = jax.nn.dot_product_attention(w_q, w_k, w_v, mask=mask, is_causal=is_causal,
                                           implementation=implementation)
        return out, None
    scale = w_q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", w_q, w_k, preferred_element_type=jnp.float32) * scale
    valid = jnp.ones(logits.shape[-2:], bool)
    if is_causal:
        valid = jnp.tril(valid)
    valid = valid[None, None]
    if key_mask is not None:
        valid = valid & key_mask[:, None, None, :]
    logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(w_v.dtype), w_v)
    return out, weights


class MSSA(nnx.Module):
    """Multi-head subspace self-attention (the compression step).

        W   = LN(Z) · U                     U ∈ R^{d×K×p}, no bias; heads W_k ∈ R^{N×p}
        A_k = softmax(W_k W_kᵀ / √p)        query = key = value = W_k
        O   = concat_k(A_k W_k) · U_out (+ b_out)

    CRATE has the output bias b_out, CRATE-α does not. The layer adds the residual Z + O.
    Returns (O, attention maps (B, K, N, N) or None).

    Initialisation as the references (docs/design.md §1): CRATE's nn.Linear defaults, U(±1/√d)
    for U, U_out and b_out; CRATE-α's N(0, 0.02) for U and U_out.
    """

    def __init__(self, width: int, heads: int, *, out_bias: bool, eps: float,
                 attention_impl: str | None, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        head_dim = width // heads
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.norm = LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        torch_style = out_bias  # CRATE (PyTorch reference) has the bias, CRATE-α (JAX) not
        init = torch_default_kernel(in_axis=0, out_axis=(1, 2)) if torch_style else normal(0.02)
        self.proj = param(rngs, init, (width, heads, head_dim), ("embed", "heads", "kv"),
                          param_dtype)
        out_init = (torch_default_kernel(in_axis=(0, 1), out_axis=2) if torch_style
                    else normal(0.02))
        self.out = param(rngs, out_init, (heads, head_dim, width), ("heads", "kv", "embed"),
                         param_dtype)
        self.out_bias = (param(rngs, torch_default_bias(width), (width,), ("embed",),
                               param_dtype) if out_bias else None)

    def project(self, z: jax.Array) -> jax.Array:
        """W = LN(Z)·U as (B, N, K, p): the subspace coordinates the coding rate is measured on."""
        rows = self.norm(z).reshape(-1, z.shape[-1])  # tokens as rows: see ODL.__call__
        w = jnp.einsum("nd,dhk->nhk", rows, self.proj[...].astype(self.dtype))
        return w.reshape(*z.shape[:-1], *w.shape[1:])

    def __call__(self, z: jax.Array, *, key_mask: jax.Array | None = None,
                 is_causal: bool = False, return_attention: bool = False):
        w = checkpoint_name(self.project(z), "attention_coords")
        if return_attention or self.attention_impl == "cudnn":
            heads_out, attn = attend(w, w, w, key_mask=key_mask, is_causal=is_causal,
                                     implementation=self.attention_impl,
                                     return_weights=return_attention)
        else:  # query = key = value: a backward pass with one matmul fewer (symmetric.py)
            heads_out, attn = self_attention(w, key_mask=key_mask, is_causal=is_causal), None
        heads_out = checkpoint_name(heads_out, "attention_out")
        o = jnp.einsum("nhk,hkd->nd", heads_out.reshape(-1, *heads_out.shape[-2:]),
                       self.out[...].astype(self.dtype)).reshape(z.shape)
        if self.out_bias is not None:
            o = o + self.out_bias[...].astype(self.dtype)
        return o, attn


class ISTA(nnx.Module):
    """CRATE's sparse coding step: one ISTA step from X towards a non-negative sparse code.

        X  = LN(Z½)
        Z' = ReLU( X + η·(X·W − X·Wᵀ·W) − η·λ )
           = ReLU( X·M − η·λ ),   M = I + η·(W − Wᵀ·W)

    The second form costs one d×d matmul per token instead of three (M costs 2d³ FLOPs once
    per step); gradients reach W through M, the Gram matrix WᵀW's backward pass in one
    matmul (symmetric.gram). There is no skip connection around ISTA: its output replaces the
    tokens. Returns Z'.
    """

    def __init__(self, width: int, *, eta: float, lam: float, eps: float, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eta, self.lam, self.dtype = eta, lam, dtype
        self.norm = LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # PyTorch's kaiming_uniform_ on a (d, d) parameter, as the reference initialises W.
        self.weight = param(rngs, kaiming_uniform(in_axis=1, out_axis=0), (width, width),
                            ("embed", "mlp"), param_dtype)

    def step_matrix(self) -> jax.Array:
        """M = I + η(W − WᵀW), formed in fp32."""
        w = self.weight[...].astype(jnp.float32)
        m = jnp.eye(w.shape[0], dtype=jnp.float32) + self.eta * (w - gram(w))
        return checkpoint_name(m, "ista_matrix")

    def __call__(self, z_half: jax.Array) -> jax.Array:
        x = self.norm(z_half).reshape(-1, z_half.shape[-1])  # rows: see ODL.__call__
        m = self.step_matrix().astype(self.dtype)
        code = saved_relu(x @ m - self.eta * self.lam, "sparse_code")
        return code.reshape(z_half.shape)


def _times_transpose(a: jax.Array, b: jax.Array) -> jax.Array:
    """a · bᵀ as one dot_general contracting the last axes of both. Spelt `a @ b.T`, the
    transposed copy of b would be a separate value that autodiff keeps for the backward
    pass: inside the layer scan, a stacked (L, C·d, d) copy of each dictionary."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())))


class ODL(nnx.Module):
    """CRATE-α's overcomplete dictionary learning block: unrolled ISTA on the LASSO
    min_A ½‖X − A·Dᵀ‖² + λ‖A‖₁, A ≥ 0, started at A₀ = 0, then decoded with D1.

        X       = LN(Z½)
        A₁      = ReLU(η·X·D − η·λ)
        A_{k+1} = ReLU(A_k − η·(A_k·Dᵀ − X)·D − η·λ)       for k = 1 … steps−1
        O       = A_steps · D1ᵀ                            (the layer adds Z½ + O)

    D, D1 ∈ R^{d×C·d}, C the overcomplete ratio. Returns (O, A_steps), A_steps the sparse code.
    """

    def __init__(self, width: int, *, ratio: int, steps: int, eta: float, lam: float,
                 eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eta, self.lam, self.steps, self.dtype = eta, lam, steps, dtype
        self.norm = LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        shape, axes = (width, ratio * width), ("embed", "mlp")
        self.D = param(rngs, kaiming_uniform(), shape, axes, param_dtype)
        self.D1 = param(rngs, kaiming_uniform(), shape, axes, param_dtype)

    def __call__(self, z_half: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Tokens as the rows of one matrix (B·N, d): XLA:CPU then computes the dictionary
        # gradients Xᵀ·G without first transposing (B, N, ·) activations (measured: the
        # block's forward + backward 8 % faster).
        x = self.norm(z_half).reshape(-1, z_half.shape[-1])
        d = self.D[...].astype(self.dtype)
        shrink = self.eta * self.lam
        code = saved_relu(self.eta * (x @ d) - shrink, "sparse_code")
        for _ in range(self.steps - 1):
            residual = checkpoint_name(_times_transpose(code, d) - x, "odl_residual")
            code = saved_relu(code - self.eta * (residual @ d) - shrink, "sparse_code")
        out = _times_transpose(code, self.D1[...].astype(self.dtype))
        rows = z_half.shape[:-1]
        return out.reshape(*rows, -1), code.reshape(*rows, -1)


class MHSA(nnx.Module):
    """ViT multi-head self-attention: O = concat_k softmax(Q_k K_kᵀ/√p) V_k · W_o + b_o,
    with Q, K, V = LN(Z)·W_{q,k,v} + b. Returns (O, attention maps or None)."""

    def __init__(self, width: int, heads: int, *, eps: float, attention_impl: str | None,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        head_dim = width // heads
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.norm = LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_init = jax.nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        for name in ("query", "key", "value"):
            setattr(self, name, param(rngs, in_init, (width, heads, head_dim),
                                      ("embed", "heads", "kv"), param_dtype))
            setattr(self, name + "_bias", param(rngs, zeros, (heads, head_dim),
                                                ("heads", "kv"), param_dtype))
        out_init = jax.nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        self.out = param(rngs, out_init, (heads, head_dim, width), ("heads", "kv", "embed"),
                         param_dtype)
        self.out_bias = param(rngs, zeros, (width,), ("embed",), param_dtype)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        kernel = getattr(self, name)[...].astype(self.dtype)
        return checkpoint_name(jnp.einsum("bnd,dhk->bnhk", x, kernel)
                               + getattr(self, name + "_bias")[...].astype(self.dtype),
                               "attention_coords")

    def __call__(self, z: jax.Array, *, key_mask: jax.Array | None = None,
                 is_causal: bool = False, return_attention: bool = False):
        x = self.norm(z)
        q, k, v = (self._project(x, n) for n in ("query", "key", "value"))
        heads_out, attn = attend(q, k, v, key_mask=key_mask, is_causal=is_causal,
                                 implementation=self.attention_impl,
                                 return_weights=return_attention)
        heads_out = checkpoint_name(heads_out, "attention_out")
        o = jnp.einsum("bnhk,hkd->bnd", heads_out, self.out[...].astype(self.dtype))
        return o + self.out_bias[...].astype(self.dtype), attn


class MLP(nnx.Module):
    """ViT MLP: O = GELU(LN(Z)·W₁ + b₁)·W₂ + b₂, GELU exact (erf) or its tanh approximation
    (`approximate_gelu`, as CLIPA's text tower). Returns (O, hidden activations)."""

    def __init__(self, width: int, hidden: int, *, eps: float, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, approximate_gelu: bool = False,
                 init_std: float | None = None, out_init_std: float | None = None):
        self.dtype = dtype
        self.approximate_gelu = approximate_gelu
        self.norm = LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # ViT: xavier-uniform kernels, N(0, 1e-6) biases; with init_std (ToST, timm/nanoGPT
        # style): N(0, init_std) kernels (fc2: out_init_std when given), zero biases
        kw = dict(kernel_init=jax.nn.initializers.xavier_uniform(), bias_init=normal(1e-6),
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw2 = kw
        if init_std is not None:
            kw = {**kw, "kernel_init": normal(init_std), "bias_init": zeros}
            kw2 = {**kw, "kernel_init": normal(out_init_std or init_std)}
        self.fc1 = Dense(width, hidden, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(hidden, width, axes=("mlp", "embed"), **kw2)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        pre = checkpoint_name(self.fc1(self.norm(z)), "mlp_hidden")
        hidden = jax.nn.gelu(pre, approximate=self.approximate_gelu)
        return self.fc2(hidden), hidden
