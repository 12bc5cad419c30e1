"""Where the test suite's time goes: runs `python -m pytest -q` (with any extra pytest
arguments given) and prints its wall time, then the CPU seconds of each test module and of the
costliest tests, split into the pytest worker's own and the subprocesses' (trainers, launchers,
notebook kernels), as tests/conftest.py records them with CRATE_JAX_TEST_CPU.

    python benchmarks/suite_cpu.py                       # the whole suite
    python benchmarks/suite_cpu.py tests/test_train.py   # one module

The suite is CPU-bound on a 2-core machine: its wall time is about the total CPU over 2 (less
the share of the cores pytest-xdist leaves idle, printed as the cores' use).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(path: str) -> list[tuple[str, float, float]]:
    """(test id, own CPU-s, subprocess CPU-s) per line of a CRATE_JAX_TEST_CPU file."""
    rows = []
    for line in open(path):
        test, own, children = line.rstrip("\n").split("\t")
        rows.append((test, float(own), float(children)))
    return rows


def by_module(rows) -> list[tuple[str, float, float, int]]:
    """(module, own, subprocesses, tests) per module, costliest first."""
    sums: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for test, own, children in rows:
        entry = sums[test.split("::")[0]]
        entry[0] += own
        entry[1] += children
        entry[2] += 1
    return sorted(((m, *v) for m, v in sums.items()), key=lambda r: -(r[1] + r[2]))


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="suite_cpu_") as folder:
        log = os.path.join(folder, "cpu.tsv")
        start, before = time.time(), os.times()
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", *argv], cwd=ROOT,
                               env={**os.environ, "CRATE_JAX_TEST_CPU": log})
        wall, after = time.time() - start, os.times()
        rows = read_log(log) if os.path.exists(log) else []
    total = (after.children_user + after.children_system
             - before.children_user - before.children_system)
    print(f"\nwall {wall:.0f} s; CPU {total:.0f} s in all (pytest and everything it started), "
          f"{total / wall:.2f} cores in use on average; {len(rows)} tests recorded")
    print(f"{'CPU-s':>7} {'own':>7} {'subproc':>7} {'tests':>5}  module")
    for module, own, children, count in by_module(rows):
        print(f"{own + children:7.1f} {own:7.1f} {children:7.1f} {count:5d}  {module}")
    print("\ncostliest tests (a module fixture counts to its module's first test):")
    for test, own, children in sorted(rows, key=lambda r: -(r[1] + r[2]))[:25]:
        print(f"{own + children:7.1f} {own:7.1f} {children:7.1f}  {test}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
