"""The released CRATE-α-CLIPA two-tower checkpoints (docs/design.md §3), as a user takes them:
a state dict in the release layout, made by a PyTorch module of our own
(tests/clipa_torch_reference.py) with random weights at a small width, is imported with
`python -m crate_jax.convert import --from crate-alpha-clipa-torch`, loaded with
`crate_jax.load`, evaluated with `python -m crate_jax.evaluate`, and exported back."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the PyTorch module needs requirements-torch.txt")

from clipa_torch_reference import ClipaTwoTower, randomize_norms  # noqa: E402
from multiprocess_utils import FAST_COMPILE, ROOT, env  # noqa: E402

import crate_jax  # noqa: E402
from crate_jax.convert import (  # noqa: E402
    ConversionError,
    export_weights,
    import_weights,
    load_run,
)
from crate_jax.models import flat_params  # noqa: E402

# vision 64 wide (4 heads, not a standard width: --heads is needed), text 128 wide (2 heads by
# the port's width / 64), an embedding of 48 so that no transpose goes unnoticed
SIZES = dict(image=28, patch=14, width=64, depth=2, heads=4, text_width=128, text_depth=2,
             text_heads=2, vocab=320, context=32, embed=48)
VOCAB = os.path.join(ROOT, "crate_jax", "data", "assets", "shapes_captions_bert.txt")


def _cli(*args, module="crate_jax.convert"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=env(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 "
                                            f"{FAST_COMPILE}"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(torch module, the .pth file, the run directory the CLI import wrote)."""
    base = tmp_path_factory.mktemp("clipa_release")
    torch.manual_seed(0)
    module = ClipaTwoTower(**SIZES)
    randomize_norms(module)
    module.eval()
    path = base / "crate_alpha_CLIPA_test.pth"
    torch.save({"state_dict": module.state_dict()}, path)
    run = base / "run"
    proc = _cli("import", "--from", "crate-alpha-clipa-torch", str(path), str(run),
                "--heads", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "crate-alpha-ti/14 + clipa-text-b" in proc.stdout
    return module, path, run


def _relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_embeddings_equal_the_pytorch_module(release):
    module, _, run = release
    loaded = crate_jax.load(str(run), tokenizer=VOCAB)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    images = np.array(loaded.task.preprocess({"image": pixels}))
    tokens = loaded.tokenize(["a photo of a red circle", "a small blue star above a cross",
                              "x " * 40])
    assert tokens.shape == (3, 32) and (tokens[:, 0] == 101).all()
    with torch.no_grad():
        want_image = module.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        want_text = module.encode_text(torch.from_numpy(tokens).long())
    model = loaded.model
    got_image = model.image_proj(model.image(images))
    got_text = model.text_proj(model.text(tokens))
    assert _relative(got_image, want_image.numpy()) <= 1e-4
    assert _relative(got_text, want_text.numpy()) <= 1e-4
    # the one-call API: normalised embeddings and zero-shot probabilities
    emb = loaded.encode_image(list(pixels))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    probs = loaded.zero_shot(list(pixels), ["red circle", "blue star", "green cross"])
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(model.logit_scale[...]), 2.6592, rtol=1e-6)


