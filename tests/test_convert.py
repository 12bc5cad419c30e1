"""crate_jax.convert: the three released layouts in (golden logits against the NumPy reference
forwards and against a PyTorch port written here), the PyTorch layouts out (bit-exact round
trips through dicts, .safetensors and .pth), errors that name every bad key, and the command
line end to end: import an .npz, finetune from it with the trainer, export it back."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx

from crate_jax import convert
from crate_jax.convert import safetensors_format
from crate_jax.convert.__main__ import main as cli
from crate_jax.convert.files import require_torch
from crate_jax.models import layer_stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny size every golden test uses.
D, DEPTH, HEADS, PATCH, IMAGE, CLASSES = 32, 2, 4, 8, 16, 5
ROWS = (IMAGE // PATCH) ** 2 + 1


# --- source checkpoints, built straight in each layout from a seeded RNG --------------------

def _normal(rng: np.random.Generator, *shape: int, std: float = 0.2) -> np.ndarray:
    return rng.normal(0.0, std, shape).astype(np.float32)


def _ln(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return 1.0 + _normal(rng, n, std=0.1), _normal(rng, n, std=0.1)


def crate_torch_sd(seed: int = 0, *, width: int = D, depth: int = DEPTH, patch: int = PATCH,
                   image: int = IMAGE, classes: int = CLASSES) -> dict[str, np.ndarray]:
    """A CRATE PyTorch state_dict (docs/design.md §3)."""
    rng = np.random.default_rng(seed)
    pd, rows = patch * patch * 3, (image // patch) ** 2 + 1
    sd = {"cls_token": _normal(rng, 1, 1, width), "pos_embedding": _normal(rng, 1, rows, width)}
    for idx, n in ((1, pd), (3, width)):
        sd[f"to_patch_embedding.{idx}.weight"], sd[f"to_patch_embedding.{idx}.bias"] = _ln(rng, n)
    sd["to_patch_embedding.2.weight"] = _normal(rng, width, pd, std=1 / math.sqrt(pd))
    sd["to_patch_embedding.2.bias"] = _normal(rng, width)
    for i in range(depth):
        t = f"transformer.layers.{i}"
        sd[f"{t}.0.norm.weight"], sd[f"{t}.0.norm.bias"] = _ln(rng, width)
        sd[f"{t}.0.fn.qkv.weight"] = _normal(rng, width, width)
        sd[f"{t}.0.fn.to_out.0.weight"] = _normal(rng, width, width)
        sd[f"{t}.0.fn.to_out.0.bias"] = _normal(rng, width)
        sd[f"{t}.1.norm.weight"], sd[f"{t}.1.norm.bias"] = _ln(rng, width)
        sd[f"{t}.1.fn.weight"] = _normal(rng, width, width)
    sd["mlp_head.0.weight"], sd["mlp_head.0.bias"] = _ln(rng, width)
    sd["mlp_head.1.weight"] = _normal(rng, classes, width)
    sd["mlp_head.1.bias"] = _normal(rng, classes)
    return sd


def crate_alpha_torch_sd(seed: int = 1) -> dict[str, np.ndarray]:
    """A CRATE-α PyTorch-port state_dict (docs/design.md §3)."""
    rng = np.random.default_rng(seed)
    sd = {"conv1.weight": _normal(rng, D, 3, PATCH, PATCH, std=0.05),
          "conv1.bias": _normal(rng, D),
          "cls_token": _normal(rng, 1, 1, D), "pos_embedding": _normal(rng, 1, ROWS, D)}
    for i in range(DEPTH):
        t = f"transformer.layers.{i}"
        sd[f"{t}.0.norm.weight"], sd[f"{t}.0.norm.bias"] = _ln(rng, D)
        sd[f"{t}.0.fn.qkv.weight"] = _normal(rng, D, D)
        sd[f"{t}.0.fn.to_out.0.weight"] = _normal(rng, D, D)
        sd[f"{t}.1.norm.weight"], sd[f"{t}.1.norm.bias"] = _ln(rng, D)
        sd[f"{t}.1.fn.D"] = _normal(rng, D, 4 * D)
        sd[f"{t}.1.fn.D1"] = _normal(rng, D, 4 * D)
    sd["mlp_head.0.weight"], sd["mlp_head.0.bias"] = _ln(rng, D)
    sd["mlp_head.1.weight"] = _normal(rng, CLASSES, D)
    sd["mlp_head.1.bias"] = _normal(rng, CLASSES)
    return sd


def crate_alpha_npz(seed: int = 2) -> dict[str, np.ndarray]:
    """A CRATE-α big_vision parameter set, '/'-joined keys (docs/design.md §3)."""
    rng = np.random.default_rng(seed)
    p = {"embedding/kernel": _normal(rng, PATCH, PATCH, 3, D, std=0.05),
         "embedding/bias": _normal(rng, D), "cls": _normal(rng, 1, 1, D),
         "pos_embedding": _normal(rng, 1, ROWS, D)}
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}"
        a = f"{b}/MultiHeadDotProductSubspaceAttention_0"
        p[f"{b}/LayerNorm_0/scale"], p[f"{b}/LayerNorm_0/bias"] = _ln(rng, D)
        p[f"{a}/proj/kernel"] = _normal(rng, D, HEADS, D // HEADS)
        p[f"{a}/out/kernel"] = _normal(rng, HEADS, D // HEADS, D)
        p[f"{b}/LayerNorm_1/scale"], p[f"{b}/LayerNorm_1/bias"] = _ln(rng, D)
        p[f"{b}/OvercompleteISTABlock_0/D"] = _normal(rng, D, 4 * D)
        p[f"{b}/OvercompleteISTABlock_0/D1"] = _normal(rng, D, 4 * D)
    p["encoder_norm/scale"], p["encoder_norm/bias"] = _ln(rng, D)
    p["head/kernel"] = _normal(rng, D, CLASSES)
    p["head/bias"] = _normal(rng, CLASSES)
    return p


def npz_to_alpha_torch(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same CRATE-α weights in the PyTorch-port layout, written out here independently."""
    sd = {"conv1.weight": p["embedding/kernel"].transpose(3, 2, 0, 1),
          "conv1.bias": p["embedding/bias"], "cls_token": p["cls"],
          "pos_embedding": p["pos_embedding"], "mlp_head.0.weight": p["encoder_norm/scale"],
          "mlp_head.0.bias": p["encoder_norm/bias"], "mlp_head.1.weight": p["head/kernel"].T,
          "mlp_head.1.bias": p["head/bias"]}
    for i in range(DEPTH):
        b, t = f"Transformer/encoderblock_{i}", f"transformer.layers.{i}"
        a = f"{b}/MultiHeadDotProductSubspaceAttention_0"
        sd |= {f"{t}.0.norm.weight": p[f"{b}/LayerNorm_0/scale"],
               f"{t}.0.norm.bias": p[f"{b}/LayerNorm_0/bias"],
               f"{t}.0.fn.qkv.weight": p[f"{a}/proj/kernel"].reshape(D, D).T,
               f"{t}.0.fn.to_out.0.weight": p[f"{a}/out/kernel"].reshape(D, D).T,
               f"{t}.1.norm.weight": p[f"{b}/LayerNorm_1/scale"],
               f"{t}.1.norm.bias": p[f"{b}/LayerNorm_1/bias"],
               f"{t}.1.fn.D": p[f"{b}/OvercompleteISTABlock_0/D"],
               f"{t}.1.fn.D1": p[f"{b}/OvercompleteISTABlock_0/D1"]}
    return sd


