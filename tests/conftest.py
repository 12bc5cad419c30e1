"""Test-wide setup, before jax starts: 8 fake CPU devices for the sharding tests, and a
compilation cache shared by this session's tests and the subprocesses they start (many tests
compile the same smoke-size programs)."""

import os
import tempfile

from multiprocess_utils import FAST_COMPILE

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      f"{FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="crate_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
