"""Key-value-cached decoding for the causal language models (CRATE, CRATE-α, GPT-2).

The cache has a fixed size S = prompt length + new tokens, stacked over layers:

    MSSA (CRATE, CRATE-α):  {'w': (L, B, S, K, p)}             W = LN(Z)·U, one tensor per layer
    MHSA (GPT-2):           {'k': (L, B, S, K, p), 'v': (...)}  K and V, two tensors per layer

MSSA's query, key and value are the same W_k = LN(Z)·U_k, so a cached position needs only its W,
half of what a GPT-2 cache holds per layer. A decode step at position t (one new token per row)
computes the new token's W (or q, k, v), writes it at row t of the cache and attends to rows
0 … t:

    o_t = Σ_{j ≤ t} softmax_j(w_t·w_jᵀ/√p) · w_j              per head, then · U_out (+ b_out)

The prefill runs the prompt's own causal attention (jax.nn.dot_product_attention with
is_causal=True, the cuDNN kernel on a GPU) and fills rows 0 … T−1. `generate` compiles the
prefill and the whole decode loop (a `jax.lax.scan` of one decode step) as one program: no
recompilation per token. All rows of a batch share the prompt length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models.blocks import MSSA, attend
from crate_jax.models.encoder import Layer
from crate_jax.models.language import CausalLM

Cache = dict[str, jax.Array]


def init_cache(model: CausalLM, batch: int, length: int) -> Cache:
    """An all-zero cache of `length` positions (rows beyond the current one are masked)."""
    cfg = model.cfg
    if cfg.block == "tost":  # its state is running sums, not keys: no cache of this kind
        raise ValueError("block 'tost': causal TSSA keeps prefix statistics, not keys and "
                         "values; it has no key-value cache (run the model on the whole "
                         "prefix instead)")
    shape = (cfg.depth, batch, length, cfg.heads, cfg.width // cfg.heads)
    names = ("w",) if cfg.block != "vit" else ("k", "v")
    return {name: jnp.zeros(shape, cfg.compute_dtype) for name in names}


def _project(attn: nnx.Module, z: jax.Array) -> tuple[jax.Array, Cache]:
    """The query and the cache entries of new tokens z (B, T, d), each (B, T, K, p)."""
    if isinstance(attn, MSSA):
        w = attn.project(z)
        return w, {"w": w}
    x = attn.norm(z)
    q, k, v = (jnp.einsum("bnd,dhk->bnhk", x, getattr(attn, name)[...].astype(attn.dtype))
               + getattr(attn, name + "_bias")[...].astype(attn.dtype)
               for name in ("query", "key", "value"))
    return q, {"k": k, "v": v}


def _attention(attn: nnx.Module, z: jax.Array, cache: Cache, index: jax.Array,
               pos: jax.Array, prefill: bool) -> tuple[jax.Array, Cache]:
    """The attention branch O of layer `index` for new tokens at positions pos … pos+T−1,
    with their entries written into the cache. Prefill (pos = 0): the tokens attend to each
    other causally; a decode step (T = 1): the token attends to cache rows 0 … pos."""
    query, new = _project(attn, z)
    cache = {name: jax.lax.dynamic_update_slice(cache[name], new[name][None].astype(
        cache[name].dtype), (index, 0, pos, 0, 0)) for name in cache}
    if prefill:
        keys, key_mask, impl = new, None, attn.attention_impl
    else:
        keys = {name: cache[name][index].astype(query.dtype) for name in cache}
        length = keys[next(iter(keys))].shape[1]
        key_mask = jnp.broadcast_to(jnp.arange(length) <= pos, (z.shape[0], length))
        impl = None  # one query row against a masked cache: XLA's attention
    k, v = (keys["w"], keys["w"]) if "w" in keys else (keys["k"], keys["v"])
    heads, _ = attend(query, k, v, key_mask=key_mask, is_causal=prefill, implementation=impl,
                      return_weights=False)
    o = jnp.einsum("bnhk,hkd->bnd", heads, attn.out[...].astype(attn.dtype))
    if attn.out_bias is not None:
        o = o + attn.out_bias[...].astype(attn.dtype)
    return o, cache


def _layer_step(layer: Layer, z: jax.Array, cache: Cache, index: jax.Array, pos: jax.Array,
                prefill: bool) -> tuple[jax.Array, Cache]:
    """One layer at inference (no DropPath), as encoder.Layer:

        Z½ = Z + LS₁(MSSA(Z))                     (GPT-2: MHSA), attention through the cache
        CRATE:   Z' = ISTA(Z½)
        CRATE-α: Z' = Z½ + LS₂(ODL(Z½))           GPT-2: Z' = Z½ + LS₂(MLP(Z½))
    """
    o, cache = _attention(layer.attn, z, cache, index, pos, prefill)
    if layer.scale_attn is not None:
        o = layer.scale_attn(o)
    z_half = z + o
    if layer.block == "crate":
        return layer.sparse(z_half), cache
    o, _ = layer.sparse(z_half)
    if layer.scale_sparse is not None:
        o = layer.scale_sparse(o)
    return z_half + o, cache


def _run_layers(model: CausalLM, z: jax.Array, cache: Cache, pos: jax.Array,
                prefill: bool) -> tuple[jax.Array, Cache]:
    """Zᴸ through the stacked layers, one `lax.scan`; the whole cache is the carry (each
    layer updates its own rows in place)."""
    graphdef, state = nnx.split(model.encoder.layers)

    def body(carry, xs):
        z, cache = carry
        layer_state, index = xs
        z, cache = _layer_step(nnx.merge(graphdef, layer_state), z, cache, index, pos, prefill)
        return (z, cache), None

    (z, cache), _ = jax.lax.scan(body, (z, cache), (state, jnp.arange(model.cfg.depth)))
    return z, cache


def prefill(model: CausalLM, tokens: jax.Array, length: int) -> tuple[jax.Array, Cache]:
    """Runs the prompt (B, T) and returns its logits (B, T, V) (float32) and a cache of
    `length` ≥ T positions holding rows 0 … T−1."""
    cache = init_cache(model, tokens.shape[0], length)
    z, cache = _run_layers(model, model.embeddings(tokens), cache, jnp.int32(0), prefill=True)
    return model.logits(z), cache


def decode_step(model: CausalLM, token: jax.Array, cache: Cache,
                pos: jax.Array) -> tuple[jax.Array, Cache]:
    """Feeds one token per row (B,) at position `pos` (traced) and returns the next-token
    logits (B, V) (float32) and the cache with row `pos` written."""
    z = model.embeddings(token[:, None], start=pos)
    z, cache = _run_layers(model, z, cache, pos, prefill=False)
    return model.logits(z)[:, 0], cache


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, *, greedy: bool,
           top_k: int | None) -> jax.Array:
    """Next tokens (B,) int32: argmax (greedy), or a draw from softmax(logits / temperature)
    restricted to the `top_k` largest logits."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "greedy", "top_k",
                                             "return_logits"))
