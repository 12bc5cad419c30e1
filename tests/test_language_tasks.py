"""The 'lm' and 'mlm' tasks: losses against an independent NumPy cross-entropy, the held-out
evaluation counting every token once, the side-by-side baseline, and the config checks."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from crate_jax import config_utils
from crate_jax.data import pipeline, text
from crate_jax.tasks.language import CausalLMTask, MaskedLMTask, PairedLM

TASKS = {"lm": CausalLMTask, "mlm": MaskedLMTask}

TINY = dict(width=16, depth=1, heads=2)


def _config(trainer: str = "lm", *, name: str = "crate-alpha-gpt-small",
            compare: bool = False, seq_len: int = 8, tmp=None) -> ml_collections.ConfigDict:
    c = config_utils.base_config()
    c.trainer = trainer
    c.model.name = name
    c.model.overrides = ml_collections.ConfigDict(TINY)
    c.compare_with = (ml_collections.ConfigDict(dict(name="gpt2-small",
                                                     overrides=dict(TINY, mlp_dim=24)))
                      if compare else None)
    corpus = tmp / "corpus.txt"
    corpus.write_text("abc def ghi " * 40)
    (tmp / "held.txt").write_text("held-out text, some of it")
    c.data = ml_collections.ConfigDict(dict(
        train_path=str(corpus), eval_path=str(tmp / "held.txt"), tokenizer="bytes",
        seq_len=seq_len, unigram_baseline=True, num_workers=0))
    c.batch_size, c.eval_batch_size = 4, 3
    return c


def _np_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def _model(task, seed=0):
    return task.build_model(nnx.Rngs(seed))


def test_lm_loss_is_the_numpy_cross_entropy(tmp_path):
    task = TASKS["lm"](_config(tmp=tmp_path))
    model = _model(task)
    batch = next(task.train_data(4, seed=0))
    assert batch["tokens"].shape == (4, 9)
    loss, metrics = task.loss(model, jax.tree.map(np.asarray, batch), jax.random.key(0))
    logits = np.asarray(model(batch["tokens"][:, :-1]))
    expected = _np_cross_entropy(logits, batch["tokens"][:, 1:]).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(expected), rtol=1e-5)
    accuracy = (logits.argmax(-1) == batch["tokens"][:, 1:]).mean()
    np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-6)


def test_paired_loss_is_the_sum_of_two_independent_losses(tmp_path):
    task = TASKS["lm"](_config(compare=True, tmp=tmp_path))
    model = _model(task)
    assert isinstance(model, PairedLM)
    tokens = next(task.train_data(4, seed=0))["tokens"]
    loss, metrics = task.loss(model, {"tokens": tokens}, jax.random.key(0))
    parts = [_np_cross_entropy(np.asarray(m(tokens[:, :-1])), tokens[:, 1:]).mean()
             for m in (model.crate, model.baseline)]
    np.testing.assert_allclose(float(loss), sum(parts), rtol=1e-5)
    np.testing.assert_allclose([float(metrics["crate_loss"]),
                                float(metrics["baseline_loss"])], parts, rtol=1e-5)
    # the groups share nothing: the baseline's gradient is that of its own loss alone
    grads = nnx.jit(nnx.grad(lambda m: task.loss(m, {"tokens": tokens}, None)[0]))(model)
    alone = nnx.jit(nnx.grad(lambda m: _own_loss(m, tokens)))(model.baseline)
    np.testing.assert_allclose(np.asarray(grads.baseline.embeddings.token[...]),
                               np.asarray(alone.embeddings.token[...]), rtol=1e-5, atol=1e-7)


def _own_loss(lm, tokens):
    from crate_jax.evals.language import weighted_lm_metrics
    return weighted_lm_metrics(lm(tokens[:, :-1]), tokens[:, 1:], np.ones((4, 8), np.float32))[0]


def test_lm_evaluation_scores_every_held_out_token_once(tmp_path):
    config = _config(compare=True, tmp=tmp_path)
    task = TASKS["lm"](config)
    model = _model(task)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    (evaluator,) = task.evaluators()
    with jax.set_mesh(mesh):
        result = evaluator.run(graphdef, nnx.to_pure_dict(params), rest, mesh)
    held = [*text.load_tokenizer("bytes").encode("held-out text, some of it"), 2]
    assert result["val/tokens"] == len(held) - 1  # 25 targets: rows of 8, the last padded
    for prefix, lm in (("", model.crate), ("baseline_", model.baseline)):
        nll = []
        for s in range(0, len(held) - 1, 8):  # the rows: 8 inputs, their 8 next tokens
            targets = np.asarray(held[s + 1:s + 9])
            logits = np.asarray(lm(np.asarray([held[s:s + 8]])))[0, :len(targets)]
            nll.append(_np_cross_entropy(logits, targets))
        nll = np.concatenate(nll)
        np.testing.assert_allclose(result[f"val/{prefix}loss"], nll.mean(), rtol=1e-5)
        np.testing.assert_allclose(result[f"val/{prefix}perplexity"], np.exp(nll.mean()),
                                   rtol=1e-5)
    counts = np.bincount(task.train_stream.tokens, minlength=260)
    p = (counts + 1) / (counts.sum() + 260)
    unigram = np.exp(-np.log(p[held[1:]]).mean())
    np.testing.assert_allclose(result["val/unigram_perplexity"], unigram, rtol=1e-9)
    assert result["val/params"] == sum(x.size for x in jax.tree.leaves(params["crate"]))


def test_mlm_loss_covers_the_chosen_positions_only(tmp_path):
    task = TASKS["mlm"](_config("mlm", name="crate-bert-base", seq_len=16, tmp=tmp_path))
    assert task.max_predictions == 3  # ⌈0.15 · 16⌉
    model = _model(task)
    batch = next(task.train_data(4, seed=0))
    assert batch["tokens"].shape == (4, 16) and batch["mlm_positions"].shape == (4, 3)
    example = task.example_batch(2)
    assert {k: v.shape[1:] for k, v in example.items()} == {
        k: v.shape[1:] for k, v in batch.items()}
    loss, _ = task.loss(model, batch, jax.random.key(0))
    logits = np.asarray(model(batch["tokens"], attention_mask=batch["attention_mask"]))
    picked = np.take_along_axis(logits, batch["mlm_positions"][..., None], 1)
    nll = _np_cross_entropy(picked, batch["mlm_ids"])
    w = batch["mlm_weights"]
    np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
    # the evaluation masks each held-out row the same way every time
    (evaluator,) = task.evaluators()
    first, again = (next(evaluator._batches()) for _ in range(2))
    np.testing.assert_array_equal(first["tokens"], again["tokens"])
    assert first["mask"].tolist() == [1.0, 1.0, 0.0]  # 2 rows of the held-out text, 1 padded


def test_train_rows_resume_exactly_through_the_task(tmp_path):
    task = TASKS["mlm"](_config("mlm", name="bert-base", seq_len=16, tmp=tmp_path))
    it = task.train_data(4, seed=1)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = task.train_data(4, seed=1)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(3)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert isinstance(it, pipeline.TrainIterator)


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"model\.name='crate-bert-base'.*causal"):
        _model(TASKS["lm"](_config(name="crate-bert-base", tmp=tmp_path)))
    with pytest.raises(ValueError, match=r"model\.name='crate-alpha-b/16'"):
        _model(TASKS["lm"](_config(name="crate-alpha-b/16", tmp=tmp_path)))
    with pytest.raises(ValueError, match="compare_with"):
        TASKS["mlm"](_config("mlm", name="bert-base", compare=True, tmp=tmp_path))
    config = _config(seq_len=2, tmp=tmp_path)
    with pytest.raises(ValueError, match=r"data\.seq_len=2"):
        TASKS["lm"](config)
    config = _config(tmp=tmp_path)
    config.data.tokenizer = str(tmp_path / "missing" / "vocab.txt")
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer=.*missing/vocab\.txt"):
        TASKS["lm"](config).train_data(4, seed=0)
    config = _config(tmp=tmp_path)
    config.model.overrides.vocab_size = 100
    with pytest.raises(ValueError, match=r"model\.overrides\.vocab_size=100"):
        TASKS["lm"](config).train_data(4, seed=0)
