"""The released CRATE-MAE layout (official crate_ae state_dict; docs/design.md §1, "Released"),
as a user takes it: a checkpoint written by a PyTorch module of our own in that layout
(tests/crate_mae_torch_reference.py), with random weights at a small size, is imported with
`python -m crate_jax.convert import --from crate-mae-torch`; under the same mask its encoder
features, reconstruction, loss and attention maps are the module's; it exports back into a
strict load_state_dict bit for bit; bad checkpoints are refused by key; and
`python -m crate_jax.analyze` reads the imported run."""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch module needs requirements-torch.txt")

from crate_mae_torch_reference import CrateMAE, randomize  # noqa: E402

from crate_jax import analyze  # noqa: E402
from crate_jax.convert import ConversionError, import_weights  # noqa: E402
from crate_jax.convert.__main__ import main as cli  # noqa: E402
from crate_jax.models import flat_params  # noqa: E402
from crate_jax.models.autoencoder import mask_from_noise  # noqa: E402
from crate_jax.models.layers import mae_sincos_2d  # noqa: E402
from crate_jax.tasks.mae import mae_loss, patch_targets  # noqa: E402

# width 32 with 4 heads is not a standard size (so --heads is needed); the decoder is one
# layer deeper than the encoder, so that its depth is read apart from the encoder's
SIZE = dict(dim=32, depth=2, heads=4, patch=4, image=16, decoder_depth=3)
LAYOUT = "crate-mae-torch"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(the torch module, its checkpoint as MAE's trainer saves one, the imported run)."""
    base = tmp_path_factory.mktemp("crate_mae_release")
    torch.manual_seed(0)
    module = CrateMAE(**SIZE)
    randomize(module, seed=1)
    module.eval()
    path = base / "crate_mae_test.pth"
    torch.save({"model": module.state_dict(), "epoch": 799}, path)
    run = base / "run"
    assert cli(["import", "--from", LAYOUT, str(path), str(run), "--heads", "4"]) == 0
    return module, path, run


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape and np.abs(b).max() > 0.1
    return float(np.abs(a - b).max() / np.abs(b).max())


def _inputs(seed: int = 0, batch: int = 3):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
    noise = rng.uniform(size=(batch, 16)).astype(np.float32)
    return images, noise


def _nchw(images: np.ndarray):
    return torch.from_numpy(images.transpose(0, 3, 1, 2)).double()


def test_outputs_equal_the_pytorch_module_under_the_same_mask(release):
    module, path, _ = release
    imported = import_weights(path, LAYOUT, heads=4)
    assert imported.name == "crate-mae-t/4"
    assert imported.overrides == dict(width=32, depth=2, heads=4, decoder_depth=3,
                                      image_size=16)
    notes = "\n".join(imported.notes)
    assert "{'model': ...} wrapper" in notes and "['epoch']" in notes
    assert "ignored decoder_embed.weight" in notes and "ignored decoder_embed.bias" in notes
    model = imported.build()
    reference = copy.deepcopy(module).double()
    images, noise = _inputs()
    for ratio, norm_pix in ((0.75, False), (0.6, True)):
        mask, visible = mask_from_noise(noise, ratio)
        with torch.no_grad():
            loss, pred, hidden, latent = reference(_nchw(images), torch.from_numpy(noise),
                                                   ratio, norm_pix)
        np.testing.assert_array_equal(np.asarray(mask), hidden.numpy() > 0)
        assert _relative(model.encode_masked(images, mask, visible), latent.numpy()) <= 1e-5
        ours = model.reconstruct(images, mask, visible)
        assert _relative(ours, pred.numpy()) <= 1e-5
        ours_loss = mae_loss(ours, patch_targets(images, 4, norm_pix), mask)
        assert abs(float(ours_loss) - loss.item()) <= 1e-5 * loss.item()
    _, inter = model.backbone(images, collect=True)
    with torch.no_grad():
        attention = reference.attention(_nchw(images), layer=1)
    assert _relative(inter["attention"][1], attention.numpy()) <= 1e-5


def test_export_loads_strictly_and_round_trips_bit_for_bit(release, tmp_path):
    module, path, run = release
    out = tmp_path / "exported.pth"
    assert cli(["export", "--to", LAYOUT, str(run), str(out)]) == 0
    fresh = CrateMAE(**SIZE)
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    original = module.state_dict()
    table = np.concatenate([np.zeros((1, 32), np.float32), mae_sincos_2d(4, 4, 32)])[None]
    for key, value in fresh.state_dict().items():
        value = value.numpy()
        if key.startswith("decoder_embed."):  # never called: written as zeros
            assert not value.any(), key
        elif key in ("pos_embed", "decoder_pos_embed"):
            assert value.tobytes() == table.tobytes(), key
            np.testing.assert_allclose(value, original[key].numpy(), atol=1e-6)
        else:
            assert value.dtype == np.float32 and value.tobytes() == \
                original[key].numpy().tobytes(), key
    first = import_weights(path, LAYOUT, heads=4)
    for exported in (out, tmp_path / "exported.safetensors"):
        if exported.suffix == ".safetensors":
            assert cli(["export", "--to", LAYOUT, str(run), str(exported)]) == 0
        # the .safetensors metadata holds the heads: no heads argument needed
        again = import_weights(exported, LAYOUT, **({} if exported.suffix == ".safetensors"
                                                    else {"heads": 4}))
        a, b = flat_params(again.params), flat_params(first.params)
        assert sorted(a) == sorted(b)
        assert all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)
    # a CRATE-MAE run has no CRATE classifier layout, and a CRATE layout no CRATE-MAE
    assert cli(["export", "--to", "crate-torch", str(run), str(tmp_path / "x.pth")]) == 1


