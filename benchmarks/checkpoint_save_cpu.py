"""The CPU one checkpoint save costs the host: a config's train state (as the trainer builds it,
sharded over the mesh) saved synchronously through crate_jax's Checkpointer, with and without
orbax's sharding file (which crate_jax no longer writes; crate_jax/train/checkpoint.py).

    python benchmarks/checkpoint_save_cpu.py --config=configs/demo_tost.py:smoke,model=tost

Runs on 8 fake CPU devices unless XLA_FLAGS says otherwise. Printed per variant: the mean CPU
seconds of all the process's threads (time.process_time) and the wall seconds of one save,
over --saves saves after one warm-up save, each variant twice in turn (the process's first
saves, with the digest's compile, are not reported). The baseline is
the same save with orbax's default handler setting (sharding file written).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax

from crate_jax.config_check import load_config
from crate_jax.convert.runs import NoDataPosition
from crate_jax.parallel import make_mesh
from crate_jax.train.checkpoint import (
    MIN_REPLICA_SLICE_BYTES,
    Checkpointer,
    use_array_handler,
)
from crate_jax.train.state import build_train_state


def train_state(config_arg: str) -> dict:
    """The fresh train state of a config on all devices, in the trainer's shardings."""
    config = load_config(config_arg)
    built = build_train_state(config, make_mesh(config.get("mesh", {"fsdp": -1})))
    params, rest = built.init_params()
    return {"step": jax.numpy.int32(0), "params": params,
            "opt_state": built.init_opt_state(params), **built.initial_batch_stats(rest)}


def per_save(state: dict, saves: int, sharding_file: bool) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one save, averaged over `saves`."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = Checkpointer(f"{tmp}/checkpoints", keep=2, async_save=False)
        # after the Checkpointer, which sets crate_jax's handler
        use_array_handler(MIN_REPLICA_SLICE_BYTES, sharding_file=sharding_file)
        checkpointer.save(0, state, NoDataPosition())
        cpu, wall = time.process_time(), time.perf_counter()
        for step in range(1, saves + 1):
            checkpointer.save(step, state, NoDataPosition())
        checkpointer.wait()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        checkpointer.close()
    use_array_handler()  # back to crate_jax's setting
    return cpu / saves, wall / saves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_tost.py:smoke,model=tost")
    parser.add_argument("--saves", type=int, default=8)
    args = parser.parse_args()
    state = train_state(args.config)
    print(f"{args.config}: {len(jax.tree.leaves(state))} arrays, "
          f"{sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20:.2f} MiB, "
          f"{jax.device_count()} {jax.default_backend()} devices; {args.saves} saves each")
    per_save(state, 2, False)  # first saves of a process (the digest's compile) go unreported
    for label, sharding_file in (("orbax default (sharding file)", True),
                                 ("crate_jax (no sharding file)", False),
                                 ("orbax default again", True),
                                 ("crate_jax again", False)):
        cpu, wall = per_save(state, args.saves, sharding_file)
        print(f"  {label:32s} {cpu:.3f} CPU-s, {wall:.3f} s wall per save")


if __name__ == "__main__":
    main()
