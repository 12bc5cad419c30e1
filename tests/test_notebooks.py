"""Every notebook in notebooks/ runs top to bottom outside the checkout, against the package as a
user installs it, and the committed notebooks are exactly what notebooks/build_notebooks.py
writes, with no outputs.

The environment: a fresh virtual environment whose only own package is crate_jax, installed
non-editable by the notebooks' first cell itself, from its CRATE_JAX_SOURCE variable pointed at
a copy of the checkout's files (tracked and untracked, not ignored: what a clone holds plus the
work in progress). The dependencies (jax, ipykernel, pip, ...) come from this interpreter's
site-packages through a path line in a .pth file: that adds the folder alone, so the editable
install's own .pth finder there never runs, and pip leaves that install alone ("outside
environment"). Installing is offline: no index, no build isolation. Each notebook then runs in a
fresh empty folder, with nothing on PYTHONPATH, in a kernel of that environment's python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from multiprocess_utils import FAST_COMPILE

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["quickstart.ipynb", "whitebox.ipynb", "clipa_zero_shot.ipynb"]
BUDGET_S = 120  # each notebook, on a CPU
SOURCE_LINE = re.compile(r'^CRATE_JAX_SOURCE = "[^"]*"$', flags=re.M)


def _builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_notebooks", NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_checkout(dest: Path) -> Path:
    """The checkout's files that git tracks or would add (symlinks kept as symlinks); outside
    a git work tree, the folder less runs, builds and caches."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True)
    if listing.returncode:
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", "runs", "build", "*.egg-info", "__pycache__", ".*_cache", ".venv"))
        return dest
    for name in filter(None, listing.stdout.decode().split("\0")):
        src, dst = ROOT / name, dest / name
        if not os.path.lexists(src):  # deleted in the work tree
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def _kernel_env(**updates: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MPLBACKEND", "CRATE_JAX_DEMO_RUN", "VIRTUAL_ENV")}
    env.update(XLA_FLAGS=FAST_COMPILE,  # one CPU device, as in a notebook session
               PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0",  # (sic: pip's "0" disables it)
               PIP_DISABLE_PIP_VERSION_CHECK="1", **updates)
    return env


def _execute(nb, python: Path, cwd: Path, kernels: Path) -> float:
    """Runs `nb` in place in a kernel of `python` with working directory `cwd`; seconds."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    km = KernelManager(kernel_name="fresh_venv",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=BUDGET_S,
                                     resources={"metadata": {"path": str(cwd)}})
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    finally:  # a kernel manager of ours: its kernel is ours to stop
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    return elapsed


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python, site-packages, kernel-spec folder, the install cell's output) of a fresh
    environment into which the first cell of quickstart.ipynb installed crate_jax."""
    base = tmp_path_factory.mktemp("notebook_env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")],
                   check=True)
    python = base / "venv" / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    missing = subprocess.run([python, "-c", "import crate_jax"], cwd=base, capture_output=True,
                             text=True, env=_kernel_env())
    assert "No module named 'crate_jax'" in missing.stderr, missing.stderr

    kernels = base / "kernels" / "fresh_venv"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))

    source = _copy_checkout(base / "checkout")
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    install = nb.cells[1]
    assert len(SOURCE_LINE.findall(install.source)) == 1, install.source
    install.source = SOURCE_LINE.sub(f"CRATE_JAX_SOURCE = {str(source)!r}", install.source)
    nb.cells = [install]
    (base / "work").mkdir()
    _execute(nb, python, base / "work", kernels.parent)
    return python, site, kernels.parent, _text(install)


def test_notebooks_are_generated_and_clean():
    builder = _builder()
    assert sorted(builder.NOTEBOOKS) == sorted(NAMES)
    for name in NAMES:
        on_disk = nbformat.read(NOTEBOOKS / name, as_version=4)
        built = builder.NOTEBOOKS[name]()
        assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], (
            f"{name} differs from build_notebooks.py: run python notebooks/build_notebooks.py")
        for cell in on_disk.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name
        install = on_disk.cells[1].source  # the guarded install, from one marked variable
        assert SOURCE_LINE.findall(install) == ['CRATE_JAX_SOURCE = ".."'], install
        assert "%pip install -q {CRATE_JAX_SOURCE}" in install
        text = "".join(c.source for c in on_disk.cells)
        assert "../configs" not in text and "sys.path" not in text, name


def test_install_cell_installs_the_package_non_editable(venv):
    python, site, _, output = venv
    assert f"crate_jax from {site / 'crate_jax'}" in output, output
    # the configs come with it, as files of the installed package
    out = subprocess.run([python, "-c", "import crate_jax.configs.demo as m; print(m.__file__)"],
                         cwd=site.parent, capture_output=True, text=True, env=_kernel_env())
    installed = Path(out.stdout.strip())
    assert installed == site / "crate_jax" / "configs" / "demo.py", out.stdout + out.stderr
    assert not installed.parent.is_symlink()
    assert installed.read_text() == (ROOT / "configs" / "demo.py").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_a_fresh_folder(name, venv, tmp_path):
    python, site, kernels, _ = venv
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # after the notebook: where it ran, and whether the checkout was on its path
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import os, sys\nprint(os.getcwd(), any(p.startswith({str(ROOT)!r}) for p in sys.path))"))
    elapsed = _execute(nb, python, tmp_path, kernels)
    # the package the install cell found: the installed one, not the checkout
    assert _text(nb.cells[1]).strip() == f"crate_jax from {site / 'crate_jax'}"
    assert _text(nb.cells[-1]).split() == [str(tmp_path), "False"]
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f}s"
    print(f"{name}: {elapsed:.1f}s in {tmp_path} ({python})")
