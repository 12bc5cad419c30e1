"""A trained tiny causal LM run (configs/demo_lm.py:smoke, CRATE-α next to a GPT-2 baseline),
shared by this module: the generate CLI end to end, its errors, and the neuron pages."""

from __future__ import annotations

import json
import os

import pytest

from crate_jax import analyze, generate
from crate_jax.config_check import load_config
from crate_jax.train.loop import train_and_evaluate
from crate_jax.whitebox import neurons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lm") / "run")
    config = load_config(os.path.join(ROOT, "configs", "demo_lm.py") + ":smoke")
    config.checkpoint.async_save = False
    final = train_and_evaluate(config, workdir)
    assert final["step"] == config.total_steps
    assert final["val/params"] == pytest.approx(final["val/baseline_params"], rel=0.02)
    return workdir


def test_generate_cli_greedy_and_sampled(run_dir, capsys):
    argv = ["--workdir", run_dir, "--prompt", "def f(x):", "--max-new-tokens", "12"]
    assert generate.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("def f(x):")
    sampled = [*argv, "--temperature", "1.0", "--top-k", "20", "--seed", "3"]
    assert generate.main(sampled) == 0
    assert capsys.readouterr().out.startswith("def f(x):")
    assert generate.main([*argv, "--model", "baseline"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")


def test_generation_matches_the_cached_decoder(run_dir):
    run = generate.load_language_run(run_dir)
    model, tok = run.language_models()["crate"], run.tokenizer
    text, ids = generate.continue_text(model, tok, "import os", max_new_tokens=12)
    assert tok.decode(ids) == text and len(ids) <= 12
    assert tok.eos_id not in ids


@pytest.mark.parametrize("case", ["missing", "not_lm", "too_long", "no_checkpoint", "bucket"])
def test_generate_cli_errors_exit_2(case, run_dir, tmp_path, capsys):
    workdir = str(tmp_path / "nope")
    extra = []
    if case in ("not_lm", "no_checkpoint"):
        os.makedirs(workdir)
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        if case == "not_lm":
            config["trainer"] = "classification"
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config, f)
    elif case == "too_long":
        workdir, extra = run_dir, ["--max-new-tokens", "500"]
    elif case == "bucket":
        workdir = "gs://some-bucket/lm_run"
    assert generate.main(["--workdir", workdir, "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    expected = {"missing": "does not exist", "not_lm": "'classification' run",
                "too_long": "--max-new-tokens=500", "no_checkpoint": "no checkpoint",
                "bucket": "reads a local workdir only"}[case]
    assert expected in err and err.count("\n") == 1


def test_neuron_pages_hold_snippets(run_dir, tmp_path, capsys):
    out = str(tmp_path / "neurons")
    run = generate.load_language_run(run_dir, causal=False)
    summary = neurons.analyze_language_run(run, out, num_sequences=6, top_neurons=3,
                                           snippets=4)
    assert set(summary["models"]) == {"crate", "baseline"}
    crate, gpt = summary["models"]["crate"], summary["models"]["baseline"]
    assert crate["block"] == "crate_alpha" and gpt["block"] == "vit"
    assert len(crate["layers"]) == 2 and crate["layers"][0]["width"] == 4 * 32
    for layer in crate["layers"] + gpt["layers"]:
        assert 0 <= layer["sparsity"] <= 1 and len(layer["top_neurons"]) == 3
        assert layer["fraction_zero"] <= layer["fraction_nonpositive"]
    assert crate["layers"][0]["sparsity"] == crate["layers"][0]["fraction_zero"]
    assert gpt["layers"][0]["sparsity"] == gpt["layers"][0]["fraction_nonpositive"]
    with open(os.path.join(out, "neurons.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    index = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    assert "crate_layer1.html" in index and "baseline_layer0.html" in index
    assert os.path.getsize(os.path.join(out, "neurons.png")) > 0
    page = open(os.path.join(out, "crate_layer0.html"), encoding="utf-8").read()
    assert page.count("class='snip'") >= 3 and "tok cur" in page
    assert analyze.main([f"--workdir={run_dir}", f"--out={out}", "--num-sequences", "6",
                         "--top-neurons", "1", "--snippets", "1"]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "index.html" in printed
    with open(os.path.join(out, "neurons.json")) as f:
        assert len(json.load(f)["models"]["crate"]["layers"][0]["top_neurons"]) == 1
    assert analyze.main([f"--workdir={tmp_path / 'none'}", f"--out={out}"]) == 2
