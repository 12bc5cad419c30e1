"""Language-model configurations and names: CRATE / CRATE-α / GPT-2 causal LMs and CRATE /
BERT masked LMs at the published GPT-2 and BERT sizes.

Names (case-insensitive): 'crate-gpt-{small,medium,large}' (MSSA + ISTA, causal),
'crate-alpha-gpt-{small,medium,large}' (MSSA + overcomplete ODL, ratio 4, two ISTA steps: the
sparse code of "Improving Neuron-level Interpretability with White-box Language Models",
arXiv 2410.12288), 'gpt2-{small,medium,large}' (the baseline: MHSA + GELU-tanh MLP),
'crate-bert-{base,large}', 'crate-alpha-bert-{base,large}' and 'bert-{base,large}'
(bidirectional, MLM head), 'tost-gpt-{base,medium,large}' (ToST: causal TSSA, arXiv 2412.17810;
vocabulary 50,304 as nanoGPT pads it).

GPT-2 sizes (width/depth/heads): small 768/12/12, medium 1024/24/16, large 1280/36/20; vocabulary
50,257, context 1,024. BERT: base 768/12/12, large 1024/24/16; vocabulary 30,522 (uncased
WordPiece), 512 positions, 2 token types.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from crate_jax.models.config import TowerConfig, _check

# kind → size → (width, depth, heads)
LM_SIZES: dict[str, dict[str, tuple[int, int, int]]] = {
    "gpt": {"small": (768, 12, 12), "medium": (1024, 24, 16), "large": (1280, 36, 20)},
    "bert": {"base": (768, 12, 12), "large": (1024, 24, 16)},
    # ToST's language models (tost_lang/config/train_tost_{base,medium,large}_ls.py)
    "tost-gpt": {"base": (768, 12, 12), "medium": (1024, 24, 16), "large": (1280, 36, 20)},
}
# What every model of a kind starts from.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": dict(vocab_size=50_257, context_length=1024, causal=True),
    "bert": dict(vocab_size=30_522, context_length=512, causal=False, type_vocab_size=2),
    # nanoGPT's GPTConfig: GPT-2's 50,257 tokens padded to 50,304 (a multiple of 64)
    "tost-gpt": dict(vocab_size=50_304, context_length=1024, causal=True),
}
# family → (kind, block, family settings); overrides still win.
LM_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "crate-gpt": ("gpt", "crate", {}),
    "crate-alpha-gpt": ("gpt", "crate_alpha", dict(overcomplete_ratio=4, ista_steps=2)),
    # GPT-2: GELU with the tanh approximation, LayerNorm eps 1e-5
    "gpt2": ("gpt", "vit", dict(mlp_activation="gelu_tanh", layer_norm_eps=1e-5)),
    "crate-bert": ("bert", "crate", {}),
    "crate-alpha-bert": ("bert", "crate_alpha", dict(overcomplete_ratio=4, ista_steps=2)),
    # BERT: exact (erf) GELU, LayerNorm eps 1e-12
    "bert": ("bert", "vit", dict(layer_norm_eps=1e-12)),
    # ToST-GPT: nanoGPT with causal TSSA; exact (erf) GELU, LayerNorm eps 1e-5, LayerScale
    # γ init 1e-5 on both branches (tost_lang/model_TSSA.py)
    "tost-gpt": ("tost-gpt", "tost", dict(layer_norm_eps=1e-5, layer_scale_init=1e-5)),
}
_LM_NAME = re.compile(r"^(?P<family>crate-alpha-gpt|crate-gpt|gpt2|crate-alpha-bert|crate-bert|"
                      r"bert|tost-gpt)-(?P<size>[a-z]+)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LanguageConfig(TowerConfig):
    """A language model over token ids (B, T): the shared layer stack plus embeddings and head.

    causal: True, a next-token LM (MSSA / MHSA under a causal mask); False, a bidirectional
      encoder with BERT's masked-LM head.
    tie_embeddings: the output layer is the token embedding, logits = Z·Eᵀ; False: a separate
      (width, vocab) matrix.
    type_vocab_size: rows of BERT's token-type (segment) embedding; 0: none. Bidirectional only.
    pooler: BERT's pooler, tanh(Z[:, 0]·W + b) on the first ([CLS]) token. Bidirectional only.
    """

    vocab_size: int = 50_257
    context_length: int = 1024
    causal: bool = True
    tie_embeddings: bool = True
    type_vocab_size: int = 0
    pooler: bool = False
    embed_init_std: float = 0.02  # token, position and type embeddings, heads: N(0, std)

    def __post_init__(self):
        super().__post_init__()
        _check(self.vocab_size > 1, "vocab_size", f"must be > 1, got {self.vocab_size}")
        _check(self.context_length > 0, "context_length",
               f"must be positive, got {self.context_length}")
        _check(self.type_vocab_size >= 0, "type_vocab_size",
               f"must be ≥ 0, got {self.type_vocab_size}")
        _check(self.embed_init_std > 0, "embed_init_std",
               f"must be positive, got {self.embed_init_std}")
        if self.causal:
            _check(self.type_vocab_size == 0, "type_vocab_size",
                   "token types are an input of the bidirectional (BERT) models; a causal LM "
                   f"has none, got type_vocab_size={self.type_vocab_size}")
            _check(not self.pooler, "pooler", "the pooler belongs to the bidirectional "
                   "(BERT) models; a causal LM has none")


def available_lm() -> list[str]:
    """Every language-model name."""
    return [f"{family}-{size}" for family, (kind, _, _) in LM_FAMILIES.items()
            for size in LM_SIZES[kind]]


def lm_preset_fields(name: str) -> dict[str, Any]:
    """The fields a name sets before any override (block, sizes, kind and family defaults)."""
    match = _LM_NAME.match(name.strip())
    if not match:
        raise ValueError(f"unknown language model {name!r}; known: {', '.join(available_lm())}")
    kind, block, family_fields = LM_FAMILIES[match["family"].lower()]
    size = match["size"].lower()
    if size not in LM_SIZES[kind]:
        raise ValueError(f"unknown language model {name!r}: size {size!r} not in "
                         f"{list(LM_SIZES[kind])}; known: {', '.join(available_lm())}")
    width, depth, heads = LM_SIZES[kind][size]
    return dict(block=block, width=width, depth=depth, heads=heads, **KIND_DEFAULTS[kind],
                **family_fields)


def config_for_lm(name: str, **overrides) -> LanguageConfig:
    """The validated configuration of a language model name, with field overrides applied,
    e.g. config_for_lm('crate-gpt-small', width=32, depth=2, heads=4)."""
    fields = lm_preset_fields(name)
    known = {f.name for f in dataclasses.fields(LanguageConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown} for {name!r}; "
                         f"settings are {sorted(known)}")
    return LanguageConfig(**{**fields, **overrides})
