"""python -m crate_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.key=value ...]

Trains the task `config.trainer` names; running the same command again resumes from the
latest checkpoint in DIR. The resolved config is saved as DIR/config.json.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (Python, get_config(arg)); add ':ARG' to pass an argument.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the "
                               "resolved config (default: runs/<config name>).")


def _default_workdir() -> str:
    path = flags.FLAGS["config"].value or "run"
    name = os.path.splitext(os.path.basename(path.split(":")[0]))[0]
    arg = path.split(":", 1)[1].replace("=", "-").replace(",", "_") if ":" in path else ""
    return os.path.join("runs", f"{name}_{arg}" if arg else name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported here so that `--help` answers before jax starts.
    from crate_jax.train.loop import train_and_evaluate

    workdir = _WORKDIR.value or _default_workdir()
    logging.info("workdir: %s", workdir)
    final = train_and_evaluate(_CONFIG.value, workdir)
    print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
