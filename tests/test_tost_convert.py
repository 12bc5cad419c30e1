"""ToST's official PyTorch layouts in and out (crate_jax/convert/tost.py), against PyTorch
modules written from docs/design.md (tost_torch_reference): logits within 1e-5 (relative), and
export → strict load_state_dict reproducing every tensor bit for bit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import tost_torch_reference as ref  # noqa: E402

from crate_jax import models  # noqa: E402
from crate_jax.convert.__main__ import main  # noqa: E402
from crate_jax.convert.importers import ConversionError  # noqa: E402
from crate_jax.convert.tost import import_tost, read_tost_run  # noqa: E402


def _randomize(module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight",
                                         "ln_1.weight", "ln_2.weight", "ln_f.weight",
                                         ".1.weight")) else 0.0
            p.copy_(base + 0.3 * noise)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)


def _load(run):
    config = json.loads((run / "config.json").read_text())
    overrides = {**config["model"]["overrides"], **config.get("data", {})}
    model = models.create(config["model"]["name"], **overrides)
    params, stats, _ = read_tost_run(run)
    nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, params)))
    if stats:
        nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, stats)))
    model.eval()
    return model, config


def _close(ours, theirs):
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, rtol=1e-5,
                               atol=1e-5 * scale)


def _round_trip(tmp_path, layout, make, original):
    out = tmp_path / "back.pth"
    assert main(["export", "--to", layout, str(tmp_path / "run"), str(out)]) == 0
    back = torch.load(out, weights_only=True)
    fresh = make()
    fresh.load_state_dict(back, strict=True)
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):  # written as the checkpoint's step
            assert int(back[key]) == 0
            continue
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("patch", [16, 8])
def test_vision_golden_and_round_trip(tmp_path, patch):
    def make():
        return ref.ToST(32, 2, 4, 5, patch=patch, eta=1e-5)

    model = make()
    _randomize(model, seed=patch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(model.state_dict(), tmp_path / "tost.pth")
    assert main(["import", "--from", "tost-torch", str(tmp_path / "tost.pth"),
                 str(tmp_path / "run"), "--image-size", "32"]) == 0
    ours, config = _load(tmp_path / "run")
    assert config["trainer"] == "classification" and config["data"]["image_size"] == 32
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    model.double().eval()
    with torch.no_grad():
        want = model(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()
    _close(ours(jnp.asarray(images)), want)
    _round_trip(tmp_path, "tost-torch", make, original)


def test_language_golden_and_round_trip(tmp_path):
    def make():
        return ref.ToSTGPT(50, 16, 32, 2, 4)

    model = make()
    _randomize(model, seed=3)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(model.state_dict(), tmp_path / "gpt.pth")
    assert main(["import", "--from", "tost-gpt-torch", str(tmp_path / "gpt.pth"),
                 str(tmp_path / "run")]) == 0
    ours, config = _load(tmp_path / "run")
    assert config["trainer"] == "language"
    assert config["model"]["overrides"]["vocab_size"] == 50
    tokens = np.random.default_rng(1).integers(0, 50, (2, 12))
    model.double().eval()
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)).numpy()
    _close(ours(jnp.asarray(tokens)), want)
    _round_trip(tmp_path, "tost-gpt-torch", make, original)


def test_full_size_names_are_inferred():
    """The official tost_cab_small_12_p16 shapes import as tost-s-12/16 with no overrides
    but the data fields."""
    sd = {k: v.float() for k, v in ref.ToST(384, 12, 8, 1000).state_dict().items()}
    imported = import_tost(sd, "tost-torch")
    assert imported.name == "tost-s-12/16"
    assert imported.overrides == {"image_size": 224, "num_classes": 1000}


def test_bad_checkpoints_are_named(tmp_path):
    sd = ref.ToST(32, 2, 4, 5).state_dict()
    del sd["blocks.1.attn.temp"]
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.temp: missing"):
        import_tost(sd, "tost-torch")
    sd = ref.ToST(32, 2, 4, 5).state_dict()
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"extra\.weight"):
        import_tost(sd, "tost-torch")
    gpt = ref.ToSTGPT(50, 16, 32, 2, 4).state_dict()
    gpt["lm_head.weight"] = gpt["lm_head.weight"] + 1
    with pytest.raises(ConversionError, match="ties them"):
        import_tost(gpt, "tost-gpt-torch")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    torch.save(ref.ToST(32, 2, 4, 5).state_dict(), tmp_path / "ok.pth")
    assert main(["import", "--from", "tost-torch", str(tmp_path / "ok.pth"),
                 str(tmp_path / "run")]) == 1  # never over an existing run
