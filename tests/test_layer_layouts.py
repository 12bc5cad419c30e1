"""Checkpoints written before the encoder was scanned hold one entry per layer
('encoder/layers/0/...'); they must still restore, resume and finetune. The per-layer state
below is written by the same orbax Checkpointer the trainer used then, so the files on disk
have that layout exactly."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from crate_jax import models
from crate_jax.models import layer_stack
from crate_jax.parallel import make_mesh, param_shardings, replicated
from crate_jax.train.checkpoint import Checkpointer


class _Iterator:
    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def _state():
    model = models.create("crate-alpha-ti/8", num_classes=5, width=32, depth=3, heads=2,
                          image_size=16)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params = jax.tree.map(lambda x: x + np.random.default_rng(x.size).normal(
        size=x.shape).astype(x.dtype), params)
    tx = optax.adam(1e-3)
    return model, {"step": np.int32(7), "params": params, "opt_state": tx.init(params)}


def test_stack_and_unstack_are_inverse_and_walk_optimizer_states():
    _, state = _state()
    per_layer = layer_stack.unstack_layers(state)
    assert sorted(per_layer["params"]["encoder"]["layers"]) == [0, 1, 2]
    assert layer_stack.has_per_layer(per_layer) and not layer_stack.has_per_layer(state)
    mu = per_layer["opt_state"][0].mu["encoder"]["layers"][2]["sparse"]["D"]
    np.testing.assert_array_equal(mu, state["opt_state"][0].mu["encoder"]["layers"]["sparse"]
                                  ["D"][2])
    back = layer_stack.stack_layers(per_layer)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    flat = layer_stack.unstack_flat(models.flat_params(state["params"]))
    assert "encoder/layers/1/attn/proj" in flat and "encoder/layers/attn/proj" not in flat
    with pytest.raises(ValueError, match="not 0 … 1"):
        layer_stack.stack_layers({"encoder": {"layers": {0: {"w": np.ones(2)},
                                                         2: {"w": np.ones(2)}}}})


def test_a_per_layer_checkpoint_restores_into_the_stacked_layout(tmp_path):
    model, state = _state()
    writer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    it = _Iterator()
    it.position = 11
    writer.save(7, layer_stack.unstack_layers(state), it)  # the old layout, on disk
    writer.close()

    mesh = make_mesh({"fsdp": 4}, devices=jax.devices()[:4])
    p_shard = param_shardings(nnx.state(model, nnx.Param), mesh)
    rep = replicated(mesh)
    opt_shard = optax.tree_map_params(optax.adam(1e-3), lambda _, s: s, state["opt_state"],
                                      p_shard, transform_non_params=lambda _: rep)
    shardings = {"step": rep, "params": p_shard, "opt_state": opt_shard}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                              sharding=s), state, shardings)
    reader = Checkpointer(tmp_path / "checkpoints", async_save=False)
    fresh = _Iterator()
    step, restored = reader.restore_latest(abstract, fresh)
    assert step == 7 and fresh.position == 11
    for a, b, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                          jax.tree.leaves(abstract), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert a.sharding == want.sharding  # stacked straight into the run's shardings
    d = restored["params"]["encoder"]["layers"]["sparse"]["D"]
    assert tuple(d.sharding.spec)[:2] == (None, "fsdp")  # the layer axis is never split

    # finetuning reads the parameters' shapes and a subset of them the same way
    _, shapes = reader.saved_params(None)
    assert shapes["encoder"]["layers"]["sparse"]["D"].shape == (3, 32, 128)
    one = NamedSharding(mesh, PartitionSpec())
    target = {"encoder": {"layers": {"sparse": {"D": jax.ShapeDtypeStruct(
        (3, 32, 128), np.float32, sharding=one)}}}}
    subset = reader.restore_param_subset(7, target)
    np.testing.assert_array_equal(subset["encoder"]["layers"]["sparse"]["D"],
                                  state["params"]["encoder"]["layers"]["sparse"]["D"])
    reader.close()


def test_the_state_builder_names_parameters_the_mesh_leaves_replicated():
    """build_train_state (trainer, planner and tests share it) reports each parameter
    dimension the mesh does not divide: the demo's 4-class head on 4 tensor shards divides,
    on 8 it cannot."""
    import os
    import sys

    from crate_jax.train.state import build_train_state

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs"))
    import demo_classification

    config = demo_classification.get_config("smoke")
    state = build_train_state(config, make_mesh({"tensor": 8}))
    head = [line for line in state.undivided if line.startswith("head/")]
    assert head and "tensor" in head[0], state.undivided
    d = state.abstract_state["params"]["encoder"]["layers"]["sparse"]["D"]
    assert d.sharding.spec[0] is None  # the stacked layer axis
    opt_leaves = jax.tree.leaves(state.abstract_state["opt_state"])
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
               for x in opt_leaves)


def test_a_workdir_from_before_the_dcn_axis_resumes_and_a_real_change_is_refused(tmp_path):
    """config.json written before mesh.dcn existed lacks the key; the default (1) means what
    its absence meant, so the run resumes. Any other value is a different run."""
    import json

    import ml_collections
    from etils import epath

    from crate_jax.train.loop import check_workdir_config

    config = ml_collections.ConfigDict({"mesh": {"dcn": 1, "fsdp": -1}, "batch_size": 8})
    (tmp_path / "config.json").write_text(json.dumps({"mesh": {"fsdp": -1}, "batch_size": 8}))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # a run to resume
    check_workdir_config(config, epath.Path(tmp_path))
    config.mesh.dcn = 2
    with pytest.raises(ValueError, match=r"mesh\.dcn"):
        check_workdir_config(config, epath.Path(tmp_path))


def test_freezing_one_stacked_layer_is_refused_with_the_way_to_say_it():
    from crate_jax.train.step import split_frozen

    _, state = _state()
    with pytest.raises(ValueError, match=r"layers are stacked.*encoder/layers/attn"):
        split_frozen(state["params"], ("encoder/layers/0",))
    trainable, fixed = split_frozen(state["params"], ("encoder/layers/attn",))
    assert set(fixed["encoder"]["layers"]) == {"attn"}
    assert "attn" not in trainable["encoder"]["layers"]
