"""The training engine end to end on 8 fake CPU devices: the loop, checkpoints and exact resume,
SIGTERM and SIGKILL, restore on another mesh, gradient accumulation, evaluation over a whole
split, finetuning, bad input."""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from multiprocess_utils import wait_for_checkpoint

from crate_jax import parallel
from crate_jax.tasks import mixing
from crate_jax.tasks.classification import ClassificationTask
from crate_jax.train import optim
from crate_jax.train.checkpoint import Checkpointer
from crate_jax.train.loop import final_params, train_and_evaluate
from crate_jax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_classification.py")


def smoke_config(**updates) -> ml_collections.ConfigDict:
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_classification

    c = demo_classification.get_config("smoke")
    c.checkpoint.async_save = False
    for key, value in updates.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def _main(workdir, *overrides, **kwargs):
    cmd = [sys.executable, "-m", "crate_jax.main", f"--config={DEMO}:smoke",
           f"--workdir={workdir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


# Long enough that the kill lands mid-run: after the step-4 save, 16 steps and 4 saves remain
# (seconds, against the 20 ms poll of wait_for_checkpoint; orbax renames a step's folder into
# place only once it is whole).
LONG = ("--config.total_steps=20", "--config.optim.total_steps=20",
        "--config.checkpoint.every=4", "--config.log_every=10")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = _main(workdir, *LONG)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return final_params(str(workdir))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    proc = _main(tmp_path, *LONG)
    wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _main(tmp_path, *LONG)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from step" in out
    for a, b in zip(_leaves(final_params(str(tmp_path))), _leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
    proc = _main(tmp_path, *LONG)
    wait_for_checkpoint(tmp_path, proc, minimum=4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = [line for line in out.splitlines() if line.startswith("stopping at step")]
    assert stopped, out
    step = int(stopped[0].split()[3])
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == step
    resumed = _main(tmp_path, *LONG)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resumed from step {step}" in out, out
    for a, b in zip(_leaves(final_params(str(tmp_path))), _leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_run_writes_metrics_and_resumes_from_workdir(tmp_path):
    config = smoke_config()
    final = train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 4 and final["val/count"] == 40
    assert 0.0 <= final["val/top1"] <= final["val/top5"] <= 1.0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"train/loss"' in line for line in lines)
    assert any('"val/top1"' in line for line in lines)
    assert (tmp_path / "config.json").exists()
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
    # a cut-off save (orbax's temporary directory) is never picked
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4
    # the same command again resumes and has nothing left to do
    again = train_and_evaluate(smoke_config(), str(tmp_path))
    assert again["step"] == 4


def test_checkpoint_on_8_devices_restores_on_4(tmp_path):
    train_and_evaluate(smoke_config(), str(tmp_path))
    saved = final_params(str(tmp_path))
    config = smoke_config()
    task = ClassificationTask(config)
    mesh = parallel.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    _, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    p_shard = parallel.param_shardings(abstract_params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), p_shard)
    tx = optim.make_optimizer(config.optim, params)
    opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=parallel.replicated(mesh)),
                       jax.eval_shape(tx.init, params))
    target = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh)),
              "params": params, "opt_state": opt}
    restored = Checkpointer(tmp_path / "checkpoints").restore(4, target, None)
    assert int(restored["step"]) == 4
    for a, b in zip(jax.tree.leaves(restored["params"]), _leaves(saved), strict=True):
        assert a.sharding.mesh.devices.size == 4
        np.testing.assert_array_equal(np.asarray(a), b)
    d = restored["params"]["encoder"]["layers"]["sparse"]["D"]  # (layers, d, C·d)
    assert d.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_gradient_accumulation_equals_large_batch():
    config = smoke_config()
    task = ClassificationTask(config)
    model = task.build_model(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = optim.make_optimizer(config.optim, params)
    schedule = optim.make_schedule(config.optim)
    batch = jax.tree.map(jnp.asarray, next(task.train_data(16, seed=0)))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    outs = []
    for accum in (1, 4):
        step = jax.jit(make_train_step(task.loss, graphdef, tx, schedule, seed=0,
                                       accum_steps=accum))
        outs.append(step(state, rest, batch))
    (s1, m1), (s4, m4) = outs
    np.testing.assert_allclose(m1["train/loss"], m4["train/loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluation_covers_the_whole_split_once():
    config = smoke_config()
    task = ClassificationTask(config)
    [evaluator] = task.evaluators()
    model = task.build_model(nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = parallel.make_mesh({"fsdp": -1})
    with jax.set_mesh(mesh):
        result = evaluator.run(graphdef, nnx.to_pure_dict(params), rest, mesh)
    # 40 examples in batches of 16: the last batch is padded and masked
    assert result["val/count"] == 40
    from crate_jax.data import images, pipeline

    source = images.image_source(config.data, "test")
    transform = images.eval_transform(config.data)
    examples = [transform(source[i]) for i in range(len(source))]
    x = task.preprocess({"image": jnp.asarray(np.stack([e["image"] for e in examples]))})
    model.eval()
    logits = np.asarray(model(x))
    labels = np.array([e["label"] for e in examples])
    top1 = float((logits.argmax(1) == labels).mean())
    assert result["val/top1"] == pytest.approx(top1, abs=1e-6)
    batches = list(pipeline.eval_batches(source, batch_size=16, transform=transform))
    assert len(batches) == 3 and batches[-1]["mask"].sum() == 8


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = smoke_config(**{"optim.lr": 1e38, "optim.clip_norm": None,
                             "optim.warmup_steps": 0, "checkpoint.every": 1, "log_every": 1})
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train_and_evaluate(config, str(tmp_path))
    latest = Checkpointer(tmp_path / "checkpoints").latest_step()
    assert latest is not None
    for leaf in _leaves(final_params(str(tmp_path))):
        assert np.isfinite(leaf).all()


@pytest.mark.parametrize("updates,error,message", [
    ({"batch_size": 12}, ValueError, "batch_size=12"),
    ({"data.source": "folder", "data.data_dir": "/nonexistent/imagenet"}, FileNotFoundError,
     "data.data_dir"),
    ({"data.source": "webcam"}, ValueError, "data.source"),
    ({"trainer": "regression"}, ValueError, "trainer"),
    ({"optim.name": "sgdx"}, ValueError, "name"),
    ({"mesh": {"data": 3, "fsdp": -1}}, ValueError, "mesh"),
])
def test_bad_settings_are_named(tmp_path, updates, error, message):
    with pytest.raises(error, match=message):
        train_and_evaluate(smoke_config(**updates), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir())


def test_conflicting_workdir_config(tmp_path):
    train_and_evaluate(smoke_config(), str(tmp_path))
    with pytest.raises(ValueError, match="seed"):
        train_and_evaluate(smoke_config(seed=7), str(tmp_path))


def test_cli_rejects_unknown_override_and_argument(tmp_path):
    proc = _main(tmp_path, "--config.no_such_key=1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "no_such_key" in out
    cmd = [sys.executable, "-m", "crate_jax.main", f"--config={DEMO}:bogus",
           f"--workdir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "bogus" in out.stdout + out.stderr


def test_mixup_and_cutmix_keep_label_mass():
    rng = jax.random.key(0)
    images = jax.random.normal(rng, (8, 16, 16, 3))
    labels = jax.nn.one_hot(jnp.arange(8) % 4, 4)
    for fn in (mixing.mixup, mixing.cutmix):
        mixed, targets = fn(jax.random.key(1), images, labels, 1.0)
        assert mixed.shape == images.shape
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # CutMix: the label weight of the original equals the fraction of its pixels kept
    mixed, targets = mixing.cutmix(jax.random.key(2), images, labels, 1.0)
    kept = np.mean(np.all(np.asarray(mixed[0]) == np.asarray(images[0]), axis=-1))
    np.testing.assert_allclose(targets[0, 0], kept, atol=1e-6)
    out_images, out_labels = mixing.mix(rng, images, labels, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert out_images is images and out_labels is labels


def test_drop_path_trains_through_the_loop(tmp_path):
    """DropPath's RNG stream advances inside jax.grad in the train step (a regression: the
    step once reused the outer trace's Variables and raised TraceContextError)."""
    config = smoke_config(**{"model.drop_path_rate": 0.2})
    final = train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 4 and np.isfinite(final["val/loss"])
