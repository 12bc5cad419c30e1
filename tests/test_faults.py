"""Faults and bad input end clean (issue 12): no non-finite state is ever saved, a failed start
leaves the workdir as it was, typos get one clear line, SIGTERM at startup and during the final
save exits 0 with what could be saved, and settings a block family ignores are refused."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import DEMO, ROOT, smoke_config

from crate_jax import config_utils, models
from crate_jax.config_check import all_keys, load_config, validate
from crate_jax.tasks import token_reduction
from crate_jax.train.checkpoint import CheckpointModelMismatchError
from crate_jax.train.loop import RESUME_SAFE_KEYS, train_and_evaluate


def _all_checkpoint_arrays(directory):
    """Every array (params and optimizer state) of every checkpoint in `directory`."""
    out = {}
    for step in sorted(int(p) for p in os.listdir(directory) if p.isdigit()):
        restored = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
        out[step] = restored
    return out


def test_a_non_finite_state_is_never_saved_and_the_message_names_step_and_parameter(tmp_path):
    """optim.eps=0 with checkpoint.every=1 (issue 12): Adam divides 0 by 0 in the first
    update. The run stops at that step, names the parameter, and no checkpoint holds NaN."""
    config = smoke_config(**{"optim.eps": 0.0, "checkpoint.every": 1})
    with pytest.raises(FloatingPointError) as failure:
        train_and_evaluate(config, str(tmp_path))
    message = str(failure.value)
    assert "at step 1" in message and "parameter encoder/layers/" in message, message
    assert re.search(r"encoder/layers/\S+ \(layer \d+\)", message), message  # which layer
    assert "No checkpoint was saved" in message
    for step, tree in _all_checkpoint_arrays(tmp_path / "checkpoints").items():
        raise AssertionError(f"checkpoint {step} was saved from a non-finite run: {tree}")


def test_nan_after_a_good_checkpoint_names_that_checkpoint(tmp_path):
    """A huge learning rate: step 1 (lr 0 in warmup) is saved, later steps overflow. Every
    checkpoint left holds finite values only, and the message names the newest one."""
    config = smoke_config(**{"optim.lr": 1e38, "optim.clip_norm": None, "total_steps": 6,
                             "optim.total_steps": 6, "checkpoint.every": 1, "log_every": 1,
                             "checkpoint.keep": 10})
    with pytest.raises(FloatingPointError) as failure:
        train_and_evaluate(config, str(tmp_path))
    arrays = _all_checkpoint_arrays(tmp_path / "checkpoints")
    assert arrays, "the first (finite) steps should have been saved"
    for tree in arrays.values():
        for leaf in jax.tree.leaves(tree):
            assert np.isfinite(np.asarray(leaf)).all()
    assert f"The last good checkpoint is step {max(arrays)}" in str(failure.value)
    # the advice names the flag that lets a lower lr resume from it (issue 37)
    assert "--config.resume_overrides=optim.lr,optim.eps" in str(failure.value)


@pytest.mark.parametrize("updates,message", [
    ({"batch_size": 12}, "batch_size=12"),
    ({"model.pool": "bogus"}, "pool"),
    ({"checkpoint.every": 0}, "checkpoint.every=0"),
    ({"log_every": 0}, "log_every=0"),
    ({"data.num_workers": -2}, "data.num_workers=-2"),
    ({"total_steps": -5}, "total_steps=-5"),
    ({"optim.lr": 1e39}, "optim.lr"),
    ({"model.mlp_dim": 64}, "mlp_dim"),
    ({"freeze": ["txt"]}, "freeze"),
    ({"data.background": "plane"}, "data.background='plane'"),
])
def test_a_failed_start_leaves_the_workdir_untouched(tmp_path, updates, message):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(smoke_config(**updates), str(workdir))
    assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())


def test_the_corrected_command_trains_after_a_failed_start(tmp_path):
    """batch_size=12 on 8 devices fails; the fixed command in the same workdir trains, and
    a run that exists already is left as it was by a failed restart."""
    with pytest.raises(ValueError, match="batch_size=12"):
        train_and_evaluate(smoke_config(batch_size=12), str(tmp_path))
    final = train_and_evaluate(smoke_config(), str(tmp_path))
    assert final["step"] == 4
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"checkpoint\.every=0"):
        train_and_evaluate(smoke_config(**{"checkpoint.every": 0}), str(tmp_path))
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_a_checkpoint_of_another_model_is_named_and_nothing_is_written(tmp_path):
    """A workdir without its config.json (copied, or the file deleted) and a config that
    builds another model: the error names the parameters whose shapes differ, before a single
    array is read or a file written; the original config then resumes."""
    assert train_and_evaluate(smoke_config(), str(tmp_path))["step"] == 4
    (tmp_path / "config.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointModelMismatchError) as failure:
        train_and_evaluate(smoke_config(**{"model.overrides.width": 48}), str(tmp_path))
    message = str(failure.value)
    assert "was written by another model" in message
    assert re.search(r"params/cls: saved \(1, 1, 32\), this config \(1, 1, 48\)", message)
    assert "nothing was changed" in message
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after and not (tmp_path / "checkpoints" / "damaged").exists()
    assert train_and_evaluate(smoke_config(), str(tmp_path))["step"] == 4


def test_resume_safe_keys_are_real_keys_and_honoured(tmp_path):
    keys = set(all_keys(config_utils.base_config()))
    for name in ("demo.py", "demo_classification.py"):  # both trainers' data sections
        keys |= set(all_keys(load_config(os.path.join(ROOT, "configs", name))))
    for key in RESUME_SAFE_KEYS:
        assert key in keys, f"RESUME_SAFE_KEYS names {key!r}, which the config does not have"
    train_and_evaluate(smoke_config(), str(tmp_path))
    # a new checkpoint frequency and a longer run are accepted on resume
    final = train_and_evaluate(smoke_config(**{"checkpoint.every": 3, "total_steps": 6}),
                               str(tmp_path))
    assert final["step"] == 6
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["total_steps"] == 6 and saved["optim"]["total_steps"] == 4


def test_model_fields_are_settable_and_validated():
    config = smoke_config(**{"model.pool": "gap", "model.posemb": "sincos2d"})
    validate(config)
    assert config_utils.model_overrides(config.model)["pool"] == "gap"
    # placeholders: typed, so a command-line value parses to the field's type
    assert set(config_utils.model_field_placeholders()) >= {"pool", "mlp_dim", "eta", "remat"}


@pytest.mark.parametrize("name,field,value", [
    ("crate-t/8", "mlp_dim", 128), ("crate-alpha-ti/8", "mlp_dim", 128),
    ("crate-t/8", "ista_steps", 3), ("crate-t/8", "overcomplete_ratio", 2),
    ("crate-t/8", "stem_bias", False), ("crate-t/8", "layer_scale_init", 0.1),
    ("vit-ti/8", "eta", 0.5), ("vit-ti/8", "lam", 0.5), ("vit-ti/8", "ista_steps", 3),
    ("vit-ti/8", "overcomplete_ratio", 2), ("text-ti", "eta", 0.5),
])
def test_fields_a_block_family_ignores_are_refused(name, field, value):
    with pytest.raises(ValueError, match=rf"^{field}: (the '\w+' block|CRATE's linear patch)"):
        models.config_for(name, **{field: value})


def test_fields_a_family_uses_are_accepted():
    models.config_for("crate-alpha-ti/8", overcomplete_ratio=2, ista_steps=3, eta=0.2,
                      layer_scale_init=0.1, stem_bias=False)
    models.config_for("vit-ti/8", mlp_dim=100, layer_scale_init=0.1, stem_bias=False)
    models.config_for("crate-t/8", eta=0.2, lam=0.3)


def test_grid_reduction_that_would_keep_everything_is_refused():
    with pytest.raises(ValueError, match=r"keeps 1\.000"):
        token_reduction.check_reduction(8, 0.5, "grid")
    token_reduction.check_reduction(8, 0.25, "grid")
    token_reduction.check_reduction(8, 0.5, "random")


def _main(workdir, *overrides):
    cmd = [sys.executable, "-m", "crate_jax.main", f"--config={DEMO}:smoke",
           f"--workdir={workdir}", "--config.checkpoint.async_save=True", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _send_at(proc, marker, sig=signal.SIGTERM, timeout=200) -> list[str]:
    """Read the output until a line starts with `marker`, then send `sig`."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(marker):
            proc.send_signal(sig)
            return lines
    raise AssertionError(f"{marker!r} never printed: {''.join(lines)}")


