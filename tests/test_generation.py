"""Key-value-cached generation (crate_jax.models.lm_cache) against the full forward pass, for
a causal CRATE, a CRATE-α (ODL) and the GPT-2 baseline; sampling; argument checks."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_utils import CAUSAL, TINY, forward, tiny_causal

from crate_jax.models.language import create_lm
from crate_jax.models.lm_cache import generate, init_cache

PROMPT, NEW = 5, 12


@pytest.fixture(scope="module")
def models():
    return {family: tiny_causal(family) for family in CAUSAL}


def _prompt(batch: int = 3, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, PROMPT), 0, TINY["vocab_size"])


@pytest.mark.parametrize("family", list(CAUSAL))
def test_cached_greedy_decoding_equals_the_full_forward(family, models):
    model, prompt = models[family], _prompt()
    tokens, step_logits = generate(model, prompt, max_new_tokens=NEW, return_logits=True)
    assert tokens.shape == (3, PROMPT + NEW) and step_logits.shape == (3, NEW, 97)
    np.testing.assert_array_equal(tokens[:, :PROMPT], prompt)
    # Greedy decoding without a cache: the full forward recomputed for each new token. A fixed
    # buffer (causal: the positions after the current one cannot matter) compiles once.
    buffer = jnp.zeros((3, TINY["context_length"]), jnp.int32).at[:, :PROMPT].set(prompt)
    for t in range(PROMPT, PROMPT + NEW):
        logits = forward(model, buffer)
        buffer = buffer.at[:, t].set(jnp.argmax(logits[:, t - 1], -1))
        np.testing.assert_allclose(step_logits[:, t - PROMPT], logits[:, t - 1], atol=1e-5,
                                   rtol=1e-5)
    np.testing.assert_array_equal(tokens, buffer[:, :PROMPT + NEW])


def test_the_mssa_cache_holds_w_alone(models):
    """Query = key = value = W for MSSA: one cached tensor per layer; GPT-2 caches K and V."""
    shape = (2, 3, 10, 4, 8)  # (layers, batch, positions, heads, head width)
    for family in ("crate", "crate_alpha"):
        cache = init_cache(models[family], 3, 10)
        assert list(cache) == ["w"] and cache["w"].shape == shape
    cache = init_cache(models["gpt2"], 3, 10)
    assert sorted(cache) == ["k", "v"] and all(c.shape == shape for c in cache.values())


def test_top_k_sampling_stays_in_the_top_k(models):
    model, prompt = models["crate"], _prompt(batch=4)
    # a high temperature flattens the distribution: without the top-k cut, other tokens
    # would be drawn often
    tokens, logits = generate(model, prompt, max_new_tokens=NEW, temperature=4.0, top_k=3,
                              rng=jax.random.key(7), return_logits=True)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[..., :3]
    new = np.asarray(tokens[:, PROMPT:])
    assert (new[..., None] == top3).any(-1).all()
    assert len(np.unique(new)) > 3  # but it does sample, not always the argmax


def test_sampling_is_reproducible_and_does_not_recompile(models, caplog):
    model, prompt = models["gpt2"], _prompt()
    keys = [jax.random.key(s) for s in (3, 3, 4)]
    first = generate(model, prompt, max_new_tokens=NEW, temperature=1.0, rng=keys[0])
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        again = generate(model, prompt, max_new_tokens=NEW, temperature=1.0, rng=keys[1])
        other = generate(model, prompt, max_new_tokens=NEW, temperature=0.7, rng=keys[2])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not [r for r in caplog.records if "_generate" in r.getMessage()]


def test_generate_rejects_bad_arguments(models):
    model, prompt = models["crate"], _prompt()
    with pytest.raises(ValueError, match=r"^max_new_tokens:.*exceeds context_length=24"):
        generate(model, prompt, max_new_tokens=20)
    with pytest.raises(ValueError, match=r"^rng:"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match=r"^top_k:"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0, top_k=0,
                 rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^temperature:"):
        generate(model, prompt, max_new_tokens=2, temperature=-1.0)
    bert = nnx.eval_shape(lambda: create_lm("bert-base", **TINY))
    with pytest.raises(ValueError, match=r"^model:"):
        generate(bert, prompt, max_new_tokens=2)
