"""Gradient accumulation that keeps the contrastive objective: the train step with
grad_accum_steps=4 (feature caching) on 8 fake devices gives the loss and the gradients of one
step on the whole batch; plain accumulation, which would see a quarter of the negatives, gives
other gradients and is refused by name."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from crate_jax import parallel, tasks
from crate_jax.config_check import load_config
from crate_jax.train.step import make_train_step, task_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 32


def _setup(accum: int, mode: str = "auto"):
    config = load_config(os.path.join(ROOT, "configs", "demo.py") + ":smoke")
    config.batch_size = BATCH
    config.grad_accum_steps = accum
    config.grad_accum_mode = mode
    task = tasks.get(config.trainer)(config)
    model = task.build_model(nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return config, task, graphdef, nnx.to_pure_dict(params), rest


def _batch(task):
    it = task.train_data(BATCH, seed=0)
    return next(it)


def _one_step(accum: int, mode: str = "auto", plain: bool = False):
    """(loss, grad_norm, the gradient) of one step: SGD with lr 1 makes params − new = ∇."""
    config, task, graphdef, params, rest = _setup(accum, mode)
    tx = optax.sgd(1.0)
    if plain:  # what the step would do without feature caching
        step = make_train_step(task.loss, graphdef, tx, optax.constant_schedule(1.0), seed=0,
                               accum_steps=accum)
    else:
        step = task_train_step(task, config, graphdef, tx, optax.constant_schedule(1.0), ())
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
    with jax.set_mesh(mesh):
        batch = jax.device_put(_batch(task), parallel.batch_sharding(mesh))
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params)}
        new, metrics = jax.jit(step)(state, rest, batch)
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new["params"])
    return float(metrics["train/loss"]), float(metrics["train/grad_norm"]), grads


@pytest.fixture(scope="module")
def whole_batch():
    return _one_step(1)


def test_four_micro_batches_give_the_whole_batch_gradients(whole_batch):
    loss, norm, grads = whole_batch
    loss4, norm4, grads4 = _one_step(4)
    np.testing.assert_allclose(loss4, loss, rtol=1e-5)
    np.testing.assert_allclose(norm4, norm, rtol=1e-5)
    leaves, leaves4 = jax.tree.leaves(grads), jax.tree.leaves(grads4)
    assert len(leaves) == len(leaves4) > 20
    scale = max(float(np.abs(g).max()) for g in leaves)
    for (path, g), g4 in zip(jax.tree_util.tree_flatten_with_path(grads)[0], leaves4,
                             strict=True):
        np.testing.assert_allclose(g4, g, rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    # the temperature's own gradient is counted once, not once per micro-batch
    np.testing.assert_allclose(grads4["logit_scale"], grads["logit_scale"], rtol=1e-4)
    assert abs(float(grads["logit_scale"])) > 1e-4


def test_plain_accumulation_is_another_objective_and_is_refused(whole_batch):
    loss, _, grads = whole_batch
    plain_loss, _, plain = _one_step(4, plain=True)
    assert plain_loss < loss - 0.3  # 8 candidates per row instead of 32: an easier task
    assert not np.allclose(plain["image_proj"]["kernel"], grads["image_proj"]["kernel"],
                           rtol=1e-2)
    config, task, graphdef, _, _ = _setup(4, mode="plain")
    with pytest.raises(ValueError, match=r"grad_accum_mode='plain'.*8 negatives instead of 32"):
        task_train_step(task, config, graphdef, optax.sgd(1.0), optax.constant_schedule(1.0),
                        ())


def test_a_frozen_sub_tree_is_not_updated_and_has_no_optimizer_state():
    from crate_jax.train.step import split_frozen

    config, task, graphdef, params, rest = _setup(1)
    frozen = ("image/encoder/layers/attn", "logit_scale")  # every layer's attention
    trainable, _ = split_frozen(params, frozen)
    tx = optax.adam(0.1)
    step = task_train_step(task, config, graphdef, tx, optax.constant_schedule(0.1), frozen)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(trainable)}
    new, _ = jax.jit(step)(state, rest, _batch(task))
    before, after = params["image"]["encoder"]["layers"], new["params"]["image"]["encoder"]
    for a, b in zip(jax.tree.leaves(before["attn"]), jax.tree.leaves(after["layers"]["attn"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(before["sparse"]["D"], after["layers"]["sparse"]["D"])
    assert float(new["params"]["logit_scale"]) == float(params["logit_scale"])
    moments = new["opt_state"][0].mu
    assert "attn" not in moments["image"]["encoder"]["layers"] and "logit_scale" not in moments


def test_a_mistyped_accumulation_mode_or_evaluator_kind_is_named():
    from crate_jax.inference import eval_specs

    config, task, graphdef, _, _ = _setup(4, mode="featurse")
    with pytest.raises(ValueError, match=r"grad_accum_mode='featurse'"):
        task_train_step(task, config, graphdef, optax.sgd(1.0), optax.constant_schedule(1.0),
                        ())
    with pytest.raises(ValueError, match=r"--evals: \['zeroshoot'\] unknown"):
        eval_specs(config, ["zeroshoot"], "auto", None)
