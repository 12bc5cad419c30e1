"""Test-wide setup, before jax starts: 8 fake CPU devices for the sharding tests, and a
compilation cache shared by this session's tests and the subprocesses they start (many tests
compile the same smoke-size programs)."""

import os
import shutil
import tempfile

from multiprocess_utils import FAST_COMPILE

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      f"{FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # made here, so removed by pytest_unconfigure below (pytest-xdist workers inherit it)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="crate_jax_test_xla_cache_")
    os.environ["CRATE_JAX_TEST_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config) -> None:
    """The session's compilation cache goes when the session (not an xdist worker) ends."""
    own = os.environ.get("CRATE_JAX_TEST_OWN_CACHE")
    if own and not hasattr(config, "workerinput"):
        shutil.rmtree(own, ignore_errors=True)
