"""SimDINO: the official objective (tests/numpy_reference.py `simdino_mcr_loss`: expansion on
(student + teacher)/2 per global view, γ by formula, the 2V − 2 alignment pairs, per-shard or
global covariance on 8 fake devices), exact gradient accumulation, the teacher (a copy of the
student, then an EMA the optimizer never touches), the momentum schedule, and the multi-crop
views."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import numpy_reference
import optax
import pytest
from flax import nnx

from crate_jax import parallel
from crate_jax.data import multicrop
from crate_jax.tasks.simdino import (
    Objective,
    SimDINOTask,
    alignment,
    batch_shards,
    gamma,
    objective,
    teacher_momentum,
)
from crate_jax.train import optim
from crate_jax.train.step import make_train_step, split_frozen, task_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**updates) -> ml_collections.ConfigDict:
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_simdino

    c = demo_simdino.get_config("smoke")
    c.update(updates)
    return c


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_alignment_is_the_mean_cosine_over_the_2v_minus_2_pairs():
    # the official comp_loss (a mean cosine, maximised) replaces the former mean of
    # ½‖s − t‖² = 1 − cosine (minimised): the same gradient, the official sign and value
    rng = np.random.default_rng(0)
    student, teacher = _unit(rng.normal(size=(3, 5, 8))), _unit(rng.normal(size=(3, 2, 8)))
    pairs = [np.mean(np.sum(student[:, v] * teacher[:, i], -1))
             for i in range(2) for v in range(5) if v != i]
    assert len(pairs) == 2 * 5 - 2
    np.testing.assert_allclose(alignment(jnp.asarray(student), jnp.asarray(teacher)),
                               np.mean(pairs), rtol=1e-5)


def test_gamma_is_the_official_formula():
    assert gamma(256, 1024, 1) == pytest.approx(0.004883, rel=1e-3)  # docs/design.md §1
    assert gamma(256, 64, 8) == pytest.approx(1 / 256 + 1 / 512)  # the README's 8 × 64
    assert gamma(256, 64, 8) == gamma(256, 512, 1)  # γ depends on the global batch only


def _features(batch, views=4, globals_=2, k=6, seed=0):
    rng = np.random.default_rng(seed)
    return (_unit(rng.normal(size=(batch, views, k))).astype(np.float32),
            _unit(rng.normal(size=(batch, globals_, k))).astype(np.float32))


def _crop_major(x):
    return np.swapaxes(np.asarray(x, np.float64), 0, 1)


@pytest.mark.parametrize("expa_type", [1, 0])
def test_objective_is_the_official_loss_on_one_device(expa_type):
    student, teacher = _features(16)
    settings = Objective(eps=0.05, coeff=0.7, expa_type=expa_type)
    loss, aux = objective(jnp.asarray(student), jnp.asarray(teacher), settings)
    want = numpy_reference.simdino_mcr_loss(_crop_major(student), _crop_major(teacher),
                                           eps=0.05, coeff=0.7, expa_type=expa_type)
    np.testing.assert_allclose([loss, aux["comp_loss"], aux["expa_loss"]], want, rtol=2e-5)
    other = numpy_reference.simdino_mcr_loss(_crop_major(student), _crop_major(teacher),
                                            eps=0.05, coeff=0.7, expa_type=1 - expa_type)
    assert abs(other[2] - want[2]) > 1e-3  # the two expansion features differ


@pytest.mark.parametrize("reduce_cov", [0, 1])
def test_reduce_cov_per_shard_or_global_on_eight_devices(reduce_cov):
    """8 fake devices (tests/conftest.py), 32 rows: each data shard holds m = 4 rows."""
    student, teacher = _features(32, seed=1)
    task = SimDINOTask(smoke_config(eps=0.05, reduce_cov=reduce_cov))
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
    with jax.set_mesh(mesh):
        feats = jax.device_put({"student": student, "teacher": teacher},
                               parallel.batch_sharding(mesh))
        loss, aux = jax.jit(lambda f: task.features_loss(None, f, None))(feats)
    want = [numpy_reference.simdino_mcr_loss(_crop_major(student), _crop_major(teacher),
                                            eps=0.05, reduce_cov=r, devices=8) for r in (0, 1)]
    np.testing.assert_allclose([loss, aux["comp_loss"], aux["expa_loss"]], want[reduce_cov],
                               rtol=2e-5)
    assert abs(want[0][2] - want[1][2]) > 1e-2  # per-shard and global covariances differ


def test_task_loss_on_the_model_is_the_official_loss():
    task = SimDINOTask(smoke_config())
    model = task.build_model(nnx.Rngs(0))
    batch = {k: jnp.asarray(np.random.default_rng(1).integers(0, 255, v.shape, np.uint8))
             for k, v in task.example_batch(8).items()}
    loss, aux = nnx.jit(task.loss)(model, batch, jax.random.key(0))
    feats = nnx.jit(task.features)(model, batch, jax.random.key(0))
    assert feats["student"].shape == (8, 4, 16) and feats["teacher"].shape == (8, 2, 16)
    want = numpy_reference.simdino_mcr_loss(_crop_major(feats["student"]),
                                           _crop_major(feats["teacher"]), eps=0.05)
    np.testing.assert_allclose([loss, aux["comp_loss"], aux["expa_loss"]], want, rtol=2e-5)


@pytest.mark.parametrize("updates,setting", [
    (dict(eps_sq=0.5), "eps_sq"), (dict(coding_rate_weight=0.02), "coding_rate_weight"),
    (dict(expa_type=2), "expa_type"), (dict(reduce_cov=-1), "reduce_cov"),
    (dict(eps=0.0), "eps"),
])
def test_bad_or_retired_objective_settings_are_named(updates, setting):
    config = smoke_config()
    config.update(updates)
    with pytest.raises(ValueError, match=f"^{setting}: "):
        SimDINOTask(config)


def test_a_batch_the_shards_do_not_divide_is_refused():
    assert batch_shards(12) == 1  # no mesh: one shard
    with jax.set_mesh(parallel.make_mesh({"data": -1})):
        assert batch_shards(16) == 8
        with pytest.raises(ValueError, match=r"batch_size: .* 12 rows .* the 8 data-parallel"):
            batch_shards(12)


def _accumulated_step(accum: int, mode: str = "auto"):
    """(loss, the student's gradient) of one SGD step (lr 1) on 8 devices, batch 32."""
    config = smoke_config(grad_accum_steps=accum, grad_accum_mode=mode, batch_size=32)
    task = SimDINOTask(config)
    model = task.build_model(nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(1.0)
    step = task_train_step(task, config, graphdef, tx, optax.constant_schedule(1.0),
                           ("teacher",))
    mesh = parallel.make_mesh({"data": -1})
    batch = {k: np.random.default_rng(2).integers(0, 255, v.shape, np.uint8)
             for k, v in task.example_batch(32).items()}
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, parallel.batch_sharding(mesh))
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(split_frozen(params, ("teacher",))[0])}
        new, metrics = jax.jit(step)(state, rest, batch)
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params["student"],
                         new["params"]["student"])
    return float(metrics["train/loss"]), grads


