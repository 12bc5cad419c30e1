"""Coding rates, the compression term Rᶜ, sparsity and the sparse rate reduction objective.

Row convention (docs/design.md §1): a token is a row, a token set is Z ∈ R^{N×p}.

    R(Z)      = ½ logdet(I_p + α ZᵀZ) = ½ logdet(I_N + α Z Zᵀ),   α = p / (N ε²)
    Rᶜ(Z; U)  = Σ_k R(Z U_k)                                   U_k = attn.proj[:, k, :] (d×p)
    objective = R(Z) − Rᶜ(Z; U) − λ ‖A‖₀                       per layer (see `measure`)

**How R is computed.** The Gram matrix of the smaller side (p×p when p ≤ N, else N×N; both
determinants agree by Sylvester's identity) is formed in float32 at full matmul precision and
I + αG is factored with Cholesky: logdet = 2 Σ log diag(L). I + αG has every eigenvalue ≥ 1, so
the factorisation is well posed; what float32 cannot represent is a Gram matrix whose entries
are so large that rounding (≈ 2⁻²⁴·α·tr G) perturbs the eigenvalues of I + αG by more than about
1 %. Those sets (huge norms, rank deficient: the ill-conditioned cases) and any factorisation
that fails go through the singular values of Z itself instead, logdet = Σ log(1 + α σᵢ²), which
rounds relative to ‖Z‖ rather than ‖Z‖². No path produces a NaN for a finite input.

**Normalisations of Rᶜ** (`normalization=`):

- ``'reference'`` (default): the measurement of the reference implementation and docs/design.md §1.
  Every token's head vector (a row of Z U_k) is scaled to unit length and ε² = 0.01, i.e. the
  scalar α = p / (N · 0.01). Rᶜ then depends only on the directions of the tokens inside each
  subspace, so the values of different layers and models are comparable whatever their scale.
- ``'paper'``: the formula as written in the paper, on the raw projections LN(Z)·U_k, with a
  quantisation precision ε (default 0.5). The projections have O(1) coordinates (LayerNorm then
  U with O(1/√d) entries), so ε = 0.5 is a precision of half a unit per coordinate: coarse enough
  that noise-level directions count little, fine enough that the term still resolves the
  structure (ε → 0 makes every set look full rank, ε → ∞ sends every rate to 0).

**Which tokens.** Rᶜ at layer ℓ = 0 … L−1 is measured on the tokens *entering* layer ℓ's MSSA,
projected the way that MSSA projects them, W = LN_ℓ(Z^ℓ)·U_ℓ (`attn.project`): Z⁰ = tokens_in,
Z^ℓ = tokens_out[ℓ−1]. A last point ℓ = L measures the output of the last layer with the last
layer's LN and U. That gives L + 1 points; the paper's curve falls along them for a trained
CRATE. The [CLS] token is *included* by default (`include_cls=True`), as in the reference
measurement, which hooks the full sequence of the qkv projection; `include_cls=False` measures
the patch tokens only.

**Sparsity** at layer ℓ = 0 … L−1 is the fraction of exact zeros of that layer's code: the ISTA
output (CRATE, which is also the layer's output tokens) or the ODL sparse code A (CRATE-α),
over the same tokens as Rᶜ. (The paper plots ‖Z‖₀/(N·D) = 1 − sparsity.)

**The objective** at layer ℓ is evaluated on the layer's *output* Z^{ℓ+1} (measurement point
ℓ + 1), the representation that layer's compression and sparsification steps produced:

    R(Z^{ℓ+1}) − Rᶜ(Z^{ℓ+1}; U) − λ ‖A^ℓ‖₀

with R on the full d-dimensional LN(Z^{ℓ+1}) (same normalisation and ε as Rᶜ, α = d/(N ε²)),
Rᶜ the point-(ℓ+1) value above, ‖A^ℓ‖₀ the number of non-zero entries of layer ℓ's code per
image, = (1 − sparsity)·N·D (D = d, or C·d for CRATE-α), and λ = the model's `lam` (0.1, the
ISTA/ODL sparsity penalty). All three terms are stored as well, so any other weighting can be
formed from the JSON.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Normalization = Literal["reference", "paper"]
NORMALIZATIONS = ("reference", "paper")
REFERENCE_EPS_SQ = 0.01
PAPER_EPS = 0.5
# Above this bound on the float32 rounding of α·G (relative to I) the SVD path is used.
_GRAM_ROUNDING_LIMIT = 1e-2
_F32_UNIT_ROUNDOFF = 2.0 ** -24


def _one_by_one(fn, x: jax.Array) -> jax.Array:
    """fn on each matrix of a batch (..., m, n), in a loop. On the CPU, jaxlib's batched LAPACK
    kernels share out a batch over the intra-op thread pool and block until it is done; two such
    kernels that XLA runs at once (the rates of several layers in one program) can then hold
    every pool thread waiting for each other, and the program never returns (seen on 2 cores,
    jaxlib 0.10). One matrix per call never blocks. GPUs and TPUs keep their batched solvers."""
    if jax.default_backend() != "cpu":
        return fn(x)
    flat = x.reshape(-1, *x.shape[-2:])
    out = jax.lax.map(fn, flat)
    return out.reshape(*x.shape[:-2], *out.shape[1:])


def _logdet_cholesky(a: jax.Array) -> jax.Array:
    chol = _one_by_one(jnp.linalg.cholesky, a)
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def _logdet_svd(z: jax.Array, alpha: jax.Array) -> jax.Array:
    s = _one_by_one(lambda m: jnp.linalg.svd(m, compute_uv=False), z)
    return jnp.sum(jnp.log1p(alpha[..., None] * s * s), axis=-1)


@jax.jit
def _rate(z: jax.Array, alpha: jax.Array) -> jax.Array:
    n, p = z.shape[-2:]
    hi = jax.lax.Precision.HIGHEST
    if p <= n:
        gram = jnp.einsum("...np,...nq->...pq", z, z, precision=hi)
    else:
        gram = jnp.einsum("...np,...mp->...nm", z, z, precision=hi)
    m = min(n, p)
    a = jnp.eye(m, dtype=jnp.float32) + alpha[..., None, None] * gram
    chol = _logdet_cholesky(a)
    trace = jnp.trace(gram, axis1=-2, axis2=-1)
    risky = ~jnp.isfinite(chol) | (alpha * trace * _F32_UNIT_ROUNDOFF * m > _GRAM_ROUNDING_LIMIT)
    logdet = jax.lax.cond(jnp.any(risky),
                          lambda: jnp.where(risky, _logdet_svd(z, alpha), chol),
                          lambda: chol)
    return 0.5 * logdet


def coding_rate(z, eps_sq: float | None = None, *, alpha=None) -> jax.Array:
    """R(Z) = ½ logdet(I + α ZᵀZ) for Z of shape (..., N, p), batched over leading axes.

    α defaults to p / (N ε²) with ε² = `eps_sq` (default 0.01); pass `alpha` (a scalar or an
    array broadcastable to the batch shape) to set it directly. Returns float32 of shape (...).
    """
    z = jnp.asarray(z, jnp.float32)
    if z.ndim < 2:
        raise ValueError(f"coding_rate: Z must be (..., N, p), got shape {z.shape}")
    n, p = z.shape[-2:]
    if alpha is None:
        alpha = p / (n * (REFERENCE_EPS_SQ if eps_sq is None else eps_sq))
    alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), z.shape[:-2])
    return _rate(z, alpha)


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _unit_rows(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def rate_of_tokens(x, normalization: Normalization = "reference",
                   eps: float | None = None) -> jax.Array:
    """R of token sets (..., N, p) under a normalisation: 'reference' scales every row to unit
    length with ε² = 0.01; 'paper' keeps the rows and uses ε (default 0.5)."""
    _check_normalization(normalization)
    x = jnp.asarray(x, jnp.float32)
    if normalization == "reference":
        return coding_rate(_unit_rows(x), REFERENCE_EPS_SQ if eps is None else eps * eps)
    return coding_rate(x, (PAPER_EPS if eps is None else eps) ** 2)


def compression_per_head(w, normalization: Normalization = "reference",
                         eps: float | None = None) -> jax.Array:
    """R(Z U_k) for every head: `w` = the projections (B, N, K, p) (`attn.project(z)`);
    returns (B, K). Rᶜ is the sum over the last axis."""
    w = jnp.asarray(w, jnp.float32)
    return rate_of_tokens(jnp.swapaxes(w, -3, -2), normalization, eps)


def sparsity(codes) -> jax.Array:
    """Fraction of exact zeros per token set: codes (..., N, D) → (...)."""
    codes = jnp.asarray(codes)
    return jnp.mean((codes == 0).astype(jnp.float32), axis=(-2, -1))


def _check_model(model) -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "patch_size"):
        raise ValueError("white-box measurements need an image model (VisionTransformer); got "
                         f"{type(model).__name__}")
    if cfg.block not in ("crate", "crate_alpha", "tost", "vit"):
        raise ValueError(f"white-box measurements need a CRATE, CRATE-α, ToST or ViT model; "
                         f"block {cfg.block!r} has no attention subspaces or codes")


def _head_projections(attn, tokens: jax.Array, block: str) -> jax.Array:
    """(B, N, K, p): each head's coordinates of the tokens. A ViT has no shared U_k; its
    stand-in is the value projection V_k = LN(Z)·W_v,k + b_v,k, the coordinates the head
    mixes and writes back."""
    if block != "vit":
        return attn.project(tokens)
    x = attn.norm(tokens)
    return (jnp.einsum("bnd,dhk->bnhk", x, attn.value[...].astype(x.dtype))
            + attn.value_bias[...].astype(x.dtype))


def measure(model, images, *, normalization: Normalization = "reference",
            eps: float | None = None, include_cls: bool = True,
            inter: dict | None = None) -> dict[str, jax.Array]:
    """The layer-wise measurements of one batch of (normalised, NHWC) images.

    Returns per image (leading axis B), with L layers and K heads:
        compression        (B, L+1)     Rᶜ at the points ℓ = 0 … L (see the module docstring)
        compression_heads  (B, L+1, K)  R(W_k) per head
        rate               (B, L+1)     R(LN(Z)) on the full width at the same points
        sparsity           (B, L)       zero fraction of layer ℓ's code
        l0                 (B, L)       non-zero count of layer ℓ's code
        objective          (B, L)       R − Rᶜ − λ‖A‖₀ on layer ℓ's output (point ℓ + 1)
    `inter` may pass the intermediates of `model(images, collect=True)` already computed.

    ToST: Rᶜ on TSSA's projections W = LN(Z)·U + b; its encoder's tokens are the patches only
    (the cls token joins after the TSSA layers), so `include_cls` changes nothing; the codes
    are the MLP's GELU activations, whose sparsity is the fraction ≤ 0 (a GELU is never
    exactly 0), and the objective is R − Rᶜ (no λ‖A‖₀: ToST has no sparse-coding step).
    ViT (a baseline, no white-box operator): Rᶜ on the heads' value projections
    LN(Z)·W_v,k + b_v,k, codes = the MLP's GELU activations counted like ToST's, objective
    R − Rᶜ.
    """
    _check_model(model)
    _check_normalization(normalization)
    if inter is None:
        _, inter = model(images, collect=True)
    depth = model.encoder.depth
    layers = [model.encoder.layer(i) for i in range(depth)]
    points = [inter["tokens_in"], *[inter["tokens_out"][i] for i in range(depth)]]
    tost = model.cfg.block == "tost"
    gelu_codes = model.cfg.block in ("tost", "vit")
    start = 0 if include_cls or tost else 1
    heads, rates = [], []
    for j, tokens in enumerate(points):
        attn = layers[min(j, depth - 1)].attn
        tokens = tokens[:, start:]
        heads.append(compression_per_head(_head_projections(attn, tokens, model.cfg.block),
                                          normalization, eps))
        rates.append(rate_of_tokens(attn.norm(tokens), normalization, eps))
    heads = jnp.stack(heads, axis=1)
    codes = inter["codes"][:, :, start:]
    if gelu_codes:  # GELU activations: the inactive ones are ≤ 0, never exactly 0
        codes = jnp.where(codes <= 0, 0.0, codes)
    sparse = jnp.swapaxes(sparsity(codes), 0, 1)  # (B, L)
    l0 = (1.0 - sparse) * codes.shape[-2] * codes.shape[-1]
    compression = heads.sum(-1)
    rate = jnp.stack(rates, axis=1)
    lam = 0.0 if gelu_codes else float(model.cfg.lam)
    objective = rate[:, 1:] - compression[:, 1:] - lam * l0
    return dict(compression=compression, compression_heads=heads, rate=rate, sparsity=sparse,
                l0=l0, objective=objective)


# The measurements whose std over images the reference computes as a population std (NumPy's
# np.std in its sparsity plot); its coding rates use torch's sample std (ddof 1).
POPULATION_STD_KEYS = ("sparsity", "l0")


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, list]:
    """Mean and std over images (axis 0) of every measurement: {'compression_mean': [...],
    'compression_std': [...], ...}; the per-head values as lists per point.

    The std is the reference's: the sample std (ddof 1, torch's `Tensor.std()`, as the
    reference reports its coding rates) for the coding rates and the objective, the
    population std (ddof 0, its `np.std`) for sparsity and ‖A‖₀ (POPULATION_STD_KEYS). With one
    image the sample std is undefined and reported as NaN."""
    out = {}
    for key, value in per_image.items():
        value = np.asarray(value, np.float64)
        ddof = 0 if key in POPULATION_STD_KEYS else 1
        out[f"{key}_mean"] = value.mean(0).tolist()
        if value.shape[0] > ddof:
            out[f"{key}_std"] = value.std(0, ddof=ddof).tolist()
        else:
            out[f"{key}_std"] = np.full(value.shape[1:], np.nan).tolist()
    return out
