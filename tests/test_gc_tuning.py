"""crate_jax.gc_tuning: what the trainer does to Python's garbage collector once its libraries
are imported (crate_jax/main.py), and that cycles are still collected after it."""

import gc
import weakref

import pytest

from crate_jax import gc_tuning


@pytest.fixture
def restored_gc():
    """The session's collector as it was (tests/conftest.py tunes it like the trainer)."""
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count() > 0
    yield
    gc.unfreeze()
    if frozen:
        gc.freeze()
    gc.set_threshold(*thresholds)


class _Node:
    """An object that can refer to itself (a cycle only the collector frees)."""


def test_for_tracing_freezes_the_imports_and_raises_the_thresholds(restored_gc):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gc_tuning.for_tracing()
    assert gc.get_freeze_count() > 10_000  # jax, numpy, pytest: all of it
    assert gc.get_threshold() == gc_tuning.THRESHOLDS
    node = _Node()
    node.self = node  # a cycle made afterwards is still found by a collection
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert ref() is None

