"""Tiny language models shared by test_language_models.py and test_generation.py (one
compilation of each forward pass for both files)."""

from __future__ import annotations

from flax import nnx
from model_utils import randomize

from crate_jax.models.language import create_lm

TINY = dict(width=32, depth=2, heads=4, vocab_size=97, context_length=24)
# The causal families; the CRATE-α LM also runs an untied head and LayerScale.
CAUSAL = {"crate": ("crate-gpt-small", {}),
          "crate_alpha": ("crate-alpha-gpt-small",
                          dict(tie_embeddings=False, layer_scale_init=0.5)),
          "gpt2": ("gpt2-small", {})}

forward = nnx.jit(lambda model, tokens: model(tokens))


def tiny_lm(name: str, seed: int = 0, **overrides):
    """A TINY model with every parameter randomised (no zero bias or unit scale can hide a
    term that a code path forgets)."""
    model = create_lm(name, rngs=nnx.Rngs(seed), **TINY, **overrides)
    randomize(model, seed, std=0.2)
    return model


def tiny_causal(family: str):
    name, overrides = CAUSAL[family]
    return tiny_lm(name, **overrides)
