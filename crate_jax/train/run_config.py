"""The saved config of a run (WORKDIR/config.json) and what may change when it resumes.

`check_workdir_config` compares a start's resolved config with the saved one before anything
is written: a workdir holding checkpoints refuses a different config apart from
RESUME_SAFE_KEYS and the keys `--config.resume_overrides=k1,k2` names (never the model's or
the optimizer's kind: NEVER_OVERRIDDEN); a workdir without a checkpoint yet (a start that
stopped at its first steps, a NaN before the first save) takes the new config.
`save_workdir_config` writes it atomically (crate_jax/train/workdir.py).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from etils import epath

from crate_jax.train import workdir as workdir_files

# Settings that may change when a run resumes; any other difference is an error. Raising
# total_steps extends a run: the learning-rate schedule stays the one optim.total_steps
# defines (steps past its end run at optim.end_lr).
RESUME_SAFE_KEYS = ("total_steps", "log_every", "eval_every", "checkpoint.every", "profile",
                    "wandb_project", "tensorboard", "measure_flops", "data.num_workers",
                    "checkpoint.keep", "checkpoint.async_save", "eval_batch_size",
                    "resume_overrides")
# Any other key may change on resume only when --config.resume_overrides names it (a lower
# optim.lr after a NaN, say), except these: the checkpoint holds their model and optimizer.
NEVER_OVERRIDDEN = ("trainer", "model", "optim.name", "optim.mu_dtype", "freeze")


# Keys added since runs were first written, at the value that means what their absence
# meant: a saved config without them resumes.
ADDED_KEY_DEFAULTS = {"mesh.dcn": 1}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _resume_overrides(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The keys --config.resume_overrides names; ValueError for one that may never change."""
    keys = tuple(filter(None, (k.strip() for k in (config.get("resume_overrides") or "")
                               .split(","))))
    for key in keys:
        if any(key == n or key.startswith(n + ".") for n in NEVER_OVERRIDDEN):
            raise ValueError(f"config resume_overrides={config.resume_overrides!r}: {key} "
                             "cannot change on resume (the checkpoints hold that model and "
                             "optimizer); use a new --workdir")
    return keys


def _has_checkpoint(workdir: epath.Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def check_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
    """The resolved config as JSON; if `workdir` holds checkpoints of a run already, refuse a
    different config (apart from RESUME_SAFE_KEYS and the keys config.resume_overrides names).
    A workdir without a checkpoint (a start that stopped at its first steps) takes the new
    config. Writes nothing."""
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    path = workdir / "config.json"
    allowed = RESUME_SAFE_KEYS + _resume_overrides(config)
    if path.exists() and _has_checkpoint(workdir):
        saved = _flatten(workdir_files.read_json(path))
        new = _flatten(resolved)
        for key, default in ADDED_KEY_DEFAULTS.items():
            if key not in saved and new.get(key) == default:
                saved[key] = default
        differs = sorted(k for k in set(saved) | set(new)
                         if saved.get(k) != new.get(k)
                         and not any(k == s or k.startswith(s + ".") for s in allowed))
        if differs:
            details = "; ".join(f"{k}: {saved.get(k)!r} → {new.get(k)!r}" for k in differs[:8])
            raise ValueError(
                f"workdir {workdir} holds a run with a different config ({details}). Use a new "
                "--workdir, the original settings, or to resume with these changes add "
                f"--config.resume_overrides={','.join(differs)}")
    return resolved


def save_workdir_config(resolved: dict, workdir: epath.Path) -> None:
    """Create the workdir and write config.json (process 0; the latest settings win)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # atomic: a full disk leaves the previous file or none
        workdir_files.atomic_write_text(workdir / "config.json",
                                        json.dumps(resolved, indent=2, sort_keys=True))
