"""benchmarks/suite_cpu.py and the CPU record of tests/conftest.py (CRATE_JAX_TEST_CPU): each
test's own CPU and its subprocesses' are recorded, and summed per module."""

import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "suite_cpu.py")


def _script():
    spec = importlib.util.spec_from_file_location("suite_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_lines_are_summed_per_module_costliest_first(tmp_path):
    log = tmp_path / "cpu.tsv"
    log.write_text("tests/a.py::x\t1.50\t0.00\ntests/b.py::y\t0.25\t3.00\n"
                   "tests/a.py::z[1]\t0.50\t0.25\n")
    suite_cpu = _script()
    rows = suite_cpu.read_log(str(log))
    assert rows[1] == ("tests/b.py::y", 0.25, 3.0)
    assert suite_cpu.by_module(rows) == [("tests/b.py", 0.25, 3.0, 1),
                                         ("tests/a.py", 2.0, 0.25, 2)]


def test_a_module_with_a_subprocess_gets_both_columns():
    """test_tokenizer.py runs its command line as a subprocess (python -m
    crate_jax.data.tokenizer): its module line shows CPU of its own and of the subprocesses.
    The pytest run inside this one shares this session's compilation cache and leaves it in
    place (tests/conftest.py: only the session that made the folder removes it)."""
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert os.path.isdir(cache)
    env = {k: v for k, v in os.environ.items() if k != "CRATE_JAX_TEST_CPU"}
    proc = subprocess.run([sys.executable, SCRIPT, "tests/test_tokenizer.py", "-n", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = re.search(r"^ *([\d.]+) +([\d.]+) +([\d.]+) +(\d+)  tests/test_tokenizer\.py$",
                     proc.stdout, re.M)
    assert line, proc.stdout[-2000:]
    total, own, children, tests = (float(x) for x in line.groups())
    assert own > 0 and children > 0 and abs(total - own - children) < 0.15
    passed = int(re.search(r"(\d+) passed", proc.stdout)[1])
    assert re.search(rf"^wall \d+ s; CPU \d+ s in all .*; {passed} tests recorded$",
                     proc.stdout, re.M)
    assert int(tests) == passed
    assert os.path.isdir(cache), "the nested session removed this session's compilation cache"
