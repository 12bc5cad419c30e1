"""Every shipped config: its full-size settings are valid, and it trains in smoke mode."""

import glob
import importlib.util
import os
import re

import pytest
from doc_utils import documentation
from flax import nnx

from crate_jax import models, tasks
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
    assert {"demo.py", "demo_classification.py", "crate_in1k.py", "crate_alpha_in21k.py",
            "crate_alpha_in1k.py", "clipa_b16.py", "clipa_l14.py", "clipa_h14.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_full_config_is_consistent(path):
    config = load(path).get_config(None)
    assert config.total_steps > 0 and config.optim.total_steps == config.total_steps
    assert config.optim.warmup_steps < config.total_steps
    task = tasks.get(config.trainer)(config)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    assert models.count_params(abstract) > 0


# The demos' smoke runs are the commands other tests run as a user types them: demo.py:smoke
# (test_readme.py, test_multiprocess_tasks.py, test_gcs.py), demo_classification.py:smoke
# (test_train.py, test_faults.py, test_multiprocess*.py).
RECIPES = [p for p in CONFIGS if not os.path.basename(p).startswith("demo")]


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_smoke(path, tmp_path, capsys):
    config = load(path).get_config("smoke")
    config.checkpoint.async_save = False
    final = train_and_evaluate(config, str(tmp_path))
    assert final["step"] == config.total_steps
    if os.path.basename(path) == "clipa_l14.py":
        _check_the_clipa_path(config, capsys.readouterr().out)


def _check_the_clipa_path(config, out: str):
    """clipa_l14:smoke runs the published CLIPA path at toy size: a BERT vocab.txt, the
    bidirectional last-position text tower, text tower and temperature frozen."""
    from crate_jax.data import image_text
    from crate_jax.data.wordpiece import WordPieceTokenizer

    assert isinstance(image_text.tokenizer_for(config.data), WordPieceTokenizer)
    task = tasks.get(config.trainer)(config)
    text = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))).text.cfg
    assert (text.causal, text.mask_padding, text.pool, text.mlp_activation) == (
        False, False, "last", "gelu_tanh")
    line = next(x for x in out.splitlines() if x.startswith("trainable parameters by group"))
    for group in ("text", "text_proj", "logit_scale"):
        assert re.search(rf"· {group} 0 of [0-9,]+ \(frozen\)", line), line
    assert re.search(r"image [1-9][0-9,]* of [0-9,]+ ·", line), line


def test_unknown_config_argument_is_named():
    with pytest.raises(ValueError, match="'varient'"):
        load(os.path.join(ROOT, "configs", "crate_in1k.py")).get_config("varient=B")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_clipa_h14_stages(stage):
    config = load(os.path.join(ROOT, "configs", "clipa_h14.py")).get_config(f"stage={stage}")
    assert config.model.image == "crate-alpha-h/14"
    if stage == "pretrain":
        assert (config.data.image_size, config.data.text_tokens) == (84, 8)
        assert config.batch_size == 65_536 and config.optim.lr == 1.024e-3
        assert config.batch_size * config.total_steps == pytest.approx(12.8e9, rel=1e-4)
    else:
        assert (config.data.image_size, config.data.text_tokens) == (224, 32)
        assert config.batch_size == 16_384 and config.optim.warmup_steps == 800


def test_clipa_needs_shards_and_tokenizer(tmp_path):
    config = load(os.path.join(ROOT, "configs", "clipa_b16.py")).get_config("smoke")
    config.data.source = "webdataset"
    config.data.tokenizer = None
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        train_and_evaluate(config, str(tmp_path / "a"))


def _documented_overrides() -> dict[str, list[str]]:
    """`--config.KEY=VALUE` overrides README, docs/ and launch scripts print: {KEY: VALUEs}."""
    text = documentation()
    for path in glob.glob(os.path.join(ROOT, "launch", "**", "*"), recursive=True):
        if os.path.isfile(path):
            text += open(path).read()
    found: dict[str, list[str]] = {}
    for key, value in re.findall(r"--config\.([a-z][a-z0-9_.]*)=('[^']*'|[^\s`'\"]+)", text):
        value = value.strip("'").rstrip(",)")
        found.setdefault(key, []).append(value if value.endswith("...") else value.rstrip("."))
    return found


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_documented_command_line_overrides_parse(path):
    """Every override the README prints parses on every config that has the key, as the
    command line parses it (a None field cannot be set from the command line)."""
    from absl import flags
    from ml_collections import config_flags

    from crate_jax.config_check import all_keys, load_config

    keys = set(all_keys(load_config(path)))
    documented = _documented_overrides()
    assert {"data.shards", "data.tokenizer", "init_from", "data.paths"} <= documented.keys()
    overrides = [(k, v) for k, values in documented.items() if k in keys for v in values]
    for key, value in overrides:  # one command line per override, as a user types it
        argv = ["prog", f"--config={path}", f"--config.{key}={value}"]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                        sys_argv=argv)  # as crate_jax.main defines it
        values(argv)
        node = values.config
        for part in key.split("."):
            node = node[part]
        assert str(node) == value or node == type(node)(value), (key, node, value)