def images(seed: int = 3, batch: int = 2, size: int = IMAGE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def wrapped(sd: dict[str, np.ndarray]) -> dict:
    """The DataParallel / Lightning-style wrapping released checkpoints often have."""
    return {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 299}


def assert_logits_close(ours, expected, rtol: float = 1e-4) -> None:
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    assert ours.shape == expected.shape
    assert np.abs(expected).max() > 0.1  # a real signal, not all zeros
    err = np.abs(ours - expected).max() / np.abs(expected).max()
    assert err < rtol, f"relative error {err:.2e}"


def flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """'/'-joined paths (int and str layer keys alike) → arrays."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def assert_bitwise_equal(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        assert fa[key].shape == fb[key].shape, key
        assert fa[key].tobytes() == fb[key].tobytes(), key


# --- golden logits against the NumPy reference ----------------------------------------------

@pytest.mark.parametrize("wrap", [False, True])
def test_crate_torch_golden(wrap):
    sd = crate_torch_sd()
    x = images()
    expected = ref.crate_torch_forward(sd, x, heads=HEADS, patch=PATCH)
    imported = convert.import_crate_torch(wrapped(sd) if wrap else sd, heads=HEADS)
    assert imported.name == "crate-t/8"
    assert imported.overrides == dict(width=D, depth=DEPTH, heads=HEADS, num_classes=CLASSES,
                                      image_size=IMAGE)
    assert_logits_close(imported.build()(x), expected)
    if wrap:
        assert any("module." in n for n in imported.notes)
        assert any("epoch" in n for n in imported.notes)


@pytest.mark.parametrize("wrap", [False, True])
def test_crate_alpha_torch_golden(wrap):
    sd = crate_alpha_torch_sd()
    x = images()
    expected = ref.crate_alpha_torch_forward(sd, x, heads=HEADS, patch=PATCH)
    imported = convert.import_crate_alpha_torch(wrapped(sd) if wrap else sd, heads=HEADS)
    name, overrides, _ = imported
    assert name == "crate-alpha-ti/8"
    assert overrides["head_norm_eps"] == 1e-5 and overrides["pool"] == "cls"
    assert imported.config().eps == 1e-6
    assert_logits_close(imported.build()(x), expected)


@pytest.mark.parametrize("form", ["flat", "nested", "params_prefix"])
def test_crate_alpha_npz_golden(form):
    p = crate_alpha_npz()
    x = images()
    expected = ref.crate_alpha_npz_forward(p, x, patch=PATCH)
    source: dict = p
    if form == "nested":
        source = {}
        for key, value in p.items():
            node = source
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    elif form == "params_prefix":
        source = {f"params/{k}": v for k, v in p.items()}
    imported = convert.import_crate_alpha_npz(source)
    assert imported.name == "crate-alpha-ti/8"
    assert imported.overrides["heads"] == HEADS  # read off the (d, K, p) projection
    assert_logits_close(imported.build()(x), expected)


def test_npz_and_torch_port_layouts_import_to_the_same_params():
    p = crate_alpha_npz()
    a = convert.import_crate_alpha_npz(p)
    b = convert.import_crate_alpha_torch(npz_to_alpha_torch(p), heads=HEADS)
    assert_bitwise_equal(a.params, b.params)


def test_heads_from_the_standard_size_table_and_from_a_name():
    sd = crate_torch_sd(width=384, depth=1, patch=16, image=32, classes=3)
    imported = convert.import_crate_torch(sd)
    assert imported.config().heads == 6 and imported.name == "crate-t/16"
    assert imported.overrides == dict(depth=1, num_classes=3, image_size=32)
    assert any("standard crate size table" in n for n in imported.notes)
    small = crate_torch_sd()
    with pytest.raises(convert.ConversionError, match=r"--heads"):
        convert.import_crate_torch(small)
    hinted = convert.import_crate_alpha_torch(crate_alpha_torch_sd(), name="crate-alpha-h")
    assert hinted.config().heads == 16 and hinted.name == "crate-alpha-h/8"
    assert hinted.overrides["width"] == D and hinted.overrides["depth"] == DEPTH
    with pytest.raises(convert.ConversionError, match="patch 16"):
        convert.import_crate_alpha_torch(crate_alpha_torch_sd(), heads=4,
                                         name="crate-alpha-b/16")
    with pytest.raises(convert.ConversionError, match="projections have 4 heads"):
        convert.import_crate_alpha_npz(crate_alpha_npz(), heads=2)


# --- errors name every bad key -------------------------------------------------------------

BUILDERS = {
    "crate-torch": (crate_torch_sd, "transformer.layers.1.1.fn.weight", dict(heads=HEADS)),
    "crate-alpha-torch": (crate_alpha_torch_sd, "transformer.layers.1.1.fn.D1",
                          dict(heads=HEADS)),
    "crate-alpha-npz": (crate_alpha_npz, "Transformer/encoderblock_1/OvercompleteISTABlock_0/D1",
                        {}),
}


@pytest.mark.parametrize("layout", list(BUILDERS))
@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "all"])
def test_bad_checkpoints_name_the_keys(layout, fault):
    build, key, kwargs = BUILDERS[layout]
    sd = build()
    extra = "transformer.layers.0.1.norm.num_batches_tracked"
    wrong = "cls_token" if "torch" in layout else "cls"
    if fault in ("missing", "all"):
        del sd[key]
    if fault in ("extra", "all"):
        sd[extra] = np.array(7)
    if fault in ("shape", "all"):
        sd[wrong] = np.zeros((1, 1, D + 1), np.float32)
    with pytest.raises(convert.ConversionError) as info:
        convert.import_weights(sd, layout, **kwargs)
    message = str(info.value)
    if fault in ("missing", "all"):
        assert "missing keys (1)" in message and key in message
    if fault in ("extra", "all"):
        assert "unexpected keys (1)" in message and extra in message
    if fault in ("shape", "all"):
        assert f"{wrong}: (1, 1, {D + 1}), expected (1, 1, {D})" in message


def test_extra_keys_pass_only_when_whitelisted_with_a_reason():
    sd = crate_torch_sd()
    sd["transformer.layers.0.1.norm.num_batches_tracked"] = np.array(7)
    imported = convert.import_crate_torch(
        sd, heads=HEADS, allow_extra={r".*num_batches_tracked": "BatchNorm step counters"})
    assert any("num_batches_tracked: BatchNorm step counters" in n for n in imported.notes)


def test_a_corrupt_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors_format.save_file({"a": np.ones((2, 3), np.float32)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(safetensors_format.SafetensorsError, match=r"data_offsets|cover"):
        safetensors_format.load_file(tmp_path / "cut.safetensors")


def test_missing_torch_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ModuleNotFoundError, match=r"requirements-torch\.txt"):
        require_torch("reading x.pth")
    (tmp_path / "x.pth").write_bytes(b"\0")
    with pytest.raises(ModuleNotFoundError, match=r"requirements-torch\.txt"):
        convert.import_weights(tmp_path / "x.pth", "crate-torch")
    # .npz and .safetensors work without it
    np.savez(tmp_path / "w.npz", **crate_alpha_npz())
    assert convert.import_weights(tmp_path / "w.npz", "crate-alpha-npz").name


# --- export and round trips ----------------------------------------------------------------

def test_crate_alpha_round_trip_through_dict_and_safetensors(tmp_path):
    p = crate_alpha_npz()
    imported = convert.import_crate_alpha_npz(p)
    sd = convert.to_crate_alpha_torch(imported.params, imported.config())
    expected = npz_to_alpha_torch(p)
    assert sorted(sd) == sorted(expected)
    for key in sd:
        assert sd[key].tobytes() == expected[key].tobytes() and sd[key].shape == \
            expected[key].shape, key
    back = convert.import_crate_alpha_torch(sd, heads=HEADS)
    assert_bitwise_equal(back.params, imported.params)
    path = tmp_path / "alpha.safetensors"
    convert.export_weights(imported.params, "crate-alpha-torch", path, imported.config(),
                           name=imported.name)
    loaded, metadata = safetensors_format.load_file(path)
    assert metadata["heads"] == str(HEADS) and metadata["layout"] == "crate-alpha-torch"
    for key in sd:
        assert loaded[key].tobytes() == sd[key].tobytes(), key
    again = convert.import_weights(path, "crate-alpha-torch")  # heads from the metadata
    assert_bitwise_equal(again.params, imported.params)
    assert any("metadata" in n for n in again.notes)


def test_crate_round_trip():
    sd = crate_torch_sd()
    imported = convert.import_crate_torch(sd, heads=HEADS)
    out = convert.to_crate_torch(imported.params, imported.config())
    assert sorted(out) == sorted(sd)
    for key in sd:
        assert out[key].shape == sd[key].shape and out[key].tobytes() == sd[key].tobytes(), key
    assert_bitwise_equal(convert.import_crate_torch(out, heads=HEADS).params, imported.params)


def test_export_refuses_what_the_port_cannot_compute():
    imported = convert.import_crate_alpha_npz(crate_alpha_npz(), pool="gap")
    with pytest.raises(convert.ConversionError, match="pools the cls token"):
        convert.compatibility_notes(imported.config(), "crate-alpha-torch")
    with pytest.raises(convert.ConversionError, match="cannot be exported as crate-torch"):
        convert.compatibility_notes(imported.config(), "crate-torch")
    notes = convert.compatibility_notes(convert.import_crate_alpha_npz(
        crate_alpha_npz()).config(), "crate-alpha-torch")
    assert any("eps 1e-05" in n for n in notes)  # the port's head LN differs from big_vision's
    params = layer_stack.unstack_layers(
        convert.import_crate_torch(crate_torch_sd(), heads=HEADS).params)
    del params["encoder"]["layers"][1]["sparse"]["weight"]
    with pytest.raises(convert.ConversionError, match="encoder/layers/1/sparse/weight"):
        convert.to_crate_torch(params)


def test_sincos_checkpoint_without_pos_embedding():
    p = crate_alpha_npz()
    del p["pos_embedding"]
    with pytest.raises(convert.ConversionError, match="image_size"):
        convert.import_crate_alpha_npz(p)
    imported = convert.import_crate_alpha_npz(p, image_size=IMAGE)
    assert imported.overrides["posemb"] == "sincos2d"
    model = imported.build()
    p["pos_embedding"] = np.asarray(model.posemb.embedding[...])
    assert_logits_close(model(images()), ref.crate_alpha_npz_forward(p, images(), patch=PATCH))
    sd = convert.to_crate_alpha_torch(imported.params, imported.config())
    assert np.array_equal(sd["pos_embedding"], p["pos_embedding"])


def test_resize_on_import():
    imported = convert.import_crate_alpha_npz(crate_alpha_npz(), image_size=32, patch_size=16)
    assert imported.name == "crate-alpha-ti/16" and imported.overrides["image_size"] == 32
    assert imported.params["stem"]["kernel"].shape == (16, 16, 3, D)
    # the grid stays 2x2, so the position table is the original one
    assert np.array_equal(imported.params["posemb"]["embedding"],
                          crate_alpha_npz()["pos_embedding"])
    assert np.isfinite(np.asarray(imported.build()(images(size=32)))).all()
    bigger = convert.import_crate_alpha_npz(crate_alpha_npz(), image_size=32)
    table = bigger.params["posemb"]["embedding"]
    assert table.shape == (1, 17, D)
    assert np.array_equal(table[:, 0], crate_alpha_npz()["pos_embedding"][:, 0])
    with pytest.raises(convert.ConversionError, match="linear stem"):
        convert.import_crate_torch(crate_torch_sd(), heads=HEADS, patch_size=4)


# --- the command line, the trainer and the run directory -------------------------------------

def _smoke_config() -> ml_collections.ConfigDict:
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_classification

    c = demo_classification.get_config("smoke")
    c.checkpoint.async_save = False
    return c


def test_cli_import_finetune_export(tmp_path):
    from crate_jax.train.loop import final_params, train_and_evaluate

    p = crate_alpha_npz()
    npz = tmp_path / "crate_alpha.npz"
    np.savez(npz, **p)
    out = tmp_path / "imported"
    proc = subprocess.run([sys.executable, "-m", "crate_jax.convert", "import", "--from",
                           "crate-alpha-npz", str(npz), str(out)], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "crate-alpha-ti/8" in proc.stdout
    expected = convert.import_crate_alpha_npz(p)

    # the run directory: config.json and a checkpoint final_params reads
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"name": "crate-alpha-ti/8",
                               "overrides": dict(width=D, depth=DEPTH, heads=HEADS)}
    assert config["data"] == {"num_classes": CLASSES, "image_size": IMAGE}
    assert config["trainer"] == "classification"
    assert_bitwise_equal(final_params(str(out)), expected.params)
    from crate_jax import analyze  # the analysis tools load it as they load a run

    run = analyze.load_workdir(str(out))
    assert_bitwise_equal(nnx.to_pure_dict(nnx.state(run.model, nnx.Param)), expected.params)
    assert cli(["import", "--from", "crate-alpha-npz", str(npz), str(out)]) == 1  # exists

    # finetune from it: with a zero learning rate everything but the new head stays as imported
    c = _smoke_config()
    c.model.name = config["model"]["name"]
    c.model.overrides = ml_collections.ConfigDict(config["model"]["overrides"])
    c.init_from = str(out)
    c.optim.update(lr=0.0, total_steps=1, warmup_steps=0)
    c.total_steps = c.checkpoint.every = c.log_every = 1
    c.data.eval_split = None  # one step, no evaluation: the point is where it starts
    final = train_and_evaluate(c, str(tmp_path / "finetune"))
    assert final["step"] == c.total_steps
    tuned = flat(final_params(str(tmp_path / "finetune")))
    source = flat(expected.params)
    assert tuned["head/kernel"].shape == (D, c.data.num_classes)  # a fresh 4-class head
    for key, value in source.items():
        if not key.startswith("head/"):
            assert np.array_equal(tuned[key], value), key

    # export back: the PyTorch-port layout of the original arrays
    st = tmp_path / "exported.safetensors"
    assert cli(["export", "--to", "crate-alpha-torch", str(out), str(st)]) == 0
    exported, metadata = safetensors_format.load_file(st)
    want = npz_to_alpha_torch(p)
    assert sorted(exported) == sorted(want)
    for key, value in want.items():
        assert exported[key].tobytes() == value.tobytes() and exported[key].shape == \
            value.shape, key
    assert json.loads(metadata["config"])["head_norm_eps"] is None
    assert cli(["export", "--to", "crate-torch", str(out), str(tmp_path / "x.safetensors")]) == 1


def test_cli_errors_are_reported(tmp_path, capsys):
    p = crate_alpha_npz()
    p["extra/thing"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **p)
    assert cli(["import", "--from", "crate-alpha-npz", str(tmp_path / "bad.npz"),
                str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "extra/thing" in err
    assert cli(["import", "--from", "crate-alpha-npz", str(tmp_path / "bad.npz"),
                str(tmp_path / "out"), "--allow-extra", "extra/.*=not a weight"]) == 0
    assert "ignored extra/thing: not a weight" in capsys.readouterr().out


# --- a PyTorch port of docs/design.md §1 (where torch, optional, is installed) ---

def _torch_ports(torch):
    nn = torch.nn

    class Patchify(nn.Module):
        """'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' (no parameters: index 0 of the stem)."""

        def __init__(self, patch):
            super().__init__()
            self.patch = patch

        def forward(self, x):
            b, c, h, w = x.shape
            p = self.patch
            x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
            return x.reshape(b, (h // p) * (w // p), p * p * c)

    class PreNorm(nn.Module):
        def __init__(self, dim, fn, eps):
            super().__init__()
            self.norm, self.fn = nn.LayerNorm(dim, eps=eps), fn

        def forward(self, x):
            return self.fn(self.norm(x))

    class MSSA(nn.Module):
        """W = xU; A_k = softmax(W_k W_kᵀ/√p); O = concat(A_k W_k) U_out (+ b)."""

        def __init__(self, dim, heads, out_bias):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, dim, bias=False)
            self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=out_bias), nn.Dropout(0.0))

        def forward(self, x):
            b, n, d = x.shape
            w = self.qkv(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
            attn = torch.softmax(w @ w.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
            return self.to_out((attn @ w).transpose(1, 2).reshape(b, n, d))

    class ISTA(nn.Module):
        """ReLU(x + η(xW − xWᵀW) − ηλ), no residual."""

        def __init__(self, dim, eta=0.1, lam=0.1):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(dim, dim))
            self.eta, self.lam = eta, lam

        def forward(self, x):
            w = self.weight
            return torch.relu(x + self.eta * (x @ w - (x @ w.t()) @ w) - self.eta * self.lam)

    class ODL(nn.Module):
        """A₁ = ReLU(η xD − ηλ); A₂ = ReLU(A₁ − η(A₁Dᵀ − x)D − ηλ); out A₂ D1ᵀ."""

        def __init__(self, dim, ratio=4, eta=0.1, lam=0.1):
            super().__init__()
            self.D = nn.Parameter(torch.empty(dim, ratio * dim))
            self.D1 = nn.Parameter(torch.empty(dim, ratio * dim))
            self.eta, self.lam = eta, lam

        def forward(self, x):
            a = torch.relu(self.eta * (x @ self.D) - self.eta * self.lam)
            a = torch.relu(a - self.eta * ((a @ self.D.t() - x) @ self.D) - self.eta * self.lam)
            return a @ self.D1.t()

    class Transformer(nn.Module):
        def __init__(self, dim, depth, heads, alpha):
            super().__init__()
            eps = 1e-6 if alpha else 1e-5
            self.alpha = alpha
            self.layers = nn.ModuleList(
                nn.ModuleList([PreNorm(dim, MSSA(dim, heads, out_bias=not alpha), eps),
                               PreNorm(dim, ODL(dim) if alpha else ISTA(dim), eps)])
                for _ in range(depth))

        def forward(self, z):
            for attn, sparse in self.layers:
                z = z + attn(z)
                z = z + sparse(z) if self.alpha else sparse(z)
            return z

    class CRATE(nn.Module):
        def __init__(self, dim, depth, heads, patch, image, classes):
            super().__init__()
            pd = patch * patch * 3
            self.to_patch_embedding = nn.Sequential(Patchify(patch), nn.LayerNorm(pd),
                                                    nn.Linear(pd, dim), nn.LayerNorm(dim))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embedding = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
            self.transformer = Transformer(dim, depth, heads, alpha=False)
            self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))

        def forward(self, img):
            x = self.to_patch_embedding(img)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
            return self.mlp_head(self.transformer(x)[:, 0])

    class CRATEAlpha(nn.Module):
        def __init__(self, dim, depth, heads, patch, image, classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embedding = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
            self.transformer = Transformer(dim, depth, heads, alpha=True)
            self.mlp_head = nn.Sequential(nn.LayerNorm(dim, eps=1e-5), nn.Linear(dim, classes))

        def forward(self, img):
            x = self.conv1(img).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
            return self.mlp_head(self.transformer(x)[:, 0])

    return {"crate-torch": CRATE, "crate-alpha-torch": CRATEAlpha}


@pytest.mark.parametrize("layout", ["crate-torch", "crate-alpha-torch"])
def test_against_a_pytorch_port_through_pth_files(layout, tmp_path):
    torch = pytest.importorskip("torch")
    port = _torch_ports(torch)[layout](D, DEPTH, HEADS, PATCH, IMAGE, CLASSES).double().eval()
    sd = crate_torch_sd() if layout == "crate-torch" else crate_alpha_torch_sd()
    port.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in sd.items()},
                         strict=True)
    x = images()
    with torch.no_grad():
        expected = port(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))).numpy()
    numpy_ref = (ref.crate_torch_forward(sd, x, heads=HEADS, patch=PATCH)
                 if layout == "crate-torch"
                 else ref.crate_alpha_torch_forward(sd, x, heads=HEADS, patch=PATCH))
    assert_logits_close(numpy_ref, expected, rtol=1e-9)  # the port agrees with the oracle

    plain, ddp = tmp_path / "plain.pth", tmp_path / "ddp.pth"
    torch.save({k: v.float() for k, v in port.state_dict().items()}, plain)
    torch.save({"state_dict": {f"module.{k}": v.float() for k, v in port.state_dict().items()},
                "epoch": 3}, ddp)
    for path in (plain, ddp):
        imported = convert.import_weights(path, layout, heads=HEADS)
        assert_logits_close(imported.build()(x), expected)

    # export to .pth and load it strictly into a fresh port: the same logits
    imported = convert.import_weights(plain, layout, heads=HEADS)
    out = tmp_path / "exported.pth"
    convert.export_weights(imported.params, layout, out, imported.config())
    fresh = _torch_ports(torch)[layout](D, DEPTH, HEADS, PATCH, IMAGE, CLASSES).eval()
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        again = fresh(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    assert_logits_close(again, expected)
    assert_bitwise_equal(convert.import_weights(out, layout, heads=HEADS).params,
                         imported.params)


def test_bfloat16_tensors_from_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sd = crate_alpha_torch_sd()
    path = tmp_path / "bf16.pth"
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, path)
    imported = convert.import_weights(path, "crate-alpha-torch", heads=HEADS)
    assert any("bfloat16 -> float32" in n for n in imported.notes)
    expected = torch.from_numpy(sd["transformer.layers.0.1.fn.D"]).to(torch.bfloat16).float()
    assert np.array_equal(imported.params["encoder"]["layers"]["sparse"]["D"][0],
                          expected.numpy())
    assert jax.tree.leaves(imported.params)[0].dtype == np.float32


def test_load_an_imported_classifier_and_classify(tmp_path):
    """crate_jax.load on an imported run: the NumPy reference's logits, through the
    evaluation preprocessing (uint8 pixels normalised as the classification task does)."""
    import crate_jax

    p = crate_alpha_npz()
    convert.write_run(tmp_path / "run", convert.import_crate_alpha_npz(p))
    loaded = crate_jax.load(str(tmp_path / "run"))
    pixels = np.random.default_rng(0).integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
    x = np.asarray(loaded.task.preprocess({"image": pixels}))
    logits = ref.crate_alpha_npz_forward(p, x, patch=PATCH)
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(loaded.classify(pixels), want / want.sum(1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
