"""The self-supervised tasks on several processes, as launch/local/multiprocess.sh runs them:
2 processes × 4 fake CPU devices against 1 process × 8 devices fed the same global batches.

  * mae: the masks are drawn inside the sharded step, the held-out reconstruction loss, the
    k-NN / linear probe and the reconstruction figure (written once, by process 0);
  * simdino: the EMA teacher updated after every step on every process, multi-crop views
    drawn per example, the probes of the teacher and of the random initialisation.

Losses, gradient norms and every evaluation metric must agree (rtol 1e-5: only the reduction
order of the collectives differs).
"""

from __future__ import annotations

import os

import pytest
from multiprocess_utils import QUIET, ROOT, Pair, assert_runs_match

CONFIGS = {"mae": os.path.join(ROOT, "configs", "demo_mae.py"),
           "simdino": os.path.join(ROOT, "configs", "demo_simdino.py")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess_self_supervised")
    pairs = {name: Pair(base, name, [f"--config={path}:smoke", *QUIET])
             for name, path in CONFIGS.items()}
    return {name: pair.wait() for name, pair in pairs.items()}


def test_mae_on_two_processes_matches_one(runs):
    final = assert_runs_match(runs["mae"], ("reconstruction/", "probe/"))
    assert final["reconstruction/mse"] > 0 and final["reconstruction/count"] > 0
    for workdir in (runs["mae"].multi, runs["mae"].single):
        assert (workdir / "reconstruction.png").stat().st_size > 0
        assert not list(workdir.glob("*.tmp*"))


def test_simdino_on_two_processes_matches_one(runs):
    final = assert_runs_match(runs["simdino"], ("probe/", "probe_random_init/"))
    assert final["probe/coding_rate"] > 0
