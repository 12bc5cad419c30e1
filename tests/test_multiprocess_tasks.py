"""Every task on several processes: 2 processes × 4 fake CPU devices (launch/local/
multiprocess.sh) against 1 process × 8 devices fed the same global batches, for

  * the contrastive task with all its evaluators (zero-shot, retrieval, k-NN, linear probe),
    its text tower and projection loaded by init_towers from another run (a donor written in
    this process), the projection frozen, the text tower trained on from the donor's values;
  * a finetune through init_from (from a classifier written in this process, to another
    patch size: position table and stem resized, head re-initialised), on 2 processes only:
    what is checked is what each process loads and adapts (the classification task's 2 × 4
    against 1 × 8 equality is tests/test_multiprocess.py's, and finetune_params against the
    host-side adaptation is checked in this process below);
  * the causal LM (configs/demo_lm.py: CRATE-α next to a GPT-2 baseline) and the masked LM
    (configs/crate_bert.py: CRATE-BERT), every logged metric; the neuron analysis
    (python -m crate_jax.analyze) of the masked LM's 2-process run.

Classification with Mixup and CutMix on two processes is tests/test_multiprocess.py's run.
Losses, gradient norms and every evaluation metric must agree (rtol 1e-5: only the reduction
order of the collectives differs). The four runs (three pairs and the finetune) go two at a
time, all with the suite's quick-compile XLA flags.

In-process checks on 8 fake devices: the compiled train step with Mixup/CutMix holds no
all-gather of the images (each device mixes its own shard), each shard's mix equals `mix` on
that shard alone, and finetune_params equals the host-side adaptation of the donor.
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from multiprocess_utils import QUIET, ROOT, Pair, assert_runs_match, metrics

CONTRASTIVE = os.path.join(ROOT, "configs", "demo.py")
CLASSIFICATION = os.path.join(ROOT, "configs", "demo_classification.py")
LM = os.path.join(ROOT, "configs", "demo_lm.py")
MLM = os.path.join(ROOT, "configs", "crate_bert.py")
# A config file wrapping another one with extra settings (init_from and init_towers are None
# or absent in the configs, so no --config.X flag can set them).
WRAPPER = """
import importlib.util


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("wrapped", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.update({updates!r})
    return c
"""


def _wrapped(base, name: str, path: str, **updates) -> str:
    config = base / f"{name}_config.py"
    config.write_text(WRAPPER.format(path=path, updates=updates))
    return f"--config={config}:smoke"


def _donor(base) -> str:
    """A contrastive run directory holding one checkpoint of freshly drawn weights (seed 11)."""
    import dataclasses

    from crate_jax import tasks
    from crate_jax.config_check import load_config
    from crate_jax.convert.clipa import ImportedClip
    from crate_jax.convert.runs import write_run

    task = tasks.get("contrastive")(load_config(f"{CONTRASTIVE}:smoke"))
    model = task.build_model(nnx.Rngs(params=11))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    write_run(base / "donor", ImportedClip(dataclasses.asdict(task.model_config()), params))
    return str(base / "donor")


def _classifier(base) -> str:
    """A classification run directory holding one checkpoint of freshly drawn weights (seed
    12) of demo_classification.py:smoke's model (crate-alpha-ti/8): the finetune's source."""
    from crate_jax import tasks
    from crate_jax.config_check import load_config
    from crate_jax.convert.runs import write_run_directory

    config = load_config(f"{CLASSIFICATION}:smoke")
    model = tasks.get("classification")(config).build_model(nnx.Rngs(params=12))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    write_run_directory(base / "classifier",
                        {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": {}},
                        {"trainer": "classification", "model": config.model.to_dict()})
    return str(base / "classifier")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four 2-process / 1-process pairs: contrastive and finetune at once, then the two
    language models."""
    base = tmp_path_factory.mktemp("multiprocess_tasks")
    clip = Pair(base, "contrastive", [_wrapped(
        base, "contrastive", CONTRASTIVE, freeze=["text_proj"],
        init_towers=[{"from": _donor(base), "keys": ["text", "text_proj"]}]), *QUIET])
    finetune = Pair(base, "finetune", [
        _wrapped(base, "finetune", CLASSIFICATION, init_from=_classifier(base)),
        "--config.model.name=crate-alpha-ti/4", *QUIET], reference=False)
    clip.wait(), finetune.wait()
    lm = Pair(base, "lm", [f"--config={LM}:smoke", *QUIET])
    mlm = Pair(base, "mlm", [f"--config={MLM}:smoke", *QUIET])
    lm.wait(), mlm.wait()
    return {"contrastive": clip, "finetune": finetune, "lm": lm, "mlm": mlm,
            "donor": base / "donor", "classifier": base / "classifier"}


def _assert_every_metric_matches(pair: Pair) -> None:
    """Every row of metrics.jsonl (train, eval, data counters; not the timings) agrees."""
    many, one = metrics(pair.multi), metrics(pair.single)
    assert sorted(many) == sorted(one)
    for step, row in one.items():
        keys = {k for k in row if not k.startswith("perf/")}
        assert keys == {k for k in many[step] if not k.startswith("perf/")}, step
        for key in sorted(keys):
            np.testing.assert_allclose(many[step][key], row[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{pair.dir.name}: {key} at step {step}")


def test_causal_lm_side_by_side(runs):
    assert_runs_match(runs["lm"], ("val/",))
    _assert_every_metric_matches(runs["lm"])


def test_masked_lm_and_its_neuron_analysis(runs, tmp_path):
    import json
    import subprocess

    assert_runs_match(runs["mlm"], ("val/",))
    _assert_every_metric_matches(runs["mlm"])
    out = subprocess.run([sys.executable, "-m", "crate_jax.analyze",
                          f"--workdir={runs['mlm'].multi}", f"--out={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "neurons.json").read_text())
    assert summary["step"] == 4 and len(summary["models"]["model"]["layers"]) == 2


def test_contrastive_with_every_evaluator(runs):
    final = assert_runs_match(runs["contrastive"],
                               ("zeroshot/", "retrieval/", "probe/knn", "probe/linear"))
    assert final["zeroshot/count"] == 24  # each test image once, not once per process


def test_towers_loaded_frozen_and_trained_on(runs):
    """text_proj: loaded and frozen (the donor's bits). text: loaded, then trained (changed,
    but far nearer the donor than a fresh draw of this config)."""
    from crate_jax.train.loop import final_params

    donor = final_params(str(runs["donor"]))
    for workdir in (runs["contrastive"].multi, runs["contrastive"].single):
        after = final_params(str(workdir))
        for a, b in zip(jax.tree.leaves(after["text_proj"]),
                        jax.tree.leaves(donor["text_proj"]), strict=True):
            np.testing.assert_array_equal(a, b)
        moved = max(float(np.abs(a - b).max()) for a, b in
                    zip(jax.tree.leaves(after["text"]), jax.tree.leaves(donor["text"]),
                        strict=True))
        # a fresh draw differs from the donor by |N(0, 2·0.02²)| ≈ 0.023 on average
        emb = np.abs(after["text"]["token_embedding"] - donor["text"]["token_embedding"])
        assert 0 < moved and emb.mean() < 0.01
    for i in range(2):
        assert "init_towers: ['text', 'text_proj'] loaded from" in runs["contrastive"].log(i)


def test_finetune_through_init_from(runs):
    from crate_jax.train.loop import final_params

    final = metrics(runs["finetune"].multi)[4]
    assert final["val/count"] > 0 and np.isfinite(final["train/loss"])
    for i in range(2):
        log = runs["finetune"].log(i)
        for note in ("posemb/embedding resized 2x2 -> 4x4", "stem/kernel resized 8x8 -> 4x4",
                     "head/kernel re-initialised", "14 parameter arrays read from"):
            assert note in log, note
    params = final_params(str(runs["finetune"].multi))
    assert params["stem"]["kernel"].shape[:2] == (4, 4)
    assert params["posemb"]["embedding"].shape[1] == 1 + 16


# --- in-process, on the 8 fake devices of tests/conftest.py ------------------------------------

def _classification_config(**updates):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_classification

    c = demo_classification.get_config("smoke")
    c.update(updates)
    return c


def _compiled_step_hlo(config) -> str:
    from crate_jax import parallel, tasks
    from crate_jax.train import optim
    from crate_jax.train.step import make_train_step

    task = tasks.get(config.trainer)(config)
    mesh = parallel.make_mesh({"fsdp": -1})
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = parallel.param_shardings(abstract_params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), shardings)
    tx = optim.make_optimizer(config.optim, params)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(tx.init, params)}
    b_shard = parallel.batch_sharding(mesh)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b_shard),
                         task.example_batch(config.batch_size))
    step = make_train_step(task.loss, graphdef, tx, optim.make_schedule(config.optim), seed=0)
    with jax.set_mesh(mesh):
        return jax.jit(step).lower(state, rest, batch).compile().as_text()


def _image_collectives(hlo: str) -> list[str]:
    """Collectives whose result is a batch of images (…, 16, 16, 3). (The step does gather a
    (16, 4) array: the logits' gradient, for the head's weight gradient, not the targets.)"""
    pattern = re.compile(r"= \S+\[(\d+,)?16,16,3\]\S* (all-gather|all-to-all|collective-permute|"
                         r"all-reduce)")
    return [line.strip()[:160] for line in hlo.splitlines() if pattern.search(line)]


def test_mixup_and_cutmix_gather_no_images(monkeypatch):
    from crate_jax.tasks import mixing

    config = _classification_config(mixup=0.8, cutmix=1.0)
    assert _image_collectives(_compiled_step_hlo(config)) == []
    # the same check catches a global permutation (the detector can fail)
    monkeypatch.setattr(mixing, "mix_sharded",
                        lambda rng, x, y, batch_axes, **kw: mixing.mix(rng, x, y, **kw))
    assert _image_collectives(_compiled_step_hlo(config))


# (with both on, each batch takes one of the two: these two cases are its branches)
@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_each_shard_is_mixed_on_its_own(mixup, cutmix):
    from crate_jax import parallel
    from crate_jax.tasks import mixing

    mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
    images = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    labels = np.eye(16, dtype=np.float32)  # row i's own label: where each mixed row came from
    rng = jax.random.key(3)
    kwargs = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=0.5)
    with jax.set_mesh(mesh):
        sharding = parallel.batch_sharding(mesh)
        out = jax.jit(lambda r, x, y: mixing.mix_sharded(r, x, y, batch_axes=("data", "fsdp"),
                                                         **kwargs))(
            rng, jax.device_put(images, sharding), jax.device_put(labels, sharding))
    mixed, targets = (np.asarray(a) for a in out)
    for shard in range(8):
        rows = slice(2 * shard, 2 * shard + 2)
        want = mixing.mix(jax.random.fold_in(rng, shard), jnp.asarray(images[rows]),
                          jnp.asarray(labels[rows]), **kwargs)
        np.testing.assert_allclose(mixed[rows], want[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(targets[rows], want[1], rtol=1e-6)
        outside = np.delete(targets[rows], np.arange(2 * shard, 2 * shard + 2), axis=1)
        assert not outside.any()  # nothing from another shard


def test_finetune_params_equal_the_host_side_adaptation(runs):
    """finetune_params (partial restore into the FSDP shardings, jitted adaptation) gives
    what adapt_for_finetune gives on host copies of the whole donor, in the target
    shardings."""
    from crate_jax import parallel, tasks
    from crate_jax.models.resize import adapt_for_finetune
    from crate_jax.train.finetune import finetune_params
    from crate_jax.train.loop import final_params

    config = _classification_config(init_from=str(runs["classifier"]))
    config.model.name = "crate-alpha-ti/4"
    task = tasks.get(config.trainer)(config)
    mesh = parallel.make_mesh({"fsdp": -1})
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    shardings = parallel.param_shardings(nnx.split(abstract, nnx.Param, ...)[1], mesh)
    with jax.set_mesh(mesh):
        fresh = jax.jit(lambda: nnx.to_pure_dict(nnx.state(task.build_model(nnx.Rngs(0)),
                                                           nnx.Param)),
                        out_shardings=shardings)()
        want, _ = adapt_for_finetune(final_params(str(runs["classifier"])),
                                     jax.device_get(fresh))
        got = finetune_params(config, fresh, shardings, mesh)
    for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(shardings),
                       strict=True):
        assert a.sharding == s
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
