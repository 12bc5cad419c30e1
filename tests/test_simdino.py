"""SimDINO: the loss against a NumPy loop, the teacher (a copy of the student, then an EMA the
optimizer never touches), the momentum schedule, and the multi-crop views."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from crate_jax.data import multicrop
from crate_jax.tasks.simdino import SimDINOTask, alignment, teacher_momentum
from crate_jax.train import optim
from crate_jax.train.step import make_train_step, split_frozen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**updates) -> ml_collections.ConfigDict:
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_simdino

    c = demo_simdino.get_config("smoke")
    c.update(updates)
    return c


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_alignment_matches_a_numpy_loop_over_view_pairs():
    rng = np.random.default_rng(0)
    student, teacher = _unit(rng.normal(size=(3, 5, 8))), _unit(rng.normal(size=(3, 2, 8)))
    total = []
    for b in range(3):
        pairs = [0.5 * np.sum((student[b, v] - teacher[b, i]) ** 2)
                 for i in range(2) for v in range(5) if v != i]
        assert len(pairs) == 2 * 1 + 2 * 3
        total.append(np.mean(pairs))
    np.testing.assert_allclose(alignment(jnp.asarray(student), jnp.asarray(teacher)),
                               np.mean(total), rtol=1e-5)


def test_loss_is_alignment_minus_the_weighted_coding_rate():
    config = smoke_config(coding_rate_weight=0.3, eps_sq=0.5)
    task = SimDINOTask(config)
    model = task.build_model(nnx.Rngs(0))
    batch = {k: jnp.asarray(np.random.default_rng(1).integers(0, 255, v.shape, np.uint8))
             for k, v in task.example_batch(8).items()}
    loss, aux = task.loss(model, batch, jax.random.key(0))
    glob, _ = task._views(batch["global"])
    z = np.asarray(model.student(glob)).reshape(8, 2, -1)
    rates = []
    for j in range(2):  # R = ½ logdet(I + k/(B ε²) ZᵀZ) per global view
        zj = z[:, j].astype(np.float64)
        alpha = zj.shape[1] / (8 * 0.5)
        rates.append(0.5 * np.linalg.slogdet(np.eye(zj.shape[1]) + alpha * zj.T @ zj)[1])
    np.testing.assert_allclose(aux["coding_rate"], np.mean(rates), rtol=1e-4)
    np.testing.assert_allclose(loss, aux["align"] - 0.3 * np.mean(rates), rtol=1e-4)


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
