"""Starting a run from another run's parameters: `config.init_from` (a whole model, adapted to
this one) and `config.init_towers` (whole top-level parameter groups, e.g. a text tower).

Nothing is gathered to one host, so both work on any number of processes with FSDP-sharded
parameters:

* only the parameters are read (orbax partial restore; no optimizer moments), each leaf
  straight into its target sharding, every process reading its own shards;
* a leaf whose shape changes (position table, patch stem) is read replicated (both are small)
  and resized on the device; a re-initialised head is not read at all;
* the adaptation (crate_jax.models.resize.adapt_for_finetune) runs as one jitted function whose
  outputs land in the target shardings; a dry run on shapes first (jax.eval_shape) reports every
  mismatch before anything is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from etils import epath

from crate_jax.models import flat_params
from crate_jax.models.resize import adapt_for_finetune
from crate_jax.parallel import replicated
from crate_jax.train.checkpoint import Checkpointer

__all__ = ["check_init_from", "finetune_params", "load_towers"]


def _checkpointer(source: str) -> tuple[Checkpointer, epath.Path]:
    """A run's workdir (its checkpoints/ folder) or a checkpoint directory itself."""
    path = epath.Path(source)
    directory = path / "checkpoints" if (path / "checkpoints").exists() else path
    return Checkpointer(directory, async_save=False), directory


def _nest(flat: Mapping[str, Any], like: Mapping, prefix: str = "") -> dict:
    """The entries of `flat` ('a/0/b' keys) laid out as the subset of `like` they name."""
    out = {}
    for key, value in like.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            sub = _nest(flat, value, path + "/")
            if sub:
                out[key] = sub
        elif path in flat:
            out[key] = flat[path]
    return out


def _check_prefix(prefix: str | None, saved: Mapping, directory, step: int) -> str:
    """config.init_prefix as 'a/b/' ('' for none), checked against the saved parameters."""
    if not prefix:
        return ""
    prefix = prefix.strip("/") + "/"
    if not any(p.startswith(prefix) for p in flat_params(saved)):
        raise ValueError(f"init_prefix={prefix[:-1]!r}: {directory} step {step} holds no "
                         f"parameters below it; its top-level groups are {sorted(saved)} "
                         "(a masked autoencoder's encoder is 'backbone', SimDINO's "
                         "'teacher/backbone')")
    return prefix


def _under(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a flat parameter dict below `prefix`, with the prefix removed."""
    return {p[len(prefix):]: v for p, v in flat.items() if p.startswith(prefix)}


def _is_head(path: str) -> bool:
    return path == "head" or path.startswith("head/")


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)


def _plan(config: Any, params: dict):
    """What a finetune reads and how it adapts it, from the source's metadata alone."""
    checkpointer, directory = _checkpointer(config.init_from)
    step, saved = checkpointer.saved_params(config.get("init_step"))
    reinit_head = config.get("reinit_head", True)
    prefix = _check_prefix(config.get("init_prefix"), saved, directory, step)
    source = _under(flat_params(saved), prefix)
    target = flat_params(params)
    notes: list[str] = []

    def adapt(kept: dict, resized: dict, heads: dict) -> dict:
        # source leaves not read are shapes only: adapt_for_finetune looks at their shapes;
        # the target's fresh values matter only for a re-initialised head
        out, new_notes = adapt_for_finetune({**source, **kept, **resized},
                                            _nest({**_abstract(target), **heads}, params),
                                            reinit_head=reinit_head)
        notes[:] = new_notes
        return out

    heads = {p: v for p, v in target.items() if _is_head(p)}
    # Every problem is reported here, from the shapes alone, before anything is read.
    jax.eval_shape(adapt, source, {}, heads)
    return checkpointer, directory, step, saved, prefix, source, target, adapt, heads, notes


def check_init_from(config: Any, abstract_params: dict) -> None:
    """Every problem finetune_params would meet (no checkpoint, a wrong init_prefix, keys or
    shapes that cannot be adapted), from metadata and shapes only: run before the workdir is
    written."""
    checkpointer = _plan(config, abstract_params)[0]
    checkpointer.close()


def finetune_params(config: Any, params: dict, shardings: dict,
                    mesh: jax.sharding.Mesh) -> dict:
    """Parameters from config.init_from (another run's workdir or checkpoint directory, step
    config.init_step or the latest; only those below config.init_prefix when set, e.g.
    'backbone' for a masked autoencoder's encoder), adapted to this model: fresh head
    (config.reinit_head), position embedding and patch stem resized. `params` are this
    model's fresh parameters in `shardings`; the result is in `shardings` too."""
    (checkpointer, directory, step, saved, prefix, source, target, adapt, heads,
     notes) = _plan(config, params)
    reinit_head = config.get("reinit_head", True)
    wanted = {}
    for path, fresh in target.items():
        have = source.get(path)
        if have is None or (_is_head(path) and (reinit_head or have.shape != fresh.shape)):
            continue  # the fresh value is kept
        sharding = fresh.sharding if have.shape == fresh.shape else replicated(mesh)
        wanted[prefix + path] = jax.ShapeDtypeStruct(have.shape, have.dtype, sharding=sharding)
    loaded = _under(flat_params(checkpointer.restore_param_subset(step, _nest(wanted, saved))),
                    prefix)
    kept = {p: v for p, v in loaded.items() if v.shape == target[p].shape}
    resized = {p: v for p, v in loaded.items() if p not in kept}
    # the kept leaves are already in their target shardings: donated, they become the output
    adapted = jax.jit(adapt, out_shardings=shardings, donate_argnums=(0,))(kept, resized, heads)
    for note in notes:
        logging.info("finetune: %s", note)
    logging.info("finetune: %d parameter arrays read from %s step %d", len(loaded), directory,
                 step)
    return adapted


def load_towers(specs: Sequence[Mapping], params: dict, shardings: dict) -> dict:
    """Copy whole top-level parameter groups (e.g. 'text', 'text_proj') from other runs:
    config.init_towers = [{'from': RUN_OR_CHECKPOINT_DIR, 'keys': ['text', 'text_proj'],
    'step': optional}]. Only those groups are read, straight into their shardings."""
    params = dict(params)
    for spec in specs:
        checkpointer, directory = _checkpointer(spec["from"])
        step, saved = checkpointer.saved_params(spec.get("step"))
        for key in spec["keys"]:
            if key not in saved:
                raise ValueError(f"init_towers: {directory} has no parameter group {key!r}; "
                                 f"it has {sorted(saved)}")
            want = jax.tree.map(lambda x: x.shape, params[key])
            got = jax.tree.map(lambda x: x.shape, saved[key])
            if want != got:
                raise ValueError(f"init_towers: {key!r} from {directory} has other shapes than "
                                 "this model's (a different size or context length)")
        target = {key: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                      sharding=s),
                                    params[key], shardings[key])
                  for key in spec["keys"]}
        params.update(checkpointer.restore_param_subset(step, target))
        logging.info("init_towers: %s loaded from %s step %d", list(spec["keys"]), directory,
                     step)
    return params
