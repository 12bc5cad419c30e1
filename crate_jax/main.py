"""python -m crate_jax.main --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.key=value ...]

Trains the task `config.trainer` names; running the same command again resumes from the
latest checkpoint in DIR (default: runs/<config name>[_<arg>]). The resolved config is saved
as DIR/config.json once every check has passed, so a failed start leaves DIR as it was.

The terminal gets progress, evaluation, warning and error lines; library INFO logging (orbax,
absl, jax) goes to DIR/logs/train_<process>.log (crate_jax/train/logfile.py).
"""

from __future__ import annotations

import os
import signal
import sys

# First of all (before absl, ml_collections and jax load, which take seconds): SIGTERM becomes
# a flag, so a signal at any moment of the start exits cleanly rather than with -15.
from crate_jax.train import signals

signals.install()

import logging as std_logging  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from crate_jax import config_check  # noqa: E402
from crate_jax.train import logfile  # noqa: E402

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
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.get("trainer")  # a file that failed to load raises on first access
    except (flags.Error, OSError, AttributeError, KeyError, ValueError, TypeError) as e:
        problem = config_check.diagnose_overrides(argv)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(f"crate_jax.main: {problem or first}", code=2)
    if flags.FLAGS["workdir"].present and not _WORKDIR.value:
        _fail("crate_jax.main: --workdir is empty; give a directory, or leave the flag out "
              "for the default runs/<config name>", code=2)
    return rest


def _fail(message: str, code: int = 1) -> None:
    """One line on stderr, no traceback, and the exit code."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _stop_if_signalled(step: str) -> None:
    """A SIGTERM that arrived during the start: exit 0 before anything is written."""
    if signals.received():
        print(f"stopping {step} after a termination signal; nothing was written",
              flush=True)
        sys.exit(0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    logging.get_absl_handler().setLevel(std_logging.WARNING)  # the terminal: warnings, errors
    logfile.install()  # INFO: WORKDIR/logs/train_<process>.log, once the start has passed
    # Imported here so that `--help` answers before jax starts.
    import jax

    from crate_jax import gc_tuning
    from crate_jax.parallel import maybe_initialize_distributed
    from crate_jax.train.checkpoint import CheckpointDamagedError
    from crate_jax.train.loop import train_and_evaluate
    from crate_jax.train.workdir import RunFailed

    gc_tuning.for_tracing()  # the libraries are in: collect what tracing makes, less often

    _stop_if_signalled("at startup")
    if maybe_initialize_distributed():  # on the console: which process this log belongs to
        print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices",
              flush=True)
        # jax's preemption notifier has now replaced our SIGTERM handler (at the C level), as
        # it should with several processes; a signal that came before is honoured here.
        _stop_if_signalled("at startup")
        if not getattr(jax.config, "jax_enable_preemption_service", True):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no notifier: a plain kill again

    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(
        flags.FLAGS["config"]))
    print(f"workdir {workdir}", flush=True)
    try:
        if _CONFIG.value.get("study"):  # several runs and their analysis (crate_jax/study.py)
            from crate_jax.study import run_study
            final = run_study(_CONFIG.value, workdir)
        else:
            final = train_and_evaluate(_CONFIG.value, workdir)
    except (ValueError, OSError, FloatingPointError, CheckpointDamagedError, RunFailed) as e:
        std_logging.getLogger("crate_jax").info("run failed", exc_info=True)
        log = logfile.spill()
        _fail(f"error: {_one_line(e)}" + (f" (details in {log})" if log else ""))
    if final:
        print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())),
              flush=True)
    # A SIGTERM arriving after this point finds a finished run: exit 0 rather than -15.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _exit_finished_run()


def _exit_finished_run() -> None:
    """Exit 0 without jax's exit clean-up (jax._src.api.clean_up: every cache cleared, the
    backends destroyed, gc.collect() four times; 0.3 to 0.5 CPU-s of a smoke run's 6). By now
    train_and_evaluate has closed what the run wrote to (checkpointer, metric writers, data
    workers); the parts of the exit that still matter run here: pending effects, jax's
    distributed shutdown (all processes leave together), the log files and the terminal."""
    import jax

    jax.effects_barrier()
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    std_logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _one_line(error: BaseException) -> str:
    """The error's message as one line (an OSError's names its file)."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines())
    return text or type(error).__name__


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
