"""The README's commands are the ones CI runs, and they work as typed: no --workdir needed."""

import os
import re
import subprocess
import sys

from doc_utils import documentation

from crate_jax.main import default_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick_start_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.startswith("pip install -r requirements.txt && ")]


def test_ci_runs_the_readme_quick_start_commands_verbatim():
    commands = _quick_start_commands()
    assert commands == [
        "pip install -r requirements.txt && python -m crate_jax.main --config=configs/demo.py",
        "pip install -r requirements.txt && python -m pytest -q"], commands
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    for command in commands:
        # the command itself, at the start of a line; output may be captured after it
        assert any(line == command or line.startswith(command + " 2>&1 |") for line in ci), (
            f".ci/run does not run the README's command {command!r}")


def test_default_workdir_comes_from_the_config_file_name():
    assert default_workdir("configs/demo.py") == os.path.join("runs", "demo")
    assert default_workdir("/abs/configs/clipa_l14.py:smoke,stage=finetune") == os.path.join(
        "runs", "clipa_l14_smoke_stage-finetune")
    assert default_workdir("configs/crate_alpha_in1k.py:variant=L/8") == os.path.join(
        "runs", "crate_alpha_in1k_variant-L-8")


def test_main_without_workdir_then_evaluate(tmp_path):
    """The README's form of the command (no --workdir), on the smoke config, from another
    folder: it writes runs/<config>_smoke there and prints its final metrics; then the
    README's `python -m crate_jax.evaluate` on that run gives the same zero-shot top-1."""
    config = os.path.join(ROOT, "configs", "demo.py")
    out = subprocess.run(
        [sys.executable, "-m", "crate_jax.main", f"--config={config}:smoke"], cwd=tmp_path,
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    final = re.search(r"^final: .*zeroshot/top1 ([0-9.]+)", out.stdout, flags=re.M)
    assert final, out.stdout
    workdir = tmp_path / "runs" / "demo_smoke"
    assert (workdir / "config.json").exists() and (workdir / "checkpoints").is_dir()
    # the console holds progress and results, the library INFO lines go to the log file
    assert "INFO" not in out.stdout + out.stderr and "orbax" not in out.stderr.lower()
    assert "CheckpointManager" in (workdir / "logs" / "train_0.log").read_text()

    readme = documentation()
    command = "python -m crate_jax.evaluate --workdir=runs/demo --evals=zeroshot,retrieval"
    assert command in readme
    args = command.split()[3:]
    args[0] = "--workdir=runs/demo_smoke"
    ev = subprocess.run([sys.executable, "-m", "crate_jax.evaluate", *args], cwd=tmp_path,
                        capture_output=True, text=True, timeout=240)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    line = re.search(r"^eval: .*zeroshot/top1 ([0-9.]+)", ev.stdout, flags=re.M)
    assert line and line.group(1) == final.group(1), ev.stdout
    assert "retrieval/i2t_R@1" in ev.stdout
