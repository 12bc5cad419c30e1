"""Mesh and logical-axis sharding on 8 fake CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from crate_jax import config_utils, models, parallel
from crate_jax.parallel import mesh as mesh_lib
from crate_jax.parallel.mesh import resolve_mesh_shape
from crate_jax.parallel.sharding import data_parallel_size
from crate_jax.tasks.classification import ClassificationTask
from crate_jax.train import optim
from crate_jax.train.step import make_train_step


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape,expected", [
    ({"data": 2, "fsdp": -1}, (1, 2, 4, 1)), ({"fsdp": -1}, (1, 1, 8, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (1, 2, 2, 2)), ({"tensor": 8}, (1, 1, 1, 8)),
    ({"dcn": 2, "fsdp": 4}, (2, 1, 4, 1)),
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
    # the stacked layer axis (logical 'layers') is never split
    assert flat["encoder/layers/sparse/D"].sharding.spec == P(None, "fsdp", "tensor")
    assert flat["encoder/layers/attn/proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    # the fsdp shard really holds a quarter of D (fsdp 2 × tensor 2), for every layer
    d = flat["encoder/layers/sparse/D"]
    assert d.addressable_shards[0].data.shape == (d.shape[0], 16, 64)

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
    found = [leaf for leaf in jax.tree.leaves(mu_d)
             if getattr(leaf, "shape", None) == (d.shape[0], 32, 128)]
    assert found and all(leaf.sharding.spec == P(None, "fsdp", "tensor") for leaf in found)


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
    assert out.shape == (16, 3) and out.sharding.spec == P(("dcn", "data", "fsdp"))
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


# --- the dcn (multi-slice) axis ------------------------------------------------------------

def test_dcn_mesh_without_slices_is_a_plain_reshape():
    """CPU devices have no slice_index: dcn is the outermost axis of the devices in order. The
    batch is split over it, parameters are not."""
    mesh = parallel.make_mesh({"dcn": 2, "fsdp": 4})
    assert mesh.axis_names == parallel.MESH_AXES == ("dcn", "data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
    assert list(mesh.devices.flat) == jax.devices()
    assert parallel.logical_spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", None)
    assert all("dcn" not in _axes(v) for k, v in parallel.DEFAULT_RULES.items() if k != "batch")
    assert data_parallel_size(mesh) == 8
    batch = {"x": np.arange(16, dtype=np.float32)}
    out = parallel.host_batch_to_global(batch, mesh)["x"]
    assert out.sharding.spec == P(("dcn", "data", "fsdp"))
    # dcn index 1 (the second slice's devices) holds the second half of the batch
    shards = {s.device: np.asarray(s.data) for s in out.addressable_shards}
    np.testing.assert_array_equal(shards[mesh.devices[1, 0, 0, 0]], [8, 9])


def _axes(rule):
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


class _SliceDevice:
    """A stand-in for a multi-host device: what jax's hybrid mesh reads."""

    def __init__(self, id, slice_index, platform="gpu"):
        self.id, self.slice_index, self.platform = id, slice_index, platform
        self.device_kind = "fake"


def test_dcn_over_slices_uses_the_hybrid_mesh():
    # devices listed with the slices interleaved: the hybrid mesh groups them by slice_index
    devices = [_SliceDevice(i, i % 2) for i in range(8)]
    grid = mesh_lib._hybrid_devices((2, 1, 4, 1), devices, slices=2)
    assert grid.shape == (2, 1, 4, 1)
    for s in range(2):
        assert {d.slice_index for d in grid[s].flat} == {s}


@pytest.mark.parametrize("shape,message", [
    ({"dcn": 4, "fsdp": 2}, r"mesh.dcn=4, but the 8 devices span 2 slice"),
    ({"fsdp": 8}, r"mesh.dcn=1, but the 8 devices span 2 slice.*set mesh.dcn=2"),
])
def test_dcn_must_match_the_slice_count(shape, message):
    devices = [_SliceDevice(i, i // 4, platform="tpu") for i in range(8)]
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(shape, devices=devices)
    # one TPU slice: dcn 2 is refused as well
    one_slice = [_SliceDevice(i, 0, platform="tpu") for i in range(8)]
    with pytest.raises(ValueError, match=r"mesh.dcn=2, but the 8 devices span 1 slice"):
        parallel.make_mesh({"dcn": 2, "fsdp": 4}, devices=one_slice)


# --- parameters the mesh does not divide -----------------------------------------------------

class _Head(nnx.Module):
    def __init__(self, width: int, classes: int = 10):
        self.kernel = nnx.Param(jnp.zeros((classes, width)), out_sharding=("classes", "embed"),
                                eager_sharding=False)
        self.square = nnx.Param(jnp.zeros((64, 64)), out_sharding=("embed", "embed"),
                                eager_sharding=False)


def _undivided(width, mesh_shape, classes=10):
    params = nnx.state(nnx.eval_shape(lambda: _Head(width, classes)), nnx.Param)
    mesh = parallel.make_mesh(mesh_shape)
    lines = parallel.undivided_parameters(params, mesh)
    specs = parallel.param_shardings(params, mesh)
    return lines, specs["kernel"].spec


def test_undivided_parameters_are_named():
    # 1280 = 8 · 160 shards; the square's second 'embed' finds fsdp taken (not a size problem)
    assert _undivided(1280, {"fsdp": 8}) == ([], P(None, "fsdp"))
    lines, spec = _undivided(1281, {"fsdp": 8})
    assert spec == P(None, None) and lines == [
        "kernel (10, 1281): dim 1 ('embed', 1281) is replicated, fsdp=8 does not divide it; "
        "no mesh size along fsdp divides 1281; a size of 1288 would"]
    lines, _ = _undivided(1284, {"fsdp": 8})  # 1284 = 4 · 321
    assert "fsdp:4 would shard it (the other 2× on data), as would a size of 1288" in lines[0]
    # both axes of the head: 10 classes on tensor 4, 1282 on fsdp 2 (fine)
    lines, spec = _undivided(1282, {"fsdp": 2, "tensor": 4})
    assert spec == P(None, "fsdp") and len(lines) == 1
    assert lines[0].startswith("kernel (10, 1282): dim 0 ('classes', 10) is replicated, "
                               "tensor=4 does not divide it; tensor:2 would shard it")
    text = parallel.format_undivided(lines * 3, limit=2)
    assert text.startswith("3 parameter dimension(s) stay replicated")
    assert text.count("kernel (10, 1282)") == 2 and text.endswith("... and 1 more")
    assert parallel.format_undivided([]) == ""
