"""Every shipped config: its full-size settings are valid, and it trains in smoke mode."""

import glob
import importlib.util
import os

import pytest
from flax import nnx

from crate_jax import models
from crate_jax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"demo_classification.py", "crate_in1k.py", "crate_alpha_in21k.py",
            "crate_alpha_in1k.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_full_config_is_consistent(path):
    config = load(path).get_config(None)
    assert config.total_steps > 0 and config.optim.total_steps == config.total_steps
    assert config.optim.warmup_steps < config.total_steps
    overrides = dict(config.model.get("overrides", {}))
    if "data" in config:
        overrides.setdefault("num_classes", config.data.num_classes)
        overrides.setdefault("image_size", config.data.image_size)
    abstract = nnx.eval_shape(lambda: models.create(config.model.name, **overrides))
    assert models.count_params(abstract) > 0


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_smoke(path, tmp_path):
    config = load(path).get_config("smoke")
    config.checkpoint.async_save = False
    final = train_and_evaluate(config, str(tmp_path))
    assert final["step"] == config.total_steps


def test_unknown_config_argument_is_named():
    with pytest.raises(ValueError, match="'varient'"):
        load(os.path.join(ROOT, "configs", "crate_in1k.py")).get_config("varient=B")
