"""White-box analysis of ToST (python -m crate_jax.analyze): layer-wise coding rate on TSSA's
projections, MLP activation sparsity, and Π drawn where CRATE's attention maps go; the
checkpoint's BatchNorm statistics are loaded with the parameters."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from crate_jax import models
from crate_jax.convert.tost import read_tost_run
from crate_jax.whitebox.coding_rate import compression_per_head, measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tost_run(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_tost

    from crate_jax.train.loop import train_and_evaluate

    config = demo_tost.get_config("smoke,model=tost")
    config.checkpoint.async_save = False
    config.tensorboard = False
    config.total_steps = config.optim.total_steps = 2
    config.data.eval_split = ""
    workdir = str(tmp_path_factory.mktemp("tost_run"))
    train_and_evaluate(config, workdir)
    return workdir


def test_measure_on_tost_matches_its_definition():
    model = models.create("tost-t-12/8", image_size=32, num_classes=3, width=32, heads=4,
                          depth=2)
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    _, inter = model(x, collect=True)
    out = measure(model, x, inter=inter)
    codes = np.asarray(inter["codes"])  # GELU activations (L, B, N, 4d)
    np.testing.assert_allclose(out["sparsity"], (codes <= 0).mean((2, 3)).T, rtol=1e-6)
    layer0 = model.encoder.layer(0)
    want = compression_per_head(layer0.attn.project(inter["tokens_in"]))
    np.testing.assert_allclose(out["compression_heads"][:, 0], want, rtol=1e-5)
    np.testing.assert_allclose(out["objective"], out["rate"][:, 1:] - out["compression"][:, 1:],
                               rtol=1e-6)


def test_analyze_end_to_end_on_tost(tost_run, tmp_path):
    from crate_jax import analyze
    out = str(tmp_path / "out")
    rc = analyze.main([f"--workdir={tost_run}", "--random-init", "--data=synthetic_shapes",
                       "--num-images", "8", f"--out={out}", "--coco=off", "--seg-images", "4"])
    assert rc == 0
    for name in ("layerwise.png", "attention_layer1.png", "pca.png"):
        with Image.open(os.path.join(out, name)) as im:
            im.verify()
    with open(os.path.join(out, "layerwise.json")) as f:
        doc = json.load(f)
    for r in doc["runs"]:
        assert r["block"] == "tost" and len(r["compression_mean"]) == 3
        assert all(0.0 < s < 1.0 for s in r["sparsity_mean"])
    run = analyze.load_workdir(tost_run)
    _, stats, _ = read_tost_run(tost_run)
    np.testing.assert_array_equal(run.model.stem.norm_0.mean[...],
                                  stats["stem"]["norm_0"]["mean"])
    assert float(np.abs(stats["stem"]["norm_0"]["mean"]).sum()) > 0
    measured = analyze.run_model(run, np.zeros((2, 16, 16, 3), np.uint8), batch=2, layer=1,
                                 normalization="reference", eps=None, include_cls=True)
    assert measured["cls_attention"].shape == (2, 2, 4)  # Π: (images, heads, patches)
    np.testing.assert_allclose(measured["cls_attention"].sum(1), 1.0, rtol=1e-5)


def test_inference_and_evaluate_use_the_checkpoints_batchnorm_statistics(tost_run,
                                                                          monkeypatch):
    """Eval-mode BatchNorm normalises with the running statistics: `inference.load` and
    `evaluate` must carry the checkpoint's, not the initial 0 / 1."""
    from flax import nnx

    from crate_jax import inference
    from crate_jax.evals.probe import ProbeEvaluator
    from crate_jax.models.state import batch_stats_of

    _, stats, _ = read_tost_run(tost_run)
    want = stats["stem"]["norm_0"]["mean"]
    assert float(np.abs(want).sum()) > 0  # trained: not the initial zeros
    loaded = inference.load(tost_run)
    np.testing.assert_array_equal(batch_stats_of(loaded.model)["stem"]["norm_0"]["mean"], want)

    seen = {}

    def capture(self, graphdef, params, rest, mesh):
        batch, _ = nnx.split_state(rest, nnx.BatchStat, ...)
        seen["mean"] = np.asarray(nnx.to_pure_dict(batch)["stem"]["norm_0"]["mean"])
        return {}

    monkeypatch.setattr(ProbeEvaluator, "run", capture)
    inference.evaluate(tost_run, kinds=["probe"], data="synthetic", num_examples=8)
    np.testing.assert_array_equal(seen["mean"], want)
