"""configs/whitebox_claims.py and crate_jax/study.py: the smoke study end to end (three models
trained, analysed against their random initialisations, the JSON and the figures), the std
over evaluation batches against NumPy, the presets, and bad study settings named before any
training."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from crate_jax import models, study, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "whitebox_claims.py")
NAMES = ("crate", "crate_alpha", "vit")


def _config(arg):
    spec = importlib.util.spec_from_file_location("whitebox_claims", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whitebox_claims")
    config = _config("smoke")
    config.study.models.vit.optim.lr = 7e-4  # a per-model optimizer setting reaches its run
    final = study.run_study(config, str(workdir))
    with open(workdir / "analysis" / study.JSON_NAME) as f:
        return workdir, final, json.load(f)


def _in_unit(values):
    a = np.asarray(values, np.float64)
    return bool(np.isfinite(a).all() and (a >= 0).all() and (a <= 1).all())


def test_smoke_study_json_is_complete_and_sane(smoke_study):
    workdir, final, doc = smoke_study
    assert set(doc["models"]) == set(NAMES)
    blocks = {n: m["block"] for n, m in doc["models"].items()}
    assert blocks == {"crate": "crate", "crate_alpha": "crate_alpha", "vit": "vit"}
    assert doc["settings"]["num_images"] == 8 and doc["settings"]["batch"] == 4
    for name, m in doc["models"].items():
        depth = m["depth"]
        assert (m["width"], depth, m["image_size"]) == (32, 2, 32)
        assert _in_unit(m["accuracy"]["val/top1"]) and m["step"] == 3
        assert m["lr"] == (7e-4 if name == "vit" else 1e-3) and m["optimizer"] == "adamw"
        for kind in ("trained", "random_init"):
            lw = m["layerwise"][kind]
            assert lw["num_batches"] == 2
            for key, length in (("compression", depth + 1), ("rate", depth + 1),
                                ("sparsity", depth), ("objective", depth)):
                mean, std = np.asarray(lw[f"{key}_mean"]), np.asarray(lw[f"{key}_std"])
                assert mean.shape == std.shape == (length,), (name, kind, key)
                assert np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()
            assert _in_unit(lw["sparsity_mean"])
            assert (np.asarray(lw["compression_mean"]) > 0).all()
            seg = m["segmentation"][kind]
            assert _in_unit([seg["miou"], seg["fg_iou"], seg["object_iou"]])
            assert seg["num_images"] == 8
        assert final[f"{name}/miou"] == pytest.approx(m["segmentation"]["trained"]["miou"])
    assert 0.5 < doc["patch_oracle"]["miou"] <= 1.0
    for name in NAMES:
        assert os.path.getsize(workdir / "analysis" / f"layerwise_{name}.png") > 1000
        assert os.path.getsize(workdir / "analysis" / f"attention_{name}.png") > 1000
    for figure in ("segmentation.png", "layerwise.png"):
        assert os.path.getsize(workdir / "analysis" / figure) > 1000


def test_claims_are_the_numbers_they_summarise(smoke_study):
    _, _, doc = smoke_study
    for name, c in doc["claims"].items():
        m = doc["models"][name]
        for kind in ("trained", "random_init"):
            rc = m["layerwise"][kind]["compression_mean"]
            sp = m["layerwise"][kind]["sparsity_mean"]
            assert c["compression_first_last"][kind] == [rc[0], rc[-1]]
            assert math.isclose(c["compression_drop"][kind], rc[0] - rc[-1])
            assert math.isclose(c["sparsity_rise"][kind], sp[-1] - sp[0])
        drop, rise = c["compression_drop"], c["sparsity_rise"]
        assert c["compression_falls_more_than_random"] == (
            drop["trained"] > max(drop["random_init"], 0))
        assert c["sparsity_rises_more_than_random"] == (
            rise["trained"] > max(rise["random_init"], 0))
    vit = doc["models"]["vit"]["segmentation"]["trained"]["miou"]
    crate = doc["models"]["crate"]["segmentation"]["trained"]["miou"]
    assert doc["claims"]["crate"]["miou_minus_vit"] == pytest.approx(crate - vit)
    assert "miou_minus_vit" not in doc["claims"]["vit"]


def test_batch_summary_is_the_sample_std_of_batch_means():
    rng = np.random.default_rng(0)
    measured = {k: rng.normal(size=(12, 3)) for k in study.BATCH_KEYS}
    out = study.batch_summary(measured, 4)
    for key, values in measured.items():
        means = [values[i:i + 4].mean(0) for i in (0, 4, 8)]
        mu = sum(means) / 3
        want = np.sqrt(sum((m - mu) ** 2 for m in means) / 2)
        np.testing.assert_allclose(out[f"{key}_std"], want, rtol=1e-12)
        np.testing.assert_allclose(out[f"{key}_mean"], values.mean(0), rtol=1e-12)
    assert out["num_batches"] == 3


def test_presets_build():
    """The CPU and GPU presets: three models of one width and depth, buildable, on the
    scenes at 64 / 128 px; the GPU preset in bfloat16."""
    for arg, (width, depth, size) in ((None, (128, 6, 64)), ("gpu", (384, 12, 128))):
        config = _config(arg)
        study.check_study(config)
        assert config.data.source == "synthetic_scenes" and config.data.image_size == size
        for name in NAMES:
            cfg = study.model_config(config, name)
            assert "study" not in cfg
            model = nnx.eval_shape(lambda c=cfg: tasks.get(c.trainer)(c).build_model(
                nnx.Rngs(0)))
            assert (model.cfg.width, model.cfg.depth, model.cfg.patch_size) == (width, depth, 8)
            assert model.cfg.dtype == ("bfloat16" if arg == "gpu" else "float32")
            assert models.count_params(model) > 0
            # ViT alone trains at its measured lr on the CPU preset; the others share 2e-3
            want_lr = {None: {"vit": 5e-4}, "gpu": {}}[arg].get(name, config.optim.lr)
            assert cfg.optim.lr == want_lr and config.optim.lr == (2e-3 if arg is None else 1e-3)
    with pytest.raises(ValueError, match="exclude"):
        _config("smoke,gpu")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("batch", 3, "num_images=8 must be a multiple of batch=3"),
    ("num_images", 4, "at least two batches"),
    ("data", "coco", "study.analysis.data='coco'"),
    ("num_objects", 0, "num_objects=0")])
def test_bad_study_settings_are_named(key, value, match):
    config = _config("smoke")
    config.study.analysis[key] = value
    with pytest.raises(ValueError, match=match):
        study.check_study(config)


def test_main_dispatches_to_the_study_and_checks_first(tmp_path):
    """crate_jax.main runs a config with a study section through crate_jax.study: a bad
    analysis setting stops it with one line before anything is trained or written."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.main", f"--config={CONFIG}:smoke",
         f"--workdir={workdir}", "--config.study.analysis.batch=3"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "num_images=8 must be a multiple of batch=3" in proc.stderr
    assert not workdir.exists()
