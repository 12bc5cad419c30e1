"""ToST through the whole trainer (configs/demo_tost.py:smoke,model=tost): 2 processes × 4
devices against 1 process × 8 (losses, gradient norms, evaluation and the BatchNorm running
statistics agree),
a SIGKILL and resume that ends bit for bit where an uninterrupted run ends (the statistics in
the checkpoint included), and the planner on a ToST config."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from multiprocess_utils import (
    FAST_COMPILE,
    QUIET,
    ROOT,
    Pair,
    assert_runs_match,
    env,
    wait_for_checkpoint,
)

from crate_jax.convert.tost import read_tost_run

CONFIG = os.path.join(ROOT, "configs", "demo_tost.py")
TOST = f"--config={CONFIG}:smoke,model=tost"  # the ToST run alone (no comparison study)
STEPS = 8
ARGS = (*QUIET, f"--config.total_steps={STEPS}", f"--config.optim.total_steps={STEPS}",
        "--config.checkpoint.every=2", "--config.log_every=4")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _main(workdir, *args):
    """A 1 process × 8 devices ToST run, as the Pair's one_process run is started."""
    return subprocess.Popen(
        [sys.executable, "-m", "crate_jax.main", TOST, f"--workdir={workdir}", *args],
        cwd=ROOT, env=env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """At once: the 2-process / 1-process pair of ARGS, and the same 1-process command
    SIGKILLed after its checkpoint at step 2 or later, then rerun (it resumes); so the pair's
    one_process run is the uninterrupted run the killed one must end equal to."""
    base = tmp_path_factory.mktemp("tost_runs")
    pair = Pair(base, "tost", [TOST, *ARGS], timeout=900)
    killed = _main(base / "killed", *ARGS)
    try:
        wait_for_checkpoint(base / "killed", killed, minimum=2, timeout=500)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed.returncode == -signal.SIGKILL
        resumed = _main(base / "killed", *ARGS)
        out, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0 and "resumed from step" in out, out
    except BaseException:
        for proc in pair.procs:  # a failure here leaves no pair running on to its timeout
            proc.kill()
        raise
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.communicate()
    return pair.wait(), base / "killed"


def test_two_processes_match_one(runs):
    pair, _ = runs
    final = assert_runs_match(pair, ("val/",), steps=STEPS, logged_steps=(4, STEPS))
    assert final["val/count"] == 40
    multi, single = read_tost_run(pair.multi), read_tost_run(pair.single)
    assert multi[1] and multi[2] == single[2] == STEPS
    start = 0.0
    for a, b in zip(_leaves(multi[1]), _leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        start += float(np.abs(a - np.round(a)).sum())
    assert start > 0  # the statistics moved away from their initial 0 / 1


def test_sigkill_then_resume_is_bitwise_identical(runs):
    """The parameters and the BatchNorm running statistics in the checkpoint both resume."""
    pair, killed = runs
    a, b = read_tost_run(killed), read_tost_run(pair.single)
    assert a[2] == b[2] == STEPS and a[1]
    for x, y in zip(_leaves(a[:2]), _leaves(b[:2]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_planner_compiles_a_tost_step(tmp_path):
    result = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.plan", TOST, "--mesh=fsdp:2",
         "--max-compiles=1", f"--json={result}"], cwd=ROOT, capture_output=True, text=True,
        timeout=400, env={k: v for k, v in os.environ.items()
                          if k not in ("XLA_FLAGS", "JAX_PLATFORMS")})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "tost-t-12/8" in proc.stdout
    (report,) = json.loads(result.read_text())
    (r,) = report["results"]
    from flax import nnx

    from crate_jax import tasks
    from crate_jax.config_check import load_config
    from crate_jax.models.registry import count_params

    c = load_config(f"{CONFIG}:smoke")
    model = nnx.eval_shape(lambda: tasks.get(c.trainer)(c).build_model(nnx.Rngs(0)))
    assert r["params"] == count_params(model)
    assert r["model_flops_per_device"] > 0 and r["temp_bytes"] > 0


@pytest.mark.parametrize("model", ["tost", "crate"])
def test_demo_config_names_both_models(model):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_tost

    c = demo_tost.get_config(f"model={model}")
    assert c.model.name == demo_tost.MODELS[model][0]
    assert c.model.overrides.width == 64 and "study" not in c
    both = demo_tost.get_config(None)  # the default: the comparison of the two
    assert both.study.models[model].name == demo_tost.MODELS[model][0]
    assert both.study.models[model].overrides.width == 64
    with pytest.raises(ValueError, match="model='vit'"):
        demo_tost.get_config("model=vit")


def test_demo_compares_both_models(tmp_path):
    """`python -m crate_jax.main --config=configs/demo_tost.py:smoke`: both models trained (a
    study, crate_jax/study.py), then the comparison printed and written; each row is what that
    model's own metrics.jsonl logged."""
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.main", f"--config={CONFIG}:smoke",
         f"--workdir={tmp_path}", "--config.measure_flops=False"], cwd=ROOT,
        env=env(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step MiB" in proc.stdout
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert set(doc["models"]) == {"tost", "crate"}
    for name, row in doc["models"].items():
        assert (tmp_path / name / "checkpoints").is_dir()
        logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        times = [r["perf/step_time_s"] for r in logged if "perf/step_time_s" in r]
        assert row["step_s"] == float(np.median(times)) and row["step_memory_mib"] > 0
        assert 0.0 <= row["top1"] <= 1.0
        assert f"{name}/step_s" in proc.stdout  # main's final line
    # the two models' plans differ: MSSA and TSSA do not hold the same intermediates
    assert doc["models"]["tost"]["step_memory_mib"] != doc["models"]["crate"]["step_memory_mib"]


def test_lm_task_trains_tost_gpt(tmp_path):
    """The lm trainer (configs/demo_lm.py:smoke) with ToST-GPT; TSSA's temperature and
    per-position bias are trained, never weight-decayed."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_lm

    from crate_jax.train.loop import final_params, train_and_evaluate
    from crate_jax.train.optim import decay_mask

    config = demo_lm.get_config("smoke")
    config.model.name = "tost-gpt-base"
    config.compare_with = None  # ToST-GPT alone (the GPT-2 baseline is the demo's own test)
    config.tensorboard = False
    final = train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 4 and all(np.isfinite(v) for v in final.values())
    params = final_params(str(tmp_path))
    attn = params["encoder"]["layers"]["attn"]
    assert attn["denom_bias"].shape == (2, 2, 32)  # (layers, heads, context)
    assert float(np.abs(attn["denom_bias"]).max()) > 0  # trained away from its zero init
    mask = decay_mask({"encoder": {"layers": {"attn": attn}}})["encoder"]["layers"]["attn"]
    assert not mask["denom_bias"] and not mask["temperature"] and mask["proj"]