def test_zero_shot_follows_eval_in1k_with_the_pytorch_module(release):
    """crate_jax.load(run).zero_shot with no protocol arguments equals eval_in1k.py's
    pipeline run on the PyTorch module: Resize(28) bilinear + CenterCrop(28) (crop sizes
    worked out by hand below), ImageNet mean/std, the 80 templates tokenized by an
    independent tokenizer, prompt embeddings normalised (+1e-8), averaged, normalised, and
    softmax(100 · cos)."""
    import bert_reference

    from crate_jax.evals.zeroshot import imagenet_templates

    module, _, run = release
    loaded = crate_jax.load(str(run), tokenizer=VOCAB)
    names = ["red circle", "blue star", "green cross"]
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
              for _ in range(3)]
    got = loaded.zero_shot(images, names)

    # 40×30: short side 30 → 28, long int(28·40/30) = 37; crop offset round(4.5) = 4
    pixels = np.stack([np.asarray(im.resize((37, 28), Image.BILINEAR).crop((4, 0, 32, 28)))
                       for im in images]).astype(np.float32) / 255
    x = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    vocab = bert_reference.read_vocab(VOCAB)
    templates = imagenet_templates()
    with torch.no_grad():
        u = module.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
        u = u / (u.norm(dim=-1, keepdim=True) + 1e-8)
        weights = []
        for name in names:
            rows = bert_reference.clipa_rows([t.format(name) for t in templates], vocab, 32)
            v = module.encode_text(torch.tensor(rows))
            v = v / (v.norm(dim=-1, keepdim=True) + 1e-8)
            weights.append(v.mean(0) / v.mean(0).norm())
        want = torch.softmax(100.0 * u @ torch.stack(weights, dim=1), dim=-1).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_export_round_trip_matches_every_key(release, tmp_path):
    module, _, run = release
    out = tmp_path / "exported.pth"
    params, cfg, _ = load_run(str(run))
    export_weights(params, "crate-alpha-clipa-torch", out, cfg)  # the CLI's export, in-process
    again = ClipaTwoTower(**SIZES)
    missing, unexpected = again.load_state_dict(torch.load(out), strict=True)
    assert not missing and not unexpected
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key].numpy(), value.numpy(),
                                      err_msg=key)
    # a .safetensors file (no torch needed) records the heads: it imports without --heads
    st = tmp_path / "exported.safetensors"
    export_weights(params, "crate-alpha-clipa-torch", st, cfg)
    again = import_weights(str(st), "crate-alpha-clipa-torch")
    for key, value in flat_params(params).items():
        np.testing.assert_array_equal(flat_params(again.params)[key], value, err_msg=key)


def _state(**changes):
    torch.manual_seed(1)
    state = {k: v.numpy().copy() for k, v in ClipaTwoTower(**SIZES).state_dict().items()}
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


def test_vision_attention_that_is_not_mssa_is_refused_by_layer():
    state = _state()
    w = state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    w[64:128] += 0.01  # the key block differs from the query block
    with pytest.raises(ConversionError, match=r"resblocks\.1\.attn\.in_proj_weight") as err:
        import_weights(state, "crate-alpha-clipa-torch", heads=4)
    assert "resblocks.0" not in str(err.value) and "MSSA" in str(err.value)


def test_missing_unexpected_and_misshapen_tensors_are_named():
    state = _state(**{"visual.ln_post.bias": None, "ln_final.weight": np.ones(7, np.float32),
                      "visual.extra_head": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError) as err:
        import_weights(state, "crate-alpha-clipa-torch", heads=4)
    message = str(err.value)
    for part in ("missing keys (1): visual.ln_post.bias", "visual.extra_head",
                 "ln_final.weight: (7,), expected (128,)"):
        assert part in message, message
    with pytest.raises(ConversionError, match=r"not a standard crate-alpha width.*heads"):
        import_weights(_state(), "crate-alpha-clipa-torch")


def test_evaluate_runs_zero_shot_and_retrieval_on_the_imported_model(release, tmp_path):
    _, _, run = release
    out = tmp_path / "metrics.json"
    proc = _cli(f"--workdir={run}", f"--tokenizer={VOCAB}", "--evals=zeroshot,retrieval",
                "--num_examples=24", f"--json={out}", module="crate_jax.evaluate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "imagenet2012 is not prepared; using the synthetic captioned shapes" in proc.stdout
    metrics = __import__("json").loads(out.read_text())
    assert metrics["zeroshot/count"] == 24 and 0.0 <= metrics["zeroshot/top1"] <= 1.0
    assert {"retrieval/i2t_R@1", "retrieval/t2i_R@5"} <= set(metrics)


def test_evaluate_without_a_tokenizer_names_the_flag(release):
    from crate_jax.inference import evaluate

    _, _, run = release
    with pytest.raises(ValueError, match=r"--tokenizer: .*vocab\.txt"):
        evaluate(str(run), kinds=["zeroshot"])
