"""The language models (crate_jax.models.language): published parameter counts, the names,
config validation, causality of the causal LMs and bidirectionality of the masked LMs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_utils import CAUSAL, TINY, forward, tiny_causal, tiny_lm

from crate_jax.models.language import (
    CausalLM,
    LanguageConfig,
    MaskedLM,
    available_lm,
    config_for_lm,
    create_lm,
)
from crate_jax.models.registry import count_params

# Published GPT-2 (Radford et al. 2019; Hugging Face GPT2LMHeadModel / GPT2Model, tied
# embeddings, no bias on the output layer): wte + wpe + 12d² + 13d per layer + final LN.
GPT2_COUNTS = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080}
# Published BERT uncased (Devlin et al. 2019), as Hugging Face counts them:
#   BertForMaskedLM (no pooler; MLM head = transform dense + LN + output bias, decoder tied):
#       base 109,514,298, large 335,174,458 — what our MaskedLM (pooler=False) is;
#   BertModel (embeddings + encoder + pooler, no MLM head), the "110M / 340M" of the paper:
#       base 109,482,240, large 335,141,888 — our model with pooler=True, minus its MLM head.
BERT_MLM_COUNTS = {"base": 109_514_298, "large": 335_174_458}
BERT_MODEL_COUNTS = {"base": 109_482_240, "large": 335_141_888}


def _abstract(name: str, **overrides):
    return nnx.eval_shape(lambda: create_lm(name, **overrides))


@pytest.mark.parametrize("size", list(GPT2_COUNTS))
def test_gpt2_parameter_counts(size):
    assert count_params(_abstract(f"gpt2-{size}")) == GPT2_COUNTS[size]


@pytest.mark.parametrize("size", list(BERT_MLM_COUNTS))
def test_bert_parameter_counts(size):
    mlm = _abstract(f"bert-{size}")
    assert count_params(mlm) == BERT_MLM_COUNTS[size]
    with_pooler = _abstract(f"bert-{size}", pooler=True)
    assert count_params(with_pooler) - count_params(with_pooler.mlm) == BERT_MODEL_COUNTS[size]


@pytest.mark.parametrize("name", ["crate-gpt-small", "crate-alpha-gpt-medium",
                                  "crate-bert-base", "crate-alpha-bert-large"])
def test_crate_lm_parameter_counts_follow_the_equations(name):
    """Per layer (docs/design.md §1): MSSA = LN + U + U_out (+ b_out for CRATE); ISTA = LN + W;
    ODL = LN + D + D1 (C = 4). Plus embeddings, the final LN and (masked) the MLM head."""
    cfg = config_for_lm(name)
    d, v, c = cfg.width, cfg.vocab_size, cfg.overcomplete_ratio
    if cfg.block == "crate":
        layer = (2 * d + 2 * d * d + d) + (2 * d + d * d)
    else:
        layer = (2 * d + 2 * d * d) + (2 * d + 2 * c * d * d)
    embeddings = (v + cfg.context_length + cfg.type_vocab_size) * d
    head = 0 if cfg.causal else (d * d + d) + 2 * d + v
    assert count_params(_abstract(name)) == embeddings + cfg.depth * layer + 2 * d + head


def test_crate_alpha_lm_uses_the_overcomplete_code():
    cfg = config_for_lm("crate-alpha-gpt-small")
    assert (cfg.block, cfg.overcomplete_ratio, cfg.ista_steps) == ("crate_alpha", 4, 2)
    model = _abstract("crate-alpha-gpt-small")
    assert model.encoder.layers.sparse.D.shape == (12, 768, 4 * 768)


def test_names_and_presets():
    names = set(available_lm())
    for family in ("crate-gpt", "crate-alpha-gpt", "gpt2"):
        assert {f"{family}-{s}" for s in ("small", "medium", "large")} <= names
    for family in ("crate-bert", "bert"):
        assert {f"{family}-base", f"{family}-large"} <= names
    large = config_for_lm("GPT2-Large")
    assert (large.width, large.depth, large.heads, large.vocab_size, large.context_length,
            large.mlp_activation, large.tie_embeddings) == (1280, 36, 20, 50_257, 1024,
                                                            "gelu_tanh", True)
    bert = config_for_lm("bert-large")
    assert (bert.width, bert.depth, bert.heads, bert.vocab_size, bert.context_length,
            bert.type_vocab_size, bert.causal) == (1024, 24, 16, 30_522, 512, 2, False)
    assert isinstance(_abstract("crate-gpt-small", **TINY), CausalLM)
    assert isinstance(_abstract("crate-bert-base", **TINY), MaskedLM)


def test_every_parameter_has_logical_axes():
    for name in ("crate-gpt-small", "gpt2-small", "bert-base"):
        model = _abstract(name, **TINY, **({"pooler": True} if "bert" in name else {}))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata()["out_sharding"]
            shape = var.shape
            key = "/".join(map(str, path))
            assert len(axes) == len(shape), key
            if key.startswith("encoder/layers/"):
                assert axes[0] == "layers", key
        assert model.embeddings.token.get_metadata()["out_sharding"] == ("vocab", "embed")
    untied = _abstract("crate-gpt-small", **TINY, tie_embeddings=False)
    assert untied.lm_head.get_metadata()["out_sharding"] == ("embed", "vocab")
    tied = _abstract("crate-gpt-small", **TINY)
    assert count_params(untied) - count_params(tied) == TINY["vocab_size"] * TINY["width"]


@pytest.mark.parametrize(("name", "overrides", "field"), [
    ("crate-gpt-small", dict(vocab_size=1), "vocab_size"),
    ("gpt2-small", dict(context_length=0), "context_length"),
    ("crate-gpt-small", dict(type_vocab_size=2), "type_vocab_size"),
    ("gpt2-small", dict(pooler=True), "pooler"),
    ("bert-base", dict(type_vocab_size=-1), "type_vocab_size"),
    ("crate-gpt-small", dict(heads=5), "width"),
    ("crate-gpt-small", dict(mlp_dim=64), "mlp_dim"),
    ("crate-alpha-gpt-small", dict(ista_steps=0), "ista_steps"),
    ("crate-bert-base", dict(block="mlp"), "block"),
])
def test_bad_config_raises_naming_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        config_for_lm(name, **overrides)


def test_bad_names_and_settings():
    with pytest.raises(ValueError, match="unknown language model"):
        config_for_lm("gpt2-base")
    with pytest.raises(ValueError, match="unknown language model"):
        config_for_lm("crate-gpt3-small")
    with pytest.raises(ValueError, match="patch_size"):
        config_for_lm("gpt2-small", patch_size=16)
    with pytest.raises(ValueError, match=r"^causal:"):
        MaskedLM(LanguageConfig(block="vit", **TINY), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("family", list(CAUSAL))
def test_causal_lm_future_tokens_do_not_change_earlier_logits(family):
    model = tiny_causal(family)
    tokens = jax.random.randint(jax.random.key(0), (3, TINY["context_length"]), 0, 97)
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 97)
    a, b = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))
    assert a.shape == (3, TINY["context_length"], 97) and a.dtype == np.float32
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert (np.abs(a[:, 10:] - b[:, 10:]).max(-1) > 1e-4).all()


@pytest.mark.parametrize("name", ["crate-bert-base", "bert-base"])
def test_masked_lm_is_bidirectional(name):
    model = tiny_lm(name)
    run = nnx.jit(lambda m, t, s, mask: m(t, s, attention_mask=mask))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
    types = jnp.zeros_like(tokens)
    real = jnp.ones_like(tokens, bool)
    base = np.asarray(run(model, tokens, types, real))
    assert base.shape == (2, 16, 97)
    for j in (0, 7, 15):  # a change anywhere reaches every other position
        other = np.asarray(run(model, tokens.at[:, j].set((tokens[:, j] + 1) % 97), types, real))
        others = np.delete(np.abs(other - base).max(-1), j, axis=1)
        assert (others > 1e-4).all(), j
    other_types = np.asarray(run(model, tokens, types.at[:, 3].set(1), real))
    assert (np.abs(other_types - base).max(-1) > 1e-4).all()
    # padding keys are masked out: a padded token changes nothing at the real positions
    pad = real.at[:, 12:].set(False)
    padded = np.asarray(run(model, tokens, types, pad))
    repadded = np.asarray(run(model, tokens.at[:, 12:].set(5), types, pad))
    np.testing.assert_allclose(padded[:, :12], repadded[:, :12], atol=1e-6)
    picked = model(tokens, types, attention_mask=real, mlm_positions=jnp.array([[1, 4]] * 2))
    np.testing.assert_allclose(np.asarray(picked), base[:, [1, 4]], atol=1e-5, rtol=1e-5)


def test_masked_lm_pooler():
    model = tiny_lm("bert-base", pooler=True)
    tokens = jnp.arange(10)[None] % 97
    pooled = model.pool(model.encode(tokens))
    assert pooled.shape == (1, TINY["width"]) and float(jnp.abs(pooled).max()) <= 1.0
    with pytest.raises(ValueError, match=r"^pooler:"):
        tiny_lm("bert-base").pool(model.encode(tokens))
