"""Language modelling: next-token prediction ('lm') and BERT's masked LM ('mlm').

'lm' (CausalLMTask): packed rows of the token stream (crate_jax/data/text.py), tokens (B, L + 1):

    inputs = tokens[:, :-1],  targets = tokens[:, 1:]
    loss   = (1/(B·L)) · Σ_{b,t} −log softmax(f(inputs_b))_{t, targets_bt}       nats / token
    metrics: perplexity = exp(loss), accuracy (argmax = target)

'mlm' (MaskedLMTask): rows [CLS] … [SEP] masked by BERT's rule (crate_jax/data/mlm_masking.py,
15 % of the non-special tokens, 80/10/10), the loss over the chosen positions only:

    loss = Σ_{b,m} w_bm · −log softmax(f(x̃_b)_{p_bm})_{y_bm} / Σ w             p, y, w: positions,
                                                                              original ids, weights

Configuration (config.data): train_path / eval_path (text_sources: files, folders, globs,
'stdlib:SPLIT', .array_record, 'tfds:NAME:SPLIT'), tokenizer ('bytes', vocab.txt, a BPE folder,
…), seq_len L, text_field, heldout_every, eval_rows (cap on the evaluation rows), num_workers;
'mlm' also mask_prob (0.15) and max_predictions; 'lm' also unigram_baseline (report the
held-out unigram perplexity). The model's vocab_size defaults to the tokenizer's and its
context_length to seq_len (config.model.overrides may set larger ones).

Side-by-side baseline ('lm' only): with config.compare_with = {name, overrides} the model is a
PairedLM holding the CRATE LM ('crate') and the baseline ('baseline'), two parameter groups that
share nothing. The loss is the sum of the two next-token losses on the same batch; since the
gradient of each group is that of its own loss, AdamW (per-parameter moments, decoupled decay)
trains each exactly as it would be trained alone with the same settings, provided optim.clip_norm
is None (a global-norm clip would couple them: configs/demo_lm.py sets None). Metrics: the CRATE
model's under the usual names, the baseline's as baseline_loss / baseline_perplexity / ….
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import config_utils
from crate_jax.data import pipeline
from crate_jax.data import text as text_data
from crate_jax.data.mlm_masking import BertMasker, default_max_predictions
from crate_jax.evals.language import LanguageEvaluator, token_nll, weighted_lm_metrics
from crate_jax.models.language import CausalLM, build_lm
from crate_jax.models.lm_config import config_for_lm
from crate_jax.models.registry import is_language_model
from crate_jax.tasks.base import Task

EVAL_MASK_SEED = 0x4D4C4D  # the fixed per-row masks of the MLM evaluation


class PairedLM(nnx.Module):
    """A CRATE LM and its baseline, side by side (module docstring)."""

    def __init__(self, crate: CausalLM, baseline: CausalLM):
        self.crate, self.baseline = crate, baseline

    def members(self) -> tuple[tuple[str, CausalLM], ...]:
        return (("", self.crate), ("baseline", self.baseline))


def members(model: nnx.Module) -> tuple[tuple[str, nnx.Module], ...]:
    """(metric prefix, language model) of a task's model: one, or the CRATE LM and baseline."""
    return model.members() if isinstance(model, PairedLM) else (("", model),)


def _pair_counts(params: dict) -> dict[str, int]:
    """The parameter counts of the two models of a PairedLM's parameters."""
    def count(tree):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    return {"params": count(params["crate"]), "baseline_params": count(params["baseline"])}


def _unchanged(example: dict, rng: np.random.Generator) -> dict:
    return example


def _unchanged_eval(example: dict) -> dict:
    return example