def test_bad_checkpoints_are_refused_naming_the_key(release):
    module = release[0]
    sd = {k: v.numpy() for k, v in module.state_dict().items()}

    def refused(source, match, **kwargs):
        with pytest.raises(ConversionError, match=match):
            import_weights(source, LAYOUT, **{"heads": 4, **kwargs})

    key = "decoder_blocks.2.layers.0.1.fn.qkv.weight"
    refused({k: v for k, v in sd.items() if k != key}, rf"missing keys \(1\): {key}")
    extra = {**sd, "blocks.0.layers.0.2.fn.weight": sd["blocks.0.layers.0.1.fn.weight"]}
    refused(extra, r"unexpected keys \(1\): blocks\.0\.layers\.0\.2\.fn\.weight")
    allowed = import_weights(extra, LAYOUT, heads=4,
                             allow_extra={r"blocks\.0\.layers\.0\.2\..*": "a test key"})
    assert "ignored blocks.0.layers.0.2.fn.weight: a test key" in allowed.notes
    bias = "blocks.1.layers.0.0.fn.to_out.0.bias"
    refused({**sd, bias: np.zeros(31, np.float32)}, rf"shape mismatches.*{bias}: \(31,\)")
    refused({**sd, "decoder_pos_embed": sd["decoder_pos_embed"] + 0.01},
            "decoder_pos_embed is not MAE's fixed 2-D sin-cos table")
    refused({**sd, "decoder_blocks.0.layers.0.0.fn.weight": np.zeros((48, 48), np.float32)},
            "decoder width 48 differs from the encoder width 32")
    refused(sd, "--heads", heads=None)
    refused(sd, "patch_size=8", patch_size=8)


def test_analyze_reads_the_imported_run(release, tmp_path):
    module, _, run = release
    out = tmp_path / "analysis"
    assert analyze.main([f"--workdir={run}", f"--out={out}", "--data=synthetic_segmentation",
                         "--num-images=8", "--batch=8", "--show=2", "--coco=off"]) == 0
    summary = json.loads((out / "layerwise.json").read_text())["runs"][0]
    assert summary["model"] == "crate-mae-t/4" and summary["lam"] == 0.5
    assert len(summary["compression_mean"]) == 3 and len(summary["sparsity_mean"]) == 2
    assert len(summary["decoder"]["compression_mean"]) == 4  # the 3 decoder layers, and after
    for name in ("layerwise.png", "layerwise_autoencoder.png", "attention_layer1.png",
                 "pca.png", "segmentation.png"):
        assert (out / name).stat().st_size > 0, name
    scores = json.loads((out / "segmentation.json").read_text())["synthetic_segmentation"]
    assert 0.0 <= scores["run"]["miou"] <= 1.0
    # the attention maps the figure shows are the module's [CLS] → patch attention
    loaded = analyze.load_workdir(str(run))
    pixels = analyze.load_images("synthetic_segmentation", 16, 4)["image"]
    measured = analyze.run_model(loaded, pixels, batch=4, layer=1, normalization="reference",
                                 eps=None, include_cls=True)
    mean, std = analyze.normalization_constants(loaded.config)
    x = (pixels.astype(np.float32) / 255.0 - mean) / std
    with torch.no_grad():
        want = copy.deepcopy(module).double().attention(_nchw(x), layer=1)[:, :, 0, 1:]
    assert _relative(measured["cls_attention"], want.numpy()) <= 1e-5
