"""What the checkpoint checksum costs: state_digest (crate_jax/train/state_digest.py) against a
synchronous orbax save and restore of the same train state.

    python benchmarks/checkpoint_digest.py --model crate-alpha-b/16

The state is the model's parameters plus two Adam-sized moments (random values, float32), as
the trainer saves it. Printed: the state's size; the digest's first call (compile included)
and its steady time; a save through crate_jax's Checkpointer (digest included) and a restore
(digest check included); and the digest's share of each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import models
from crate_jax.train.checkpoint import Checkpointer
from crate_jax.train.state_digest import state_digest


class _NoData:
    """A data iterator with nothing to save (the benchmark measures the arrays alone)."""

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state

    def set_states(self, states: list[dict]) -> None:
        del states


def _state(name: str) -> dict:
    abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.split(abstract, nnx.Param, ...)[1])
    rng = np.random.default_rng(0)
    fill = lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32))
    return {"step": jnp.asarray(1, jnp.int32), "params": jax.tree.map(fill, shapes),
            "opt_state": {"mu": jax.tree.map(fill, shapes), "nu": jax.tree.map(fill, shapes)}}


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crate-alpha-b/16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = _state(args.model)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    print(f"{args.model}: train state {size / 2**20:,.0f} MiB in "
          f"{len(jax.tree.leaves(state))} arrays, {jax.device_count()} "
          f"{jax.default_backend()} device(s)")
    first = _timed(lambda: state_digest(state), 1)[0]
    digest = statistics.median(_timed(lambda: state_digest(state), args.repeats))
    print(f"state_digest: first call {first:.2f} s (compile included), then {digest:.3f} s "
          f"({size / 2**30 / digest:.2f} GiB/s)")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(f"{tmp}/checkpoints", keep=args.repeats + 1, async_save=False)
        saves, restores = [], []
        for i in range(args.repeats):
            saves += _timed(lambda i=i: ckpt.save(i + 1, state, _NoData()), 1)
            restores += _timed(lambda i=i: ckpt.restore(i + 1, abstract, _NoData()), 1)
        ckpt.close()
    save, restore = statistics.median(saves), statistics.median(restores)
    print(f"save (digest included): {save:.2f} s; digest share {100 * digest / save:.0f} %")
    print(f"restore (digest check included): {restore:.2f} s; digest share "
          f"{100 * digest / restore:.0f} %")


if __name__ == "__main__":
    main()