class _LanguageTask(Task):
    causal: bool = True

    def __init__(self, config):
        super().__init__(config)
        data = config.get("data")
        if data is None or not data.get("train_path"):
            raise ValueError(f"data.train_path: the '{config.trainer}' trainer reads text from "
                             "it (files, a folder, a glob, 'stdlib:train' or .array_record)")
        seq_len = data.get("seq_len")
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 4:
            raise ValueError(f"data.seq_len={seq_len!r}: must be a whole number ≥ 4")
        self.seq_len = seq_len

    @functools.cached_property
    def tokenizer(self) -> text_data.TextTokenizer:
        return text_data.load_tokenizer(self.config.data.get("tokenizer", "bytes"))

    # --- the model -----------------------------------------------------------------------------

    def model_config(self, model: Any, setting: str = "model"):
        """The LanguageConfig of a model section {name, overrides, …}: vocab_size the
        tokenizer's and context_length = seq_len unless set (a set vocab_size is checked
        against the tokenizer when the data is opened, so that the shapes need no file)."""
        name = model.get("name") if hasattr(model, "get") else model
        if not name or not is_language_model(name):
            raise ValueError(f"{setting}.name={name!r}: the '{self.config.trainer}' trainer "
                             "takes a language model ('crate-gpt-small', 'crate-bert-base', …)")
        overrides = config_utils.model_overrides(model) if hasattr(model, "get") else {}
        if overrides.get("vocab_size") is None:
            overrides["vocab_size"] = self.tokenizer.vocab_size
        overrides.setdefault("context_length", self.seq_len)
        if overrides["context_length"] < self.seq_len:
            raise ValueError(f"{setting}.overrides.context_length={overrides['context_length']}"
                             f" is shorter than data.seq_len={self.seq_len}")
        cfg = config_for_lm(name, **overrides)
        if cfg.causal != self.causal:
            want = "a causal LM (…-gpt-…, gpt2-…)" if self.causal else \
                "a bidirectional LM (…-bert-…)"
            raise ValueError(f"{setting}.name={name!r}: the '{self.config.trainer}' trainer "
                             f"takes {want}")
        return cfg

    def check_vocab(self) -> None:
        """Every model's vocabulary holds the tokenizer's ids (loads the tokenizer)."""
        sections = [("model", self.config.model)]
        if self.config.get("compare_with"):
            sections.append(("compare_with", self.config.compare_with))
        for setting, section in sections:
            vocab = self.model_config(section, setting).vocab_size
            if vocab < self.tokenizer.vocab_size:
                raise ValueError(f"{setting}.overrides.vocab_size={vocab} is smaller than the "
                                 f"{self.tokenizer.vocab_size} ids of data.tokenizer="
                                 f"{self.tokenizer.spec!r}")

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_lm(self.model_config(self.config.model), rngs=rngs)

    def num_layers(self) -> int | None:
        return self.model_config(self.config.model).depth

    # --- data ----------------------------------------------------------------------------------

    def _stream(self, key: str) -> text_data.TokenStream:
        data = self.config.data
        self.check_vocab()
        return text_data.open_stream(data[key], self.tokenizer, data, setting=f"data.{key}")

    @functools.cached_property
    def train_stream(self) -> text_data.TokenStream:
        return self._stream("train_path")

    @functools.cached_property
    def eval_stream(self) -> text_data.TokenStream | None:
        """The held-out stream (its first data.eval_rows rows' worth when that is set)."""
        if not self.config.data.get("eval_path"):
            return None
        stream = self._stream("eval_path")
        rows = self.config.data.get("eval_rows")
        if rows:
            stream = text_data.ArrayStream(stream.read(0, min(len(stream),
                                                              rows * self.seq_len + 1)))
        return stream

    def _eval_batch_size(self) -> int:
        size = self.config.get("eval_batch_size") or self.config.batch_size
        return max(1, size // jax.process_count())

    def _train_iterator(self, rows, batch_size: int, seed: int, transform):
        if len(rows) < batch_size:
            raise ValueError(f"data.train_path: {len(rows)} rows of data.seq_len="
                             f"{self.seq_len} tokens, fewer than one batch of {batch_size}")
        return pipeline.train_iterator(rows, batch_size=batch_size, seed=seed,
                                       transform=transform,
                                       num_workers=self.config.data.get("num_workers", 0))


class CausalLMTask(_LanguageTask):
    """'lm': next-token prediction on packed rows (module docstring)."""

    causal = True

    def baseline_config(self):
        """The LanguageConfig of config.compare_with, or None."""
        spec = self.config.get("compare_with")
        if not spec:
            return None
        return self.model_config(spec, setting="compare_with")

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        crate = build_lm(self.model_config(self.config.model), rngs=rngs)
        baseline = self.baseline_config()
        if baseline is None:
            return crate
        return PairedLM(crate, build_lm(baseline, rngs=rngs))

    def num_layers(self) -> int | None:
        # layer-wise lr decay needs one depth; the pair has two stacks
        return None if self.baseline_config() is not None else super().num_layers()

    def train_data(self, batch_size: int, seed: int):
        rows = text_data.LMRows(self.train_stream, self.seq_len, pad_id=self.tokenizer.pad_id)
        return self._train_iterator(rows, batch_size, seed, _unchanged)

    def loss(self, model, batch, rng):
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
        total, metrics = 0.0, {}
        for prefix, lm in members(model):
            loss, extra = weighted_lm_metrics(lm(inputs), targets, weights)
            total = total + loss
            tag = f"{prefix}_" if prefix else ""
            if prefix:
                metrics[f"{tag}loss"] = loss
            elif len(members(model)) > 1:
                metrics["crate_loss"] = loss
            metrics.update({tag + k: v for k, v in extra.items()})
        return total, metrics

    def _row_sums(self, model, batch):
        tokens, weights = batch["tokens"], batch["weights"]
        out = {}
        for prefix, lm in members(model):
            nll, correct = token_nll(lm(tokens[:, :-1]), tokens[:, 1:])
            out[prefix] = ((nll * weights).sum(1), (correct * weights).sum(1), weights.sum(1))
        return out

    def evaluators(self):
        stream = self.eval_stream
        if stream is None:
            return []
        rows = text_data.LMRows(stream, self.seq_len, pad_id=self.tokenizer.pad_id, tail=True)
        size = self._eval_batch_size()
        unigram = None
        if self.config.data.get("unigram_baseline", False):
            def unigram() -> float:
                return text_data.unigram_perplexity(self.train_stream, stream,
                                                    self.tokenizer.vocab_size)
        counts = _pair_counts if self.baseline_config() is not None else None
        return [LanguageEvaluator(
            "val", lambda: pipeline.eval_batches(rows, batch_size=size,
                                                 transform=_unchanged_eval),
            self._row_sums, unigram=unigram, param_counts=counts)]

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return {"tokens": np.zeros((batch_size, self.seq_len + 1), np.int32)}


class MaskedLMTask(_LanguageTask):
    """'mlm': BERT's masked language modelling on packed rows (module docstring)."""

    causal = False

    def __init__(self, config):
        super().__init__(config)
        if config.get("compare_with"):
            raise ValueError("compare_with: a side-by-side baseline is trained by the 'lm' "
                             "trainer only; train the BERT baseline as its own 'mlm' run")

    @functools.cached_property
    def masker(self) -> BertMasker:
        data, tok = self.config.data, self.tokenizer
        if tok.mask_id is None:
            raise ValueError(f"data.tokenizer={tok.spec!r} has no [MASK] token; the 'mlm' "
                             "trainer needs one ('bytes' and BERT vocab.txt files have it)")
        mask_prob = data.get("mask_prob", 0.15)
        return BertMasker(
            vocab_size=tok.vocab_size, special_ids=tok.special_ids, mask_id=tok.mask_id,
            mask_prob=mask_prob, max_predictions=self.max_predictions)

    @property
    def max_predictions(self) -> int:
        data = self.config.data
        return data.get("max_predictions") or default_max_predictions(
            self.seq_len, data.get("mask_prob", 0.15))

    def train_data(self, batch_size: int, seed: int):
        rows = text_data.MLMRows(self.train_stream, self.seq_len, tok=self.tokenizer)
        return self._train_iterator(rows, batch_size, seed, self.masker)

    def _logits(self, model, batch):
        return model(batch["tokens"], attention_mask=batch["attention_mask"],
                     mlm_positions=batch["mlm_positions"])

    def loss(self, model, batch, rng):
        return weighted_lm_metrics(self._logits(model, batch), batch["mlm_ids"],
                                   batch["mlm_weights"])

    def _row_sums(self, model, batch):
        nll, correct = token_nll(self._logits(model, batch), batch["mlm_ids"])
        w = batch["mlm_weights"]
        return {"": ((nll * w).sum(1), (correct * w).sum(1), w.sum(1))}

    def evaluators(self):
        stream = self.eval_stream
        if stream is None:
            return []
        rows = text_data.MLMRows(stream, self.seq_len, tok=self.tokenizer, tail=True)
        size, transform = self._eval_batch_size(), self.masker.fixed(EVAL_MASK_SEED)
        return [LanguageEvaluator(
            "val", lambda: pipeline.eval_batches(rows, batch_size=size, transform=transform),
            self._row_sums)]

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        length, m = self.seq_len, self.max_predictions
        return {"tokens": np.zeros((batch_size, length), np.int32),
                "attention_mask": np.zeros((batch_size, length), np.int32),
                "mlm_positions": np.zeros((batch_size, m), np.int32),
                "mlm_ids": np.zeros((batch_size, m), np.int32),
                "mlm_weights": np.zeros((batch_size, m), np.float32)}
