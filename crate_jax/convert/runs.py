"""Imported weights as a run directory the trainer and the analysis tools read, and back.

An import writes OUT as a training run would leave it:

    OUT/checkpoints/0/state   {'step': 0, 'params': ..., 'opt_state': {}}   (orbax, via
                              crate_jax.train.checkpoint.Checkpointer)
    OUT/checkpoints/0/data    an empty data-iterator state
    OUT/config.json           {'trainer': 'classification', 'model': {'name', 'overrides'},
                               'data': {'num_classes', 'image_size'}, 'converted_from': {...}}

(a CRATE-MAE import writes trainer 'mae' and data.image_size, as a 'mae' run does; a
CRATE-α-CLIPA import a 'contrastive' run), so that `config.init_from=OUT` finetunes from it
(the trainer only restores the parameters of `init_from`) and
`crate_jax.train.loop.final_params(OUT)` returns them. `model.overrides` holds everything
but num_classes and image_size, which sit in `data` where a classification config keeps them
(the classification task passes them to the model).

OUT is a source to finetune from (`init_from`), not a run to resume: its step 0 has no
optimizer state and no data position, and the trainer refuses --workdir=OUT because OUT's
config.json is not the training config (use a new workdir with init_from=OUT).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from crate_jax import models
from crate_jax.convert.clipa import ImportedClip
from crate_jax.convert.crate_mae import ImportedMAE
from crate_jax.convert.importers import ConversionError, Imported
from crate_jax.models.autoencoder import MAEConfig
from crate_jax.models.clip import ClipConfig
from crate_jax.models.config import VisionConfig
from crate_jax.train.checkpoint import Checkpointer
from crate_jax.train.workdir import absolute

__all__ = ["NoDataPosition", "load_run", "read_checkpoint", "run_config", "write_run",
           "write_run_directory"]

DATA_FIELDS = ("num_classes", "image_size")


class NoDataPosition:
    """The data-iterator slot of a checkpoint that no data iterator produced."""

    def get_state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        del state


def run_config(imported: Imported | ImportedClip | ImportedMAE,
               source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of an imported checkpoint."""
    if isinstance(imported, ImportedClip | ImportedMAE):
        return imported.run_config(source)
    overrides = {k: v for k, v in imported.overrides.items() if k not in DATA_FIELDS}
    cfg = imported.config()
    return {
        "trainer": "classification",
        "model": {"name": imported.name, "overrides": overrides},
        "data": {"num_classes": cfg.num_classes, "image_size": cfg.image_size},
        "converted_from": {**(source or {}), "notes": list(imported.notes)},
    }


def write_run_directory(out: str | os.PathLike, state: dict[str, Any],
                        config: dict[str, Any]) -> Path:
    """Write `state` as step 0 of OUT/checkpoints (with no data position) and `config` as
    OUT/config.json; `out` must not hold a checkpoint or config.json already. Returns the
    path of the checkpoint directory."""
    out = Path(out).absolute()  # orbax refuses a relative path (the README's runs/...)
    ckpt_dir = out / "checkpoints"
    if (out / "config.json").exists() or (ckpt_dir.exists() and any(ckpt_dir.iterdir())):
        raise FileExistsError(f"{out} already holds a run (config.json or checkpoints/); "
                              "choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(ckpt_dir, keep=1, keep_best=0, async_save=False)
    try:
        checkpointer.save(0, state, NoDataPosition())
    finally:
        checkpointer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return ckpt_dir


def write_run(out: str | os.PathLike, imported: Imported | ImportedClip | ImportedMAE,
              source: dict[str, Any] | None = None) -> Path:
    """Write `imported` as the run directory `out` (see the module docstring); `out` must not
    hold a checkpoint or config.json already. Returns the path of the checkpoint directory."""
    params = jax.tree.map(np.asarray, imported.params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": {}}
    return write_run_directory(out, state, run_config(imported, source))


def read_checkpoint(directory: str | os.PathLike, step: int | None = None, *,
                    missing: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(params, batch_stats ({} when it holds none), step) of a checkpoint directory, as NumPy
    arrays: `step`, or the latest when None. Raises FileNotFoundError(`missing`) when there is
    no such step."""
    checkpointer = Checkpointer(epath.Path(absolute(directory)), async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.manager.all_steps():
            raise FileNotFoundError(missing)
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = jax.device_get(checkpointer.restore_params(step, sharding))
        stats = jax.device_get(checkpointer.restore_batch_stats(step, sharding))
    finally:
        checkpointer.close()
    return params, stats, int(step)


def _checkpoint_dir(path: Path) -> tuple[Path, int | None, Path | None]:
    """(checkpoint directory, step or None, directory that may hold config.json)."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None, path
    if (path / "state").is_dir() and path.name.isdigit():  # one step directory
        return path.parent, int(path.name), path.parent.parent
    if any(p.name.isdigit() and p.is_dir() for p in path.iterdir()):
        return path, None, path.parent
    raise FileNotFoundError(f"{path}: neither a run directory (with checkpoints/), a checkpoint "
                            "directory (with numbered steps) nor one step directory")


def load_run(path: str | os.PathLike, step: int | None = None
             ) -> tuple[dict[str, Any], VisionConfig | ClipConfig | MAEConfig | None,
                        str | None]:
    """(params as NumPy, the model config or None, the model name or None) of a run directory,
    a checkpoint directory or one step directory. The config comes from the run's config.json
    (model.name + model.overrides, with data.num_classes / data.image_size as the
    classification task applies them; a contrastive run's ClipConfig, with no name; a masked
    autoencoder's MAEConfig, as the 'mae' task builds it); without one it is None."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    ckpt_dir, dir_step, config_dir = _checkpoint_dir(path)
    step = dir_step if step is None else step
    checkpointer = Checkpointer(ckpt_dir, async_save=False)
    try:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = jax.device_get(checkpointer.restore_params(step, sharding))
    finally:
        checkpointer.close()
    cfg, name = None, None
    config_file = config_dir / "config.json" if config_dir is not None else None
    if config_file is not None and config_file.exists():
        config = json.loads(config_file.read_text())
        if config.get("trainer") == "contrastive":  # a two-tower run: its ClipConfig
            import ml_collections

            from crate_jax import tasks
            task = tasks.get("contrastive")(ml_collections.ConfigDict(config))
            return params, task.model_config(), None
        if config.get("trainer") == "mae":
            return params, _mae_config(config), config["model"]["name"]
        model = config.get("model") or {}
        name = model.get("name")
        if not name:
            raise ConversionError(f"{config_file}: no model.name (only single image models can "
                                  "be exported)")
        overrides = dict(model.get("overrides") or {})
        data = config.get("data") or {}
        for field in DATA_FIELDS:
            if field in data and data[field] is not None:
                overrides.setdefault(field, data[field])
        cfg = models.config_for(name, **overrides)
    return params, cfg, name


def _mae_config(config: dict[str, Any]) -> MAEConfig:
    """The MAEConfig of a 'mae' run's config.json, as the task builds its model: the model's
    fields and overrides, the image size from data (data.num_classes is the probes')."""
    import ml_collections

    from crate_jax.config_utils import model_overrides
    overrides = model_overrides(ml_collections.ConfigDict(config["model"]))
    image_size = (config.get("data") or {}).get("image_size")
    if image_size is not None:
        overrides.setdefault("image_size", image_size)
    return models.registry.mae_config_for(config["model"]["name"], **overrides)
