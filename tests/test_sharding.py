"""Mesh and logical-axis sharding on 8 fake CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from crate_jax import config_utils, models, parallel
from crate_jax.parallel.mesh import resolve_mesh_shape
from crate_jax.tasks.classification import ClassificationTask
from crate_jax.train import optim
from crate_jax.train.step import make_train_step


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape,expected", [
    ({"data": 2, "fsdp": -1}, (2, 4, 1)), ({"fsdp": -1}, (1, 8, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)), ({"tensor": 8}, (1, 1, 8)),
])
def test_mesh_shapes(shape, expected):
    assert resolve_mesh_shape(shape, 8) == expected
    assert tuple(parallel.make_mesh(shape).shape.values()) == expected


@pytest.mark.parametrize("shape,message", [
    ({"data": 3, "fsdp": -1}, "does not divide"), ({"data": 2, "fsdp": 2}, "needs 4 devices"),
    ({"data": -1, "fsdp": -1}, "at most one"), ({"pipeline": 2}, "unknown axes"),
])
def test_bad_mesh(shape, message):
    with pytest.raises(ValueError, match=message):
        resolve_mesh_shape(shape, 8)


def test_logical_spec_rules():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = parallel.logical_spec
    assert spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
    assert spec(("embed", "heads", "kv"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    # not divisible → replicated along that dimension
    assert spec(("embed", "classes"), (64, 5), mesh) == P("fsdp", None)
    # a mesh axis is used once per array
    assert spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
    assert spec(None, (3,), mesh) == P()
    with pytest.raises(ValueError, match="no rule for logical axis 'bogus'"):
        spec(("bogus",), (4,), mesh)


def _tiny_config(depth=2):
    c = config_utils.base_config()
    c.data = dict(source="synthetic_shapes", image_size=16, num_classes=4,
                  num_train_examples=64, num_eval_examples=16, train_split="train",
                  eval_split="test", train_augment="none")
    c.model.name = "crate-alpha-ti/8"
    c.model.overrides = dict(width=32, depth=depth, heads=4)
    c.optim.update(total_steps=10, warmup_steps=2, lr=1e-2)
    return c


def _abstract_and_shardings(config, mesh):
    task = ClassificationTask(config)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    return task, graphdef, abstract_params, parallel.param_shardings(abstract_params, mesh)


def test_params_and_optimizer_state_land_on_rule_shardings():
    config = _tiny_config()
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    task, _, abstract_params, p_shard = _abstract_and_shardings(config, mesh)

    def init():
        return nnx.to_pure_dict(nnx.state(task.build_model(nnx.Rngs(0)), nnx.Param))

    params = jax.jit(init, out_shardings=p_shard)()
    expected = {
        "/".join(map(str, path)): parallel.logical_spec(var.get_metadata()["out_sharding"],
                                                        var.shape, mesh)
        for path, var in nnx.to_flat_state(abstract_params)}
    flat = {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(flat) == set(expected)
    for key, leaf in flat.items():
        assert leaf.sharding.spec == expected[key], key
    assert flat["encoder/layers/0/sparse/D"].sharding.spec == P("fsdp", "tensor")
    assert flat["encoder/layers/0/attn/proj"].sharding.spec == P("fsdp", "tensor", None)
    # the fsdp shard really holds a quarter of D (fsdp 2 × tensor 2)
    d = flat["encoder/layers/0/sparse/D"]
    assert d.addressable_shards[0].data.shape == (16, 64)

    tx = optim.make_optimizer(config.optim, params)
    replicated = parallel.replicated(mesh)
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                                      p_shard, transform_non_params=lambda _: replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
    # Adam's moments mirror the parameters' shardings leaf for leaf
    moments = optax.tree_map_params(tx, lambda leaf: leaf.sharding.spec, opt_state,
                                    transform_non_params=lambda _: None)
    for mu in jax.tree.leaves(moments, is_leaf=lambda x: isinstance(x, P)):
        assert isinstance(mu, P)
    mu_d = optax.tree_map_params(tx, lambda leaf: leaf, opt_state,
                                 transform_non_params=lambda _: None)
    found = [leaf for leaf in jax.tree.leaves(mu_d) if getattr(leaf, "shape", None) == (32, 128)]
    assert found and all(leaf.sharding.spec == P("fsdp", "tensor") for leaf in found)


def _one_step_loss(mesh_shape):
    config = _tiny_config(depth=1)
    devices = jax.devices()[:1] if mesh_shape is None else None
    mesh = parallel.make_mesh(mesh_shape or {"data": 1}, devices=devices)
    task, graphdef, _, p_shard = _abstract_and_shardings(config, mesh)

    def init():
        _, params, rest = nnx.split(task.build_model(nnx.Rngs(0)), nnx.Param, ...)
        return nnx.to_pure_dict(params), rest

    with jax.set_mesh(mesh):
        params, rest = jax.jit(init, out_shardings=(p_shard, parallel.replicated(mesh)))()
        tx = optim.make_optimizer(config.optim, params)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params)}
        step = jax.jit(make_train_step(task.loss, graphdef, tx, optim.make_schedule(config.optim),
                                       seed=0))
        batch = next(task.train_data(16, seed=0))
        batch = parallel.host_batch_to_global(batch, mesh)
        state, m1 = step(state, rest, batch)
        _, m2 = step(state, rest, batch)
    return float(m1["train/loss"]), float(m2["train/loss"])


def test_same_loss_on_every_mesh():
    reference = _one_step_loss(None)
    # (pure data parallelism is the data axis of these two)
    for shape in ({"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}):
        np.testing.assert_allclose(_one_step_loss(shape), reference, rtol=2e-5, err_msg=str(shape))


def test_host_batch_to_global():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    out = parallel.host_batch_to_global(batch, mesh)["x"]
    assert out.shape == (16, 3) and out.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out), batch["x"])
    assert len(out.addressable_shards) == 8 and out.addressable_shards[0].data.shape == (2, 3)


def test_model_parameter_names_have_rules():
    for name in ("crate-alpha-ti/8", "crate-t/8", "vit-ti/8", "text-ti"):
        overrides = dict(width=32, depth=1, heads=4)
        if name.startswith("text"):
            overrides.update(vocab_size=64, eot_id=63)
        else:
            overrides.update(image_size=16)
        abstract = nnx.eval_shape(lambda n=name, o=overrides: models.create(n, **o))
        names = {a for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
                 for a in v.get_metadata()["out_sharding"] if a}
        assert names <= set(parallel.DEFAULT_RULES), names
