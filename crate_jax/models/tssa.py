"""Token statistics self-attention (TSSA), the attention of ToST (arXiv 2412.17810), in
bidirectional (vision) and causal (language) form: O(N·d) time and memory, no N×N matrix.

Both follow the official code (RobinWu218/ToST: tost_vision/tost.py `AttentionTSSA`,
tost_lang/model_TSSA.py `CausalSelfAttention_TSSA`; docs/design.md §1 "TSSA and ToST"). Tensors are
(B, N, d); heads are (B, N, K, p). The statistics (norms, Π, the second moments) are formed in
float32 whatever the compute dtype: they are sums over all N tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from crate_jax.models.layers import LayerNorm, normal, ones, param, zeros

_NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps, and the causal norms' clamp
_MASS_EPS = 1e-8  # added to Σ_n π_k(n) before dividing by it (the reference's constant)


class _TSSABase(nnx.Module):
    """The parameters both forms share: U (d×K×p) with bias, τ (K), U_out (K×p×d), b_out."""

    def __init__(self, width: int, heads: int, *, eps: float, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, qkv_bias: bool = True,
                 init_std: float = 0.02, out_init_std: float | None = None):
        head_dim = width // heads
        self.dtype = dtype
        self.norm = LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = param(rngs, normal(init_std), (width, heads, head_dim),
                          ("embed", "heads", "kv"), param_dtype)
        self.proj_bias = (param(rngs, zeros, (heads, head_dim), ("heads", "kv"), param_dtype)
                          if qkv_bias else None)
        # τ: one temperature per head, init 1 (the reference's `temp`, never weight-decayed)
        self.temperature = param(rngs, ones, (heads,), ("heads",), param_dtype)
        std = init_std if out_init_std is None else out_init_std
        self.out = param(rngs, normal(std), (heads, head_dim, width), ("heads", "kv", "embed"),
                         param_dtype)
        self.out_bias = param(rngs, zeros, (width,), ("embed",), param_dtype)

    def project(self, z: jax.Array) -> jax.Array:
        """W = LN(Z)·U + b as (B, N, K, p)."""
        w = jnp.einsum("bnd,dhk->bnhk", self.norm(z), self.proj[...].astype(self.dtype))
        if self.proj_bias is not None:
            w = w + self.proj_bias[...].astype(self.dtype)
        return w

    def _output(self, w: jax.Array, pi: jax.Array, moment: jax.Array, shape) -> jax.Array:
        """O = concat_k(−π_k ⊙ W_k ⊘ (1 + q_k)) · U_out + b_out."""
        heads_out = -(w.astype(jnp.float32) * pi[..., None]) / (1.0 + moment)
        heads_out = checkpoint_name(heads_out.astype(self.dtype), "attention_out")
        o = jnp.einsum("bnhk,hkd->bnd", heads_out, self.out[...].astype(self.dtype))
        return (o + self.out_bias[...].astype(self.dtype)).reshape(shape)

    @staticmethod
    def _check_inputs(key_mask: jax.Array | None) -> None:
        if key_mask is not None:
            raise ValueError("key_mask: TSSA has no pairwise attention to mask; its statistics "
                             "run over every token (pad inputs to full length or drop them)")


class TSSA(_TSSABase):
    """Token statistics self-attention (ToST vision, `AttentionTSSA`), per head k:

        W       = LN(Z)·U + b,   W_k ∈ R^{N×p}
        W̃_k     = W_k with each column divided by its L2 norm over the N tokens (≥ 1e-12)
        Π[n, k] = softmax_k( τ_k · Σ_j W̃_k[n, j]² )                    membership, over heads
        q_k     = Σ_n Π[n, k]·W_k[n]² / (Σ_n Π[n, k] + 1e-8)          (p,), elementwise squares
        O[n]    = concat_k( −Π[n, k] · W_k[n] ⊘ (1 + q_k) ) · U_out + b_out

    Returns (O, Π (B, K, N)): Π stands where MSSA returns its attention maps.
    """

    def __call__(self, z: jax.Array, *, key_mask: jax.Array | None = None,
                 is_causal: bool = False, return_attention: bool = False):
        self._check_inputs(key_mask)
        if is_causal:
            raise ValueError("is_causal: this TSSA is bidirectional; causal language models "
                             "use CausalTSSA (its per-position denominator bias)")
        w = checkpoint_name(self.project(z), "attention_coords")
        w32 = w.astype(jnp.float32)
        sq = jnp.square(w32)
        norms = jnp.sqrt(sq.sum(1, keepdims=True))  # ‖W_k[:, j]‖ over tokens: (B, 1, K, p)
        normed_sq = sq / jnp.square(jnp.maximum(norms, _NORM_EPS))
        logits = normed_sq.sum(-1) * self.temperature[...].astype(jnp.float32)  # (B, N, K)
        pi = jax.nn.softmax(logits, axis=-1)
        weights = pi / (pi.sum(1, keepdims=True) + _MASS_EPS)
        moment = jnp.einsum("bnh,bnhk->bhk", weights, sq)[:, None]  # q_k: (B, 1, K, p)
        o = self._output(w, pi, moment, z.shape)
        return o, (jnp.swapaxes(pi, 1, 2) if return_attention else None)


class CausalTSSA(_TSSABase):
    """Causal TSSA (ToST language, `CausalSelfAttention_TSSA`): the statistics of token n
    are running sums over tokens m ≤ n, plus a learned per-position bias β ∈ R^{K×T}:

        W       = LN(Z)·U + b
        c_k(n)  = max(Σ_{m≤n} W_k[m]², 1e-12)                          (p,)
        Π[n, k] = softmax_k( τ_k · Σ_j (W_k[n, j]² / c_k(n)_j + β[k, n]) )
        q_k(n)  = Σ_{m≤n} Π[m, k]·W_k[m]² / (Σ_{m≤n} Π[m, k] + 1e-8)
        O[n]    = concat_k( −Π[n, k] · W_k[n] ⊘ (1 + q_k(n)) ) · U_out + b_out

    β (the reference's `denom_bias`, (K, T, 1) there, init 0) is added to each of the p terms
    before the sum, so it contributes p·β[k, n]. Returns (O, Π (B, K, N)).
    """

    def __init__(self, width: int, heads: int, *, context_length: int, **kw):
        super().__init__(width, heads, **kw)
        self.denom_bias = param(kw["rngs"], zeros, (heads, context_length), ("heads", None),
                                kw["param_dtype"])

    def __call__(self, z: jax.Array, *, key_mask: jax.Array | None = None,
                 is_causal: bool = True, return_attention: bool = False):
        self._check_inputs(key_mask)
        if not is_causal:
            raise ValueError("is_causal: CausalTSSA is causal (its statistics are prefix sums); "
                             "bidirectional models use TSSA")
        length = z.shape[1]
        if length > self.denom_bias.shape[1]:
            raise ValueError(f"sequence of {length} tokens: the denominator bias covers "
                             f"context_length={self.denom_bias.shape[1]} positions")
        w = checkpoint_name(self.project(z), "attention_coords")
        sq = jnp.square(w.astype(jnp.float32))
        running = jnp.maximum(jnp.cumsum(sq, axis=1), _NORM_EPS)
        bias = self.denom_bias[...].astype(jnp.float32)[:, :length].T  # (N, K)
        logits = (sq / running).sum(-1) + sq.shape[-1] * bias
        pi = jax.nn.softmax(logits * self.temperature[...].astype(jnp.float32), axis=-1)
        moment = (jnp.cumsum(sq * pi[..., None], axis=1)
                  / (jnp.cumsum(pi, axis=1) + _MASS_EPS)[..., None])
        o = self._output(w, pi, moment, z.shape)
        return o, (jnp.swapaxes(pi, 1, 2) if return_attention else None)
