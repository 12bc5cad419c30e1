"""How the checkpointer has orbax write arrays: a small replicated array whole, by one replica,
with no slicing program per replica; a large one still split over its replicas. Either way the
checkpoint restores bit for bit."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from crate_jax.train.checkpoint import (
    MIN_REPLICA_SLICE_BYTES,
    Checkpointer,
    use_array_handler,
)

LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # one event per program lowered


class _Position:
    """A data iterator at position 0 (the get_state/set_state protocol)."""

    def get_state(self):
        return {"pos": 0}

    def set_state(self, state):
        assert state == {"pos": 0}


@pytest.fixture
def events():
    counts = collections.Counter()

    def listen(event, duration, **kwargs):
        counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield counts
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture
def default_handler():
    yield
    use_array_handler(MIN_REPLICA_SLICE_BYTES)  # a test that changed it leaves no trace


def _lowered_by_save(tmp_path, name, array, events, min_slice_bytes=None) -> int:
    """Programs lowered while a Checkpointer saves {'a': array} for the first time (the
    digest's program among them), and a check that the save restores exactly. Each call
    takes an array of a shape no other call uses, so that no program is already made.
    `min_slice_bytes`: replaces the threshold the Checkpointer sets."""
    checkpointer = Checkpointer(tmp_path / name, async_save=False)
    if min_slice_bytes is not None:
        use_array_handler(min_slice_bytes)
    state = {"step": jnp.int32(1), "params": {"a": array}}
    events.clear()
    checkpointer.save(1, state, _Position())
    checkpointer.manager.wait_until_finished()
    lowered = events[LOWERED]
    restored = checkpointer.manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state)))["state"]
    np.testing.assert_array_equal(np.asarray(restored["params"]["a"]), np.asarray(array))
    return lowered


def _replicated(shape, offset: float):
    mesh = jax.make_mesh((8,), ("x",))
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + offset
    return jax.device_put(values, NamedSharding(mesh, PartitionSpec()))


def test_small_replicated_arrays_are_written_whole(tmp_path, events, default_handler):
    # 480 and 672 bytes on each of 8 devices, rows divisible by 8 (so orbax can slice them);
    # the digest is lowered for each
    whole = _lowered_by_save(tmp_path, "default", _replicated((40, 3), 0.5), events)
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    assert handler._min_slice_bytes_for_replica_parallel == MIN_REPLICA_SLICE_BYTES
    assert handler._array_metadata_store is not None  # orbax's other defaults kept
    # orbax's own default, 0: every replicated array is sliced
    sliced = _lowered_by_save(tmp_path, "sliced", _replicated((56, 3), 0.5), events, 0)
    assert sliced > whole > 0


def test_large_replicated_arrays_are_still_split_over_replicas(tmp_path, events):
    whole = _lowered_by_save(tmp_path, "small", _replicated((24, 5), 0.25), events)
    # 8 MiB on each device: 8 slices of 1 MiB, one per replica
    large = _replicated((MIN_REPLICA_SLICE_BYTES // 4, 8), 0.25)
    assert _lowered_by_save(tmp_path, "large", large, events) > whole


def test_no_sharding_file_and_the_restore_takes_any_mesh(tmp_path):
    """No `_sharding` file is written (orbax reads it only for a restore without target
    shardings; ours always name them), and a checkpoint saved FSDP-sharded on 8 devices
    restores bit for bit onto 2 devices, replicated."""
    mesh8 = jax.make_mesh((8,), ("fsdp",))
    values = np.arange(16 * 6, dtype=np.float32).reshape(16, 6) / 7
    state = {"step": jnp.int32(3), "params": {
        "w": jax.device_put(values, NamedSharding(mesh8, PartitionSpec("fsdp"))),
        "b": jax.device_put(values[0], NamedSharding(mesh8, PartitionSpec()))}}
    checkpointer = Checkpointer(tmp_path / "ck", async_save=False)
    checkpointer.save(3, state, _Position())
    checkpointer.manager.wait_until_finished()
    written = {p.name for p in (tmp_path / "ck" / "3").rglob("*")}
    assert "manifest.ocdbt" in written and "_sharding" not in written, sorted(written)
    assert ocp.type_handlers.get_type_handler(jax.Array)._enable_write_sharding_file is False

    mesh2 = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh2, PartitionSpec())), state)
    restored = checkpointer.restore(3, target, _Position())
    checkpointer.close()
    assert restored["params"]["w"].sharding == NamedSharding(mesh2, PartitionSpec())
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), values)
    np.testing.assert_array_equal(np.asarray(restored["params"]["b"]), values[0])
    assert int(restored["step"]) == 3
