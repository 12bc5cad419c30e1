"""python -m crate_jax.main --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.key=value ...]

Trains the task `config.trainer` names; running the same command again resumes from the
latest checkpoint in DIR (default: runs/<config name>[_<arg>]). The resolved config is saved
as DIR/config.json once every check has passed, so a failed start leaves DIR as it was.

The terminal gets progress, evaluation, warning and error lines; library INFO logging (orbax,
absl, jax) goes to DIR/logs/train_<process>.log (crate_jax/train/logfile.py).
"""

from __future__ import annotations

import logging as std_logging
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from crate_jax import config_check
from crate_jax.train import logfile

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (Python, get_config(arg)); add ':ARG' to pass an argument.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the "
                               "resolved config (default: runs/<config name>[_<arg>]).")


def default_workdir(config_spec: str) -> str:
    """runs/<config file name>[_<arg>]: 'configs/demo.py' → runs/demo,
    'configs/clipa_l14.py:smoke,stage=finetune' → runs/clipa_l14_smoke_stage-finetune."""
    path, _, arg = config_spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0] or "run"
    arg = arg.replace("=", "-").replace(",", "_").replace("/", "-")
    return os.path.join("runs", f"{name}_{arg}" if arg else name)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with one clear line for a mistyped --config.key (and the nearest
    valid key) instead of ml_collections' chained tracebacks."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"crate_jax.main: {e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        problem = config_check.diagnose_overrides(argv)
        print(f"crate_jax.main: {problem or e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    logging.get_absl_handler().setLevel(std_logging.WARNING)  # the terminal: warnings, errors
    logfile.install()  # INFO: WORKDIR/logs/train_<process>.log, once the start has passed
    # Imported here so that `--help` answers before jax starts.
    import jax

    from crate_jax.parallel import maybe_initialize_distributed
    from crate_jax.train import signals
    from crate_jax.train.loop import train_and_evaluate

    if maybe_initialize_distributed():  # on the console: which process this log belongs to
        print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices",
              flush=True)
    if jax.process_count() == 1:  # several processes: jax's preemption notifier owns SIGTERM
        signals.install()  # from here on SIGTERM is a flag the loop honours, never a kill

    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(
        flags.FLAGS["config"]))
    print(f"workdir {workdir}", flush=True)
    try:
        final = train_and_evaluate(_CONFIG.value, workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        std_logging.getLogger("crate_jax").info("run failed", exc_info=True)
        log = logfile.spill()
        print(f"error: {e}" + (f"\n(details in {log})" if log else ""), file=sys.stderr,
              flush=True)
        sys.exit(1)
    print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())), flush=True)
    # A SIGTERM arriving after this point finds a finished run: exit 0 rather than -15.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