def test_accumulated_micro_batches_give_the_whole_batch_update():
    """grad_accum_steps=2 caches the features of both micro-batches and takes the objective
    (per-shard covariances included) on the whole batch: the update of one step on it."""
    loss, grads = _accumulated_step(1)
    loss2, grads2 = _accumulated_step(2)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-5 * scale)
    config = smoke_config(grad_accum_steps=2, grad_accum_mode="plain", batch_size=32)
    with pytest.raises(ValueError, match="grad_accum_mode='plain'"):
        task_train_step(SimDINOTask(config), config, None, optax.sgd(1.0),
                        optax.constant_schedule(1.0), ("teacher",))


def test_momentum_schedule_rises_from_start_to_end():
    m = [float(teacher_momentum(jnp.asarray(s), 0.99, 1.0, 100)) for s in (0, 50, 100, 200)]
    np.testing.assert_allclose(m, [0.99, 0.995, 1.0, 1.0], atol=1e-7)


def test_teacher_starts_as_the_student_and_follows_by_ema_only():
    config = smoke_config(teacher_momentum=0.9, teacher_momentum_end=0.9)
    config.optim.update(lr=0.05, warmup_steps=0)
    task = SimDINOTask(config)
    model = task.build_model(nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    for s, t in zip(jax.tree.leaves(params["student"]), jax.tree.leaves(params["teacher"]),
                    strict=True):
        np.testing.assert_array_equal(s, t)
    frozen = ("teacher",)
    trainable = split_frozen(params, frozen)[0]
    assert set(trainable) == {"student"}  # the optimizer never sees the teacher
    tx = optim.make_optimizer(config.optim, trainable)
    step = jax.jit(make_train_step(task.loss, graphdef, tx, optim.make_schedule(config.optim),
                                   seed=0, frozen=frozen, after_update=task.after_update))
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(trainable)}
    batch = {k: jnp.asarray(np.random.default_rng(2).integers(0, 255, v.shape, np.uint8))
             for k, v in task.example_batch(16).items()}
    new, metrics = step(state, rest, batch)
    assert np.isfinite(float(metrics["train/loss"]))
    moved = False
    for t0, s1, t1 in zip(jax.tree.leaves(params["teacher"]),
                          jax.tree.leaves(new["params"]["student"]),
                          jax.tree.leaves(new["params"]["teacher"]), strict=True):
        np.testing.assert_allclose(t1, 0.9 * np.asarray(t0) + 0.1 * np.asarray(s1),
                                   rtol=1e-6, atol=1e-7)
        moved |= not np.allclose(t1, t0)
    assert moved