def _generate(model: CausalLM, prompt: jax.Array, temperature: jax.Array, key: jax.Array, *,
              max_new_tokens: int, greedy: bool, top_k: int | None, return_logits: bool):
    logits, cache = prefill(model, prompt, prompt.shape[1] + max_new_tokens)
    keys = jax.random.split(key, max_new_tokens)
    pick = functools.partial(sample, temperature=temperature, greedy=greedy, top_k=top_k)
    first = pick(logits[:, -1], keys[0])

    def step(carry, key):
        token, cache, pos = carry
        step_logits, cache = decode_step(model, token, cache, pos)
        token = pick(step_logits, key)
        return (token, cache, pos + 1), (token, step_logits if return_logits else None)

    carry = (first, cache, jnp.int32(prompt.shape[1]))
    _, (tokens, step_logits) = jax.lax.scan(step, carry, keys[1:])
    out = jnp.concatenate([prompt.astype(jnp.int32), first[:, None], tokens.T], axis=1)
    if not return_logits:
        return out, None
    return out, jnp.concatenate([logits[:, -1:], step_logits.swapaxes(0, 1)], axis=1)


def _check_generate_args(model, prompt_tokens, max_new_tokens, temperature, top_k, rng):
    if not isinstance(model, CausalLM):
        raise ValueError(f"model: generate needs a causal LM (CausalLM), got "
                         f"{type(model).__name__}")
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
        raise ValueError(f"prompt_tokens: expected (batch, T ≥ 1), got {prompt_tokens.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be ≥ 1, got {max_new_tokens}")
    total, context = prompt_tokens.shape[1] + max_new_tokens, model.cfg.context_length
    if total > context:
        raise ValueError(f"max_new_tokens: prompt ({prompt_tokens.shape[1]}) + max_new_tokens "
                         f"({max_new_tokens}) = {total} exceeds context_length={context}")
    if temperature < 0:
        raise ValueError(f"temperature: must be ≥ 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k: must be in [1, vocab_size={model.cfg.vocab_size}], "
                         f"got {top_k}")
    if temperature > 0 and rng is None:
        raise ValueError("rng: sampling (temperature > 0) needs a PRNG key")


def generate(model: CausalLM, prompt_tokens: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, rng: jax.Array | None = None,
             return_logits: bool = False):
    """Continue `prompt_tokens` (B, T) by `max_new_tokens` tokens with a key-value cache.

    temperature 0: greedy (argmax); > 0: sampled from softmax(logits / temperature), among
    the `top_k` most likely tokens when top_k is given (`rng` a PRNG key, required). Returns
    the tokens (B, T + max_new_tokens), int32, prompt first; with `return_logits`, also the
    float32 logits each new token was chosen from, (B, max_new_tokens, V): row i is the full
    forward's logits at position T − 1 + i.

    One compiled program per (shapes, max_new_tokens, greedy, top_k); the temperature and the
    key are traced, so changing them does not recompile.
    """
    prompt_tokens = jnp.asarray(prompt_tokens)
    _check_generate_args(model, prompt_tokens, max_new_tokens, temperature, top_k, rng)
    greedy = temperature == 0
    key = rng if rng is not None else jax.random.key(0)  # unused when greedy
    scale = jnp.float32(1.0 if greedy else temperature)
    tokens, logits = _generate(model, prompt_tokens, scale, key, max_new_tokens=max_new_tokens,
                               greedy=greedy, top_k=top_k, return_logits=return_logits)
    return (tokens, logits) if return_logits else tokens
