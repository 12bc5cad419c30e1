"""The self-supervised tasks end to end through crate_jax.main, on 8 fake CPU devices:
SIGKILL then the same command again ends bitwise equal to an uninterrupted run (the SimDINO
teacher included), an MAE encoder finetunes into a classifier through init_from, and
crate_jax.analyze reads both kinds of run."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from multiprocess_utils import metrics, wait_for_checkpoint

from crate_jax import analyze
from crate_jax.config_check import load_config
from crate_jax.train.loop import final_params, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"mae": os.path.join(ROOT, "configs", "demo_mae.py"),
           "simdino": os.path.join(ROOT, "configs", "demo_simdino.py")}
STEPS = 8
LONG = {"total_steps": STEPS, "optim.total_steps": STEPS, "checkpoint.every": 2,
        "log_every": 4}


def _flags(updates: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in updates.items()]


def _config(task: str, **updates):
    c = load_config(f"{CONFIGS[task]}:smoke")
    for key, value in {**LONG, **updates}.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each task's run to STEPS in this process: the reference, and a run to analyse. It
    evaluates twice, as the demos do (the second figure replaces the first)."""
    out = {}
    for task in CONFIGS:
        workdir = tmp_path_factory.mktemp(task)
        train_and_evaluate(_config(task, eval_every=STEPS // 2), str(workdir))
        out[task] = workdir
    return out


def _main(task: str, workdir) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crate_jax.main", f"--config={CONFIGS[task]}:smoke",
           f"--workdir={workdir}", *_flags(LONG)]
    # on 8 devices as the reference in this process, with its XLA_FLAGS (so the programs it
    # compiled are in the shared compilation cache for this one: tests/conftest.py)
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_sigkill_then_rerun_is_bitwise_equal(task, tmp_path, uninterrupted):
    proc = _main(task, tmp_path)
    wait_for_checkpoint(tmp_path, proc, minimum=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _main(task, tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from step" in out and f"resumed from step {STEPS}" not in out, out
    got, want = final_params(str(tmp_path)), final_params(str(uninterrupted[task]))
    if task == "simdino":  # the EMA teacher is saved, and resumes, with the student
        assert set(got) == {"student", "teacher"}
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, b), a in zip(paths, jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_mae_encoder_finetunes_into_a_classifier(uninterrupted, tmp_path):
    """init_from with init_prefix='backbone': the classifier starts from the MAE encoder's
    exact values (lr 0 keeps them), its head fresh."""
    c = load_config(os.path.join(ROOT, "configs", "demo_classification.py") + ":smoke")
    c.model.name = "crate-t/4"
    # the CRATE-MAE encoder as a classifier: its conv stem, MAE's table, λ and final-norm eps
    c.model.overrides = dict(width=32, depth=2, heads=2, stem="conv", posemb="sincos2d_mae",
                             pool="gap", lam=0.5, head_norm_eps=1e-6)
    c.init_from, c.init_prefix = str(uninterrupted["mae"]), "backbone"
    c.optim.lr, c.optim.weight_decay, c.total_steps = 0.0, 0.0, 2
    c.checkpoint.async_save = False
    train_and_evaluate(c, str(tmp_path))
    tuned, mae = final_params(str(tmp_path)), final_params(str(uninterrupted["mae"]))
    assert "head" in tuned and "head" not in mae["backbone"]
    for key in ("stem", "cls", "encoder", "norm"):
        for a, b in zip(jax.tree.leaves(tuned[key]), jax.tree.leaves(mae["backbone"][key]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    c.init_prefix = "encoder"  # a prefix naming no group is refused, by name, up front
    with pytest.raises(ValueError, match="init_prefix"):
        train_and_evaluate(c, str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()


def test_analyze_reads_mae_and_simdino_runs(uninterrupted, tmp_path):
    figure = uninterrupted["mae"] / "reconstruction.png"  # the evaluator's, in the workdir
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (uninterrupted["mae"] / "reconstruction.png.tmp").exists()
    rows = metrics(uninterrupted["mae"]).items()
    evaluated = [step for step, row in rows if "reconstruction/mse" in row]
    assert evaluated == [STEPS // 2, STEPS]
    out = tmp_path / "analysis"
    code = analyze.main([f"--workdir={uninterrupted['mae']}",
                         f"--workdir={uninterrupted['simdino']}", "--num-images=8",
                         "--batch=8", "--seg-images=4", "--show=2", "--coco=off",
                         f"--out={out}"])
    assert code == 0
    runs = json.loads((out / "layerwise.json").read_text())["runs"]
    mae, simdino = runs[0], runs[1]
    assert len(mae["compression_mean"]) == 3 and len(mae["sparsity_mean"]) == 2
    assert len(simdino["compression_mean"]) == 3
    # the CRATE decoder's compression term, point by point through the decoder
    decoder = mae["decoder"]
    assert len(decoder["compression_mean"]) == 3
    assert all(np.isfinite(decoder["compression_mean"]))
    for name in ("layerwise.png", "layerwise_autoencoder.png", "segmentation.json"):
        assert (out / name).exists(), name
