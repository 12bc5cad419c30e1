"""Every command has a console script (pyproject's [project.scripts]) that is installed with the
package and runs: `crate-convert --help` as `python -m crate_jax.convert --help` does."""

import importlib.metadata
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_every_declared_script_is_installed_and_points_at_a_function():
    declared = _declared()
    assert {"crate-train", "crate-eval", "crate-convert", "crate-analyze",
            "crate-plan"} <= set(declared)
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    for name, target in declared.items():
        assert name in installed, f"{name} is not installed: pip install -r requirements.txt"
        assert installed[name].value == target
        # each in its own interpreter: the absl commands define the same flag names
        module, _, function = target.partition(":")
        loaded = subprocess.run([sys.executable, "-c", f"import {module} as m; "
                                 f"assert callable(m.{function})"], capture_output=True,
                                text=True, timeout=120)
        assert loaded.returncode == 0, f"{name}: {loaded.stderr}"


def test_the_scripts_run_like_python_dash_m():
    bindir = os.path.dirname(sys.executable)
    for name, module in [("crate-convert", "crate_jax.convert"),
                         ("crate-analyze", "crate_jax.analyze")]:
        script = subprocess.run([os.path.join(bindir, name), "--help"], capture_output=True,
                                text=True, timeout=120)
        dash_m = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                                text=True, timeout=120)
        assert script.returncode == dash_m.returncode == 0, script.stderr
        # the usage text is the same but for the program name
        assert script.stdout.split("\n", 2)[-1] == dash_m.stdout.split("\n", 2)[-1]
