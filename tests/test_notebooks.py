"""Every notebook in notebooks/ runs top to bottom (nbclient, the python3 kernel of this
interpreter, working directory notebooks/), and the committed notebooks are exactly what
notebooks/build_notebooks.py writes, with no outputs."""

import importlib.util
import os
import sys
import time

import pytest
from multiprocess_utils import FAST_COMPILE

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ["quickstart.ipynb", "whitebox.ipynb", "clipa_zero_shot.ipynb"]
BUDGET_S = 120  # each notebook, on a CPU


def _builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", os.path.join(NOTEBOOKS, "build_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_generated_and_clean():
    builder = _builder()
    assert sorted(builder.NOTEBOOKS) == sorted(NAMES)
    for name in NAMES:
        on_disk = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        built = builder.NOTEBOOKS[name]()
        assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], (
            f"{name} differs from build_notebooks.py: run python notebooks/build_notebooks.py")
        for cell in on_disk.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name
        assert "import crate_jax" in on_disk.cells[1].source  # the guarded install cell


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_COMPILE  # one CPU device, as in a notebook session
    env.pop("MPLBACKEND", None)  # the kernel's inline backend (headless)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.pop("CRATE_JAX_DEMO_RUN", None)
    client = nbclient.NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    start = time.perf_counter()
    client.execute(env=env)
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f}s"
    print(f"{name}: {elapsed:.1f}s ({sys.executable})")
