"""The self-supervised tasks end to end through crate_jax.main, on 8 fake CPU devices in all:

  * 2 processes × 4 devices (launch/local/multiprocess.sh) against 1 process × 8 fed the same
    global batches: losses, gradient norms and every evaluation metric agree (rtol 1e-5: only
    the reduction order of the collectives differs). For mae: the masks drawn inside the
    sharded step, the held-out reconstruction loss, the k-NN / linear probe and the
    reconstruction figure (written once, by process 0); for simdino: the EMA teacher updated
    after every step on every process, multi-crop views drawn per example, the probes of the
    teacher and of the random initialisation;
  * SIGKILL after a checkpoint, then the same command again, ends bitwise equal to the
    uninterrupted 1-process run (the SimDINO teacher included);
  * an MAE encoder finetunes into a classifier through init_from, and crate_jax.analyze reads
    both kinds of run.

The 1-process runs are the pairs' references (multiprocess_utils.Pair: in this process) and
serve the other checks too: each run is trained once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from multiprocess_utils import QUIET, ROOT, Pair, assert_runs_match, metrics, wait_for_checkpoint

from crate_jax import analyze
from crate_jax.config_check import load_config
from crate_jax.train.loop import final_params, train_and_evaluate

CONFIGS = {"mae": os.path.join(ROOT, "configs", "demo_mae.py"),
           "simdino": os.path.join(ROOT, "configs", "demo_simdino.py")}
STEPS = 8
LONG = [f"--config.total_steps={STEPS}", f"--config.optim.total_steps={STEPS}",
        "--config.checkpoint.every=2", "--config.log_every=4"]


def _main(task: str, workdir) -> subprocess.Popen:
    """The task's LONG command as a process of its own, on 8 devices and with the XLA flags of
    this process (tests/conftest.py), so that it compiles the programs of the reference."""
    cmd = [sys.executable, "-m", "crate_jax.main", f"--config={CONFIGS[task]}:smoke",
           f"--workdir={workdir}", *LONG]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill_after_a_checkpoint(task: str, workdir) -> subprocess.Popen:
    """The task's command SIGKILLed once it has a checkpoint at step 2 or later, then started
    again in the same workdir (returned, running: it resumes)."""
    proc = _main(task, workdir)
    try:
        wait_for_checkpoint(workdir, proc, minimum=2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return _main(task, workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each task's pair (its 1-process run evaluating twice, as the demos do), and each task's
    killed-then-resumed run in BASE/killed_TASK with the resumed command's output."""
    base = tmp_path_factory.mktemp("multiprocess_self_supervised")
    pairs = {name: Pair(base, name, [f"--config={path}:smoke", *QUIET, *LONG,
                                     f"--config.eval_every={STEPS // 2}"], timeout=600)
             for name, path in CONFIGS.items()}
    resumed = {}
    try:
        for task in CONFIGS:
            resumed[task] = _kill_after_a_checkpoint(task, base / f"killed_{task}")
        out = {task: pair.wait() for task, pair in pairs.items()}
        for task, proc in resumed.items():
            out[f"killed_{task}"] = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, out[f"killed_{task}"]
    finally:
        for proc in [*resumed.values(), *(p for pair in pairs.values() for p in pair.procs)]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    out["base"] = base
    return out


def test_mae_on_two_processes_matches_one(runs):
    final = assert_runs_match(runs["mae"], ("reconstruction/", "probe/"), steps=STEPS,
                              logged_steps=(4, STEPS))
    assert final["reconstruction/mse"] > 0 and final["reconstruction/count"] > 0
    for workdir in (runs["mae"].multi, runs["mae"].single):
        assert (workdir / "reconstruction.png").stat().st_size > 0
        assert not list(workdir.glob("*.tmp*"))


def test_simdino_on_two_processes_matches_one(runs):
    final = assert_runs_match(runs["simdino"], ("probe/", "probe_random_init/"), steps=STEPS,
                              logged_steps=(4, STEPS))
    assert final["probe/coding_rate"] > 0


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_sigkill_then_rerun_is_bitwise_equal(task, runs):
    out = runs[f"killed_{task}"]
    assert "resumed from step" in out and f"resumed from step {STEPS}" not in out, out
    got = final_params(str(runs["base"] / f"killed_{task}"))
    want = final_params(str(runs[task].single))
    if task == "simdino":  # the EMA teacher is saved, and resumes, with the student
        assert set(got) == {"student", "teacher"}
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, b), a in zip(paths, jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_mae_encoder_finetunes_into_a_classifier(runs, tmp_path):
    """init_from with init_prefix='backbone': the classifier starts from the MAE encoder's
    exact values (lr 0 keeps them), its head fresh."""
    mae_run = runs["mae"].single
    c = load_config(os.path.join(ROOT, "configs", "demo_classification.py") + ":smoke")
    c.model.name = "crate-t/4"
    # the CRATE-MAE encoder as a classifier: its conv stem, MAE's table, λ and final-norm eps
    c.model.overrides = dict(width=32, depth=2, heads=2, stem="conv", posemb="sincos2d_mae",
                             pool="gap", lam=0.5, head_norm_eps=1e-6)
    c.init_from, c.init_prefix = str(mae_run), "backbone"
    c.optim.lr, c.optim.weight_decay, c.total_steps = 0.0, 0.0, 2
    c.checkpoint.async_save = False
    train_and_evaluate(c, str(tmp_path))
    tuned, mae = final_params(str(tmp_path)), final_params(str(mae_run))
    assert "head" in tuned and "head" not in mae["backbone"]
    for key in ("stem", "cls", "encoder", "norm"):
        for a, b in zip(jax.tree.leaves(tuned[key]), jax.tree.leaves(mae["backbone"][key]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    c.init_prefix = "encoder"  # a prefix naming no group is refused, by name, up front
    with pytest.raises(ValueError, match="init_prefix"):
        train_and_evaluate(c, str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()


def test_analyze_reads_mae_and_simdino_runs(runs, tmp_path):
    mae_run, simdino_run = runs["mae"].single, runs["simdino"].single
    figure = mae_run / "reconstruction.png"  # the evaluator's, in the workdir
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (mae_run / "reconstruction.png.tmp").exists()
    evaluated = [step for step, row in metrics(mae_run).items() if "reconstruction/mse" in row]
    assert evaluated == [STEPS // 2, STEPS]
    out = tmp_path / "analysis"
    code = analyze.main([f"--workdir={mae_run}", f"--workdir={simdino_run}", "--num-images=8",
                         "--batch=8", "--seg-images=4", "--show=2", "--coco=off",
                         f"--out={out}"])
    assert code == 0
    layerwise = json.loads((out / "layerwise.json").read_text())["runs"]
    mae, simdino = layerwise[0], layerwise[1]
    assert len(mae["compression_mean"]) == 3 and len(mae["sparsity_mean"]) == 2
    assert len(simdino["compression_mean"]) == 3
    # the CRATE decoder's compression term, point by point through the decoder
    decoder = mae["decoder"]
    assert len(decoder["compression_mean"]) == 3
    assert all(np.isfinite(decoder["compression_mean"]))
    for name in ("layerwise.png", "layerwise_autoencoder.png", "segmentation.json"):
        assert (out / name).exists(), name