def test_sigterm_during_startup_exits_0_with_a_message(tmp_path):
    proc = _main(tmp_path)
    lines = _send_at(proc, "workdir ")
    out = "".join(lines) + proc.communicate(timeout=200)[0]
    assert proc.returncode == 0, out
    assert "stopping at startup after a termination signal" in out


def test_sigterm_during_the_final_save_finishes_the_save(tmp_path):
    """The signal arrives after the final evaluation, as the final (asynchronous) save starts:
    the save completes, the run exits 0, and the same command has nothing left to redo."""
    proc = _main(tmp_path)
    lines = _send_at(proc, "eval @ 4")
    out = "".join(lines) + proc.communicate(timeout=200)[0]
    assert proc.returncode == 0, out
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "4" in steps and not any("tmp" in s for s in steps), steps
    again = subprocess.run([sys.executable, "-m", "crate_jax.main", f"--config={DEMO}:smoke",
                            f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=200)
    assert again.returncode == 0 and "resumed from step 4" in again.stdout, again.stdout


def test_unknown_key_gets_one_line_with_the_nearest_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "crate_jax.main", f"--config={DEMO}:smoke",
                          f"--workdir={tmp_path / 'run'}", "--config.optim.lrr=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "crate_jax.main: unknown config key 'optim.lrr': config.optim has no field 'lrr'; "
        "did you mean --config.optim.lr?"], out.stderr
    assert "Traceback" not in out.stdout + out.stderr and not (tmp_path / "run").exists()
