"""Test-wide setup, before jax starts: 8 fake CPU devices for the sharding tests, and a
compilation cache shared by this session's tests and the subprocesses they start (many tests
compile the same smoke-size programs).

The 8 devices are this process's own (jax_num_cpu_devices), not an XLA_FLAGS setting that the
subprocesses would inherit: a trainer a test starts runs on one CPU device unless the test asks
for more (--xla_force_host_platform_device_count in the XLA_FLAGS it passes). One device
compiles an unpartitioned program, about a fifth less CPU per run than 8, and the suite is
CPU-bound on two cores."""

import os
import resource
import shutil
import tempfile

import pytest
from multiprocess_utils import FAST_COMPILE

from crate_jax import gc_tuning

os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The session's compilation cache: made here, and removed by pytest_unconfigure below by the
# process that made it (MADE). The pytest-xdist workers, the runs tests start, and a pytest a
# test starts (tests/test_suite_cpu.py) inherit it through the environment and use it, but
# never remove it: a nested session that removed it would leave the rest of this one without.
MADE: list[str] = []
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="crate_jax_test_xla_cache_")
    MADE.append(os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (once the environment above is set)

jax.config.update("jax_num_cpu_devices", 8)
# The trainer's collector settings (crate_jax/gc_tuning.py) for the in-process tests too: most
# of them trace and compile
gc_tuning.for_tracing()


def pytest_unconfigure(config) -> None:
    """The session's compilation cache goes when the session that made it ends."""
    for folder in MADE:
        shutil.rmtree(folder, ignore_errors=True)


# The modules that take longest (their training runs: 30 to 100 s each with two xdist workers
# on two cores), slowest first. With --dist loadfile a module runs whole on one worker, and
# with --no-loadscope-reorder (pyproject.toml; without it xdist starts the modules with the
# most tests first) in collection order; one of these started last would leave the other
# worker idle until it ends. Started first, the short modules fill in around them.
SLOW_MODULES = (
    "test_multiprocess_tasks.py", "test_tost_runs.py", "test_gcs.py",
    "test_multiprocess_self_supervised.py", "test_multiprocess.py", "test_whitebox_claims.py",
    "test_slurm.py", "test_self_supervised_runs.py", "test_train.py", "test_configs.py",
    "test_plan.py", "test_tost_whitebox.py", "test_notebooks.py", "test_cluster_faults.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """SLOW_MODULES first, in that order; the rest after them in their own order (a stable
    sort, so tests keep their order within a module)."""
    here = os.path.dirname(os.path.abspath(__file__))
    missing = [m for m in SLOW_MODULES if not os.path.exists(os.path.join(here, m))]
    if missing:  # a renamed module would silently lose its place
        raise ValueError(f"tests/conftest.py SLOW_MODULES names no module here: {missing}")
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# CRATE_JAX_TEST_CPU=FILE: each test's CPU seconds appended to FILE (benchmarks/suite_cpu.py
# runs the suite so and sums them): the worker's own, and those of the subprocesses that ended
# during the test (getrusage counts a child once it is waited for, with what it waited for).
# A module fixture's runs count to the module's first test.
CPU_LOG = os.environ.get("CRATE_JAX_TEST_CPU")


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not CPU_LOG:
        yield
        return
    own, children = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    yield
    own = _cpu_seconds(resource.RUSAGE_SELF) - own
    children = _cpu_seconds(resource.RUSAGE_CHILDREN) - children
    with open(CPU_LOG, "a") as f:  # one short line per write: the two workers do not mix
        f.write(f"{item.nodeid}\t{own:.2f}\t{children:.2f}\n")