def _data(**updates):
    base = dict(image_size=16, global_crops=2, local_crops=3, local_size=8)
    return ml_collections.ConfigDict({**base, **updates})


def test_multicrop_views_come_from_the_example_rng_alone():
    transform = multicrop.multicrop_transform(_data())
    example = {"image": np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8),
               "label": 3}
    a = transform(example, np.random.default_rng(7))
    b = transform(example, np.random.default_rng(7))
    c = transform(example, np.random.default_rng(8))
    assert a["global"].shape == (2, 16, 16, 3) and a["local"].shape == (3, 8, 8, 3)
    assert a["global"].dtype == np.uint8 and "label" not in a
    for key in ("global", "local"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["global"], c["global"])
    shapes = {k: v.shape[1:] for k, v in multicrop.example_views(_data(), 4).items()}
    assert shapes == {k: v.shape for k, v in a.items()}


@pytest.mark.parametrize("updates,setting", [
    (dict(global_crops=1), "data.global_crops"),
    (dict(local_scale=(0.5, 0.2)), "data.local_scale"),
    (dict(grayscale_prob=1.5), "data.grayscale_prob"),
])
def test_bad_multicrop_settings_are_named(updates, setting):
    with pytest.raises(ValueError, match=setting):
        multicrop.multicrop_transform(_data(**updates))


@pytest.mark.parametrize("backbone", ["crate-t/4", "crate-alpha-ti/4", "vit-ti/4"])
def test_local_views_run_through_a_resized_position_table(backbone):
    config = smoke_config()
    config.model.name = backbone  # any registry image backbone (the demo's is CRATE)
    task = SimDINOTask(config)
    model = task.build_model(nnx.Rngs(0))
    small = model.student(jnp.zeros((2, 8, 8, 3)))
    assert small.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(small, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="image_size"):  # the classifier stays strict
        model.student.backbone(jnp.zeros((2, 8, 8, 3)))
