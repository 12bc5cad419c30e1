"""Compile time of the real train step against depth: scanned layers against unrolled ones.

    python benchmarks/compile_time.py                       # depths 6, 12, 24, 32, scanned
    python benchmarks/compile_time.py --unrolled            # and the unrolled loop (slow)
    python benchmarks/compile_time.py --depths 6,12 --mesh fsdp:8 --unrolled

The step is the one crate_jax.main compiles (crate_jax.train.state.build_train_state): the
CLIPA-H/14 recipe (configs/clipa_h14.py: image tower crate-alpha-h/14, text tower clipa-text-h,
feature-cached contrastive loss, AdamW) with the image tower's depth set to each value,
compiled from shapes for `--mesh` fake CPU devices, as `python -m crate_jax.plan` does
(--xla_backend_optimization_level=0 unless --full-optimization). It prints trace + lower and
XLA compile seconds per depth. With the layers scanned, one layer body is compiled whatever
the depth, so the time should be nearly flat; unrolled, it grows with the depth.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import math  # noqa: E402

from crate_jax import plan  # noqa: E402  (sets no jax state on import)


def _config(batch: int):
    spec = importlib.util.spec_from_file_location("clipa_h14",
                                                  os.path.join(ROOT, "configs", "clipa_h14.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    with config.unlocked():
        config.batch_size = batch
    return config


def _seconds(config, depth: int, scan: bool, mesh: dict[str, int]) -> tuple[float, float]:
    import jax

    from crate_jax.parallel import make_mesh
    from crate_jax.train.state import build_train_state

    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.image_overrides.depth = depth
        for key in ("image_overrides", "text_overrides"):
            config.model[key].scan_layers = scan
    devices = jax.devices()[:math.prod(mesh.values())]
    state = build_train_state(config, make_mesh(mesh, devices=devices))
    with jax.set_mesh(state.mesh):
        t0 = time.perf_counter()
        lowered = state.trace().lower()
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="6,12,24,32")
    parser.add_argument("--mesh", default="fsdp:64", help="as crate_jax.plan --mesh")
    parser.add_argument("--batch", type=int, default=65_536, help="global batch")
    parser.add_argument("--unrolled", action="store_true", help="also the unrolled loop")
    parser.add_argument("--full-optimization", action="store_true",
                        help="XLA's default optimisation level (what the trainer compiles)")
    args = parser.parse_args()
    mesh = plan.parse_mesh(args.mesh)
    plan.start_fake_devices(math.prod(mesh.values()), fast=not args.full_optimization)
    config = _config(args.batch)
    depths = [int(d) for d in args.depths.split(",")]
    print(f"CLIPA-H/14 train step (text tower depth 24), mesh {args.mesh}, batch {args.batch}, "
          f"{'default' if args.full_optimization else 'fast-compile'} XLA:CPU")
    print(f"{'image depth':>11} {'layers':>9} {'trace+lower s':>14} {'compile s':>10} "
          f"{'total s':>8}")
    for scan in (True, False) if args.unrolled else (True,):
        for depth in depths:
            lower_s, compile_s = _seconds(config, depth, scan, mesh)
            print(f"{depth:>11} {'scanned' if scan else 'unrolled':>9} {lower_s:>14.1f} "
                  f"{compile_s:>10.1f} {lower_s + compile_s:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
