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
    use_replica_slices_over,
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
    use_replica_slices_over(MIN_REPLICA_SLICE_BYTES)  # a test that changed it leaves no trace


def _lowered_by_save(tmp_path, name, array, events, min_slice_bytes=None) -> int:
    """Programs lowered while a Checkpointer saves {'a': array} for the first time (the
    digest's program among them), and a check that the save restores exactly. Each call
    takes an array of a shape no other call uses, so that no program is already made.
    `min_slice_bytes`: replaces the threshold the Checkpointer sets."""
    checkpointer = Checkpointer(tmp_path / name, async_save=False)
    if min_slice_bytes is not None:
        use_replica_slices_over(min_slice_bytes)
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
