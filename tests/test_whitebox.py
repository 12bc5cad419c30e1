"""White-box measurements: coding rate closed forms, Rᶜ and sparsity against NumPy on the
explicit projections, the normalised cut, and the analyze command end to end."""

import ast
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx
from PIL import Image

from crate_jax import models
from crate_jax.data.synthetic import ShapesSegmentation
from crate_jax.whitebox import coding_rate as cr
from crate_jax.whitebox import segmentation as seg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_rate(z, alpha):
    """½ logdet(I + α ZᵀZ) in float64 on the p×p side, whatever the shape."""
    z = np.asarray(z, np.float64)
    p = z.shape[-1]
    return 0.5 * np.linalg.slogdet(np.eye(p) + alpha * z.T @ z)[1]


# --- coding rate -------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [4, 16])
def test_rate_orthonormal_closed_form(p):
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(p, p)))
    alpha = p / (p * 0.01)
    got = float(cr.coding_rate(q.astype(np.float32), 0.01))
    np.testing.assert_allclose(got, 0.5 * p * np.log1p(alpha), rtol=1e-5)


@pytest.mark.parametrize("c", [0.1, 3.0])
def test_rate_scaled_orthonormal(c):
    n, p = 12, 5
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(n, p)))  # ZᵀZ = I_p
    z = np.sqrt(c) * q
    eps_sq = 0.25
    alpha = p / (n * eps_sq)
    np.testing.assert_allclose(float(cr.coding_rate(z.astype(np.float32), eps_sq)),
                               0.5 * p * np.log1p(alpha * c), rtol=1e-5)
    np.testing.assert_allclose(float(cr.coding_rate(z.astype(np.float32), alpha=alpha)),
                               0.5 * p * np.log1p(alpha * c), rtol=1e-5)


def test_rate_small_n_uses_other_gram_side():
    rng = np.random.default_rng(2)
    n, p = 5, 40  # N < p: the N×N Gram matrix is factored
    z = rng.normal(size=(n, p)).astype(np.float32)
    alpha = p / (n * 0.01)
    np.testing.assert_allclose(float(cr.coding_rate(z, 0.01)), _np_rate(z, alpha), rtol=1e-5)
    tall = rng.normal(size=(60, 8)).astype(np.float32)
    np.testing.assert_allclose(float(cr.coding_rate(tall, 0.3)), _np_rate(tall, 8 / (60 * 0.3)),
                               rtol=1e-5)


def test_rate_zero_and_batched():
    assert float(cr.coding_rate(np.zeros((7, 3), np.float32))) == 0.0
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 3, 9, 4)).astype(np.float32)
    got = np.asarray(cr.coding_rate(z, 0.5))
    assert got.shape == (2, 3)
    want = np.array([[_np_rate(z[i, j], 4 / (9 * 0.5)) for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5)


CONCURRENT_RATES = """
import jax, jax.numpy as jnp, numpy as np
from crate_jax.whitebox.coding_rate import coding_rate
x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 65, 24)), jnp.float32)
f = jax.jit(lambda x: sum(coding_rate(x * (k + 1)) for k in range(8)))
print([float(f(x).sum()) for _ in range(3)])
"""


def test_independent_rates_in_one_program_finish_on_two_cores():
    """Eight batched rates XLA may run at once, on a 2-thread pool (the analysis of a layered
    model): with jaxlib's batched Cholesky this deadlocked on the second call."""
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0))[:2]
    proc = subprocess.run([sys.executable, "-c", CONCURRENT_RATES], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, cores),
                          env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    values = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(set(values)) == 1 and np.isfinite(values[0])


def test_rate_float32_stable_on_rank_deficient_large_set():
    rng = np.random.default_rng(4)
    n, p = 4096, 64
    z = (rng.normal(size=(n, 2)) @ rng.normal(size=(2, p)) * 1e3).astype(np.float32)
    got = float(cr.coding_rate(z, 0.01))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, _np_rate(z, p / (n * 0.01)), rtol=1e-3)
    # Unit rows of a rank-3 set, the reference normalisation's regime.
    u = rng.normal(size=(n, 3)) @ rng.normal(size=(3, p))
    u = (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(float(cr.coding_rate(u, 0.01)), _np_rate(u, p / (n * 0.01)),
                               rtol=1e-4)


# --- Rᶜ and sparsity on a model --------------------------------------------------------------

def _random_model(name: str, seed: int, **overrides):
    """A tiny model built abstractly (no init cost) with seeded random parameters."""
    model = nnx.eval_shape(lambda: models.create(name, width=32, depth=2, heads=2,
                                                 image_size=16, **overrides))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.normal(0.0, 0.2, var.get_value().shape).astype(np.float32)
        var.set_value(jnp.asarray(1.0 + noise if path[-1] == "scale" else noise))
    model.eval()
    return model


VARIANTS = [("reference", True), ("paper", False)]


@pytest.fixture(scope="module", params=["crate-alpha-ti/8", "crate-t/8"])
def tiny(request):
    model = _random_model(request.param, seed=5, num_classes=4)
    images = np.random.default_rng(6).normal(size=(3, 16, 16, 3)).astype(np.float32)

    @nnx.jit
    def run(model, x):
        _, inter = model(x, collect=True)
        return inter, [cr.measure(model, x, normalization=n, include_cls=c, inter=inter)
                       for n, c in VARIANTS]

    inter, measured = run(model, jnp.asarray(images))
    measured = {v: {k: np.asarray(a) for k, a in m.items()}
                for v, m in zip(VARIANTS, measured, strict=True)}
    return model, images, {k: np.asarray(v) for k, v in inter.items()}, measured


def _np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize(("normalization", "include_cls"), VARIANTS)
def test_compression_per_head_matches_numpy(tiny, normalization, include_cls):
    model, images, inter, measured = tiny
    got = measured[normalization, include_cls]
    depth = model.encoder.depth
    layers = [model.encoder.layer(i) for i in range(depth)]
    points = [inter["tokens_in"], *inter["tokens_out"]]
    assert got["compression_heads"].shape == (3, depth + 1, 2)
    start = 0 if include_cls else 1
    for j, tokens in enumerate(points):
        attn = layers[min(j, depth - 1)].attn
        x = ref.layer_norm(tokens[:, start:], np.asarray(attn.norm.scale[...]),
                           np.asarray(attn.norm.bias[...]), attn.norm.eps)
        proj = np.asarray(attn.proj[...])  # (d, K, p): U_k = proj[:, k, :]
        for b in range(len(images)):
            for k in range(proj.shape[1]):
                w = x[b] @ proj[:, k, :]
                n, p = w.shape
                if normalization == "reference":
                    want = _np_rate(_np_unit(w), p / (n * 0.01))
                else:
                    want = _np_rate(w, p / (n * 0.5 ** 2))
                np.testing.assert_allclose(got["compression_heads"][b, j, k], want,
                                           rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(got["compression"], got["compression_heads"].sum(-1), rtol=1e-6)


def test_sparsity_and_objective_match_numpy(tiny):
    model, _, inter, measured = tiny
    got = measured["reference", True]
    codes = inter["codes"]  # (L, B, 1+N, D)
    want = (codes == 0).mean(axis=(2, 3)).T
    np.testing.assert_allclose(got["sparsity"], want, rtol=1e-6)
    assert 0.0 < want.mean() < 1.0  # a real mix of zeros and non-zeros
    l0 = (codes != 0).sum(axis=(2, 3)).T
    np.testing.assert_allclose(got["l0"], l0, rtol=1e-5)
    want_obj = got["rate"][:, 1:] - got["compression"][:, 1:] - model.cfg.lam * l0
    np.testing.assert_allclose(got["objective"], want_obj, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(cr.sparsity(np.array([[[0.0, 1.0], [0.0, 0.0]]])), [0.75])



def test_summary_std_is_the_references():
    """The reference reports its coding rates with torch's sample std (Tensor.std(): ddof 1)
    and its sparsity with np.std (ddof 0); the summary does the same, per point and head."""
    rng = np.random.default_rng(3)
    per_image = {"compression": rng.normal(size=(4, 3)), "compression_heads": rng.normal(
        size=(4, 3, 2)), "rate": rng.normal(size=(4, 3)), "objective": rng.normal(size=(4, 2)),
        "sparsity": rng.uniform(size=(4, 2)), "l0": rng.uniform(size=(4, 2))}
    out = cr.summarize(per_image)
    for key, value in per_image.items():
        ddof = 0 if key in ("sparsity", "l0") else 1
        n = value.shape[0]
        mean = value.sum(0) / n
        want = np.sqrt(((value - mean) ** 2).sum(0) / (n - ddof))
        np.testing.assert_allclose(out[f"{key}_mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(out[f"{key}_std"], want, rtol=1e-12)
    # the sample std of 4 values is sqrt(4/3) times the population std: 15 % more
    np.testing.assert_allclose(out["rate_std"], np.sqrt(4 / 3) * per_image["rate"].std(0))
    one = cr.summarize({"rate": np.ones((1, 3)), "sparsity": np.ones((1, 3))})
    assert np.isnan(one["rate_std"]).all() and one["sparsity_std"] == [0.0, 0.0, 0.0]

def test_measure_vit_baseline_on_value_projections():
    """A ViT (the baseline of the white-box claims) is measured on its heads' value
    projections LN(Z)·W_v,k + b_v,k; its codes are the MLP's GELU activations (≤ 0 counts as
    zero) and its objective has no λ‖A‖₀ term."""
    model = _random_model("vit-ti/8", seed=8, num_classes=4, mlp_dim=64)
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 16, 16, 3)), jnp.float32)
    _, inter = model(x, collect=True)
    got = {k: np.asarray(v) for k, v in cr.measure(model, x, inter=inter).items()}
    points = [np.asarray(inter["tokens_in"]), *np.asarray(inter["tokens_out"])]
    for j, tokens in enumerate(points):
        attn = model.encoder.layer(min(j, 1)).attn
        ln = ref.layer_norm(tokens, np.asarray(attn.norm.scale[...]),
                            np.asarray(attn.norm.bias[...]), attn.norm.eps)
        v = np.einsum("bnd,dhk->bnhk", ln, np.asarray(attn.value[...])) + np.asarray(
            attn.value_bias[...])
        n, p = v.shape[1], v.shape[3]
        for b in range(2):
            for k in range(2):
                want = _np_rate(_np_unit(v[b, :, k]), p / (n * 0.01))
                np.testing.assert_allclose(got["compression_heads"][b, j, k], want,
                                           rtol=2e-4, atol=1e-4)
    codes = np.asarray(inter["codes"])
    np.testing.assert_allclose(got["sparsity"], (codes <= 0).mean(axis=(2, 3)).T, rtol=1e-6)
    np.testing.assert_allclose(got["objective"], got["rate"][:, 1:] - got["compression"][:, 1:],
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="image model"):
        cr.measure(object(), x)


# --- normalised cut ----------------------------------------------------------------------------

def test_normalized_cut_splits_two_blocks():
    rng = np.random.default_rng(7)
    n1, n2 = 9, 14
    w = np.full((n1 + n2, n1 + n2), 1e-3)
    w[:n1, :n1] = 1.0
    w[n1:, n1:] = 1.0
    w += rng.uniform(0, 0.05, w.shape)
    w = (w + w.T) / 2
    vec = seg.second_eigenvector(w)
    side = vec > vec.mean()
    assert len(set(side[:n1])) == 1 and len(set(side[n1:])) == 1 and side[0] != side[-1]
    fg, _ = seg.bipartition(w)
    assert fg.sum() in (n1, n2)
    # From features: two clusters of directions.
    feats = np.concatenate([rng.normal([5, 0, 0], 0.3, (n1, 3)),
                            rng.normal([0, 5, 0], 0.3, (n2, 3))])
    masks = seg.maskcut(feats, num_objects=1)
    assert len(masks) == 1 and masks[0].sum() in (n1, n2)
    assert len(set(masks[0][:n1])) == 1 and len(set(masks[0][n1:])) == 1


def test_maskcut_pixel_colours_find_the_shape():
    """The pipeline on pixel colours (no model): 2×2-pixel 'patches', centred mean colour."""
    ds = ShapesSegmentation("test", image_size=32, max_objects=1, num_examples=4)
    ious = []
    for i in range(len(ds)):
        ex = ds[i]
        img = ex["image"].astype(np.float64) / 255.0
        patches = img.reshape(16, 2, 16, 2, 3).mean((1, 3)).reshape(256, 3)
        feats = patches - patches.mean(0)
        pred = [seg.upsample(m, (16, 16), 2) for m in seg.maskcut(feats, num_objects=1)]
        scores = seg.miou([pred], [ex["mask"]])
        ious.append(scores["fg_iou"])
        assert scores["miou"] >= scores["fg_iou"] / 2
    assert np.mean(ious) > 0.5, ious


def test_miou_matching():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 1
    gt[2:, 2:] = 2
    perfect = [gt == 1, gt == 2]
    s = seg.miou([perfect], [gt])
    assert s["miou"] == 1.0 and s["fg_iou"] == 1.0 and s["object_iou"] == 1.0
    one = [gt == 1]
    s = seg.miou([one], [gt])
    assert s["fg_iou"] == 0.5 and s["object_iou"] == 0.5
    np.testing.assert_allclose(s["miou"], 0.5 * (0.5 + 8 / 12))
    s = seg.miou([[]], [np.zeros((4, 4), np.uint8)])
    assert s["miou"] == 1.0 and s["num_objects"] == 0


def test_coco_loader_skips_cleanly(tmp_path):
    with pytest.raises(seg.DatasetUnavailable, match="coco"):
        next(seg.coco_panoptic_val(32, 2, data_dir=str(tmp_path)))


# --- the analyze command ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from crate_jax.train.loop import train_and_evaluate
    spec = importlib.util.spec_from_file_location(
        "demo_classification_cfg", os.path.join(ROOT, "configs", "demo_classification.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.checkpoint.async_save = False
    config.tensorboard = False
    config.total_steps = config.optim.total_steps = 2
    config.data.eval_split = ""  # no evaluator to compile
    workdir = str(tmp_path_factory.mktemp("wb_run"))
    train_and_evaluate(config, workdir)
    return workdir


def test_analyze_end_to_end(smoke_run, tmp_path):
    from crate_jax import analyze
    out = str(tmp_path / "out")
    rc = analyze.main([f"--workdir={smoke_run}", "--random-init", "--data=synthetic_shapes",
                       "--num-images", "16", f"--out={out}", "--coco=off"])
    assert rc == 0
    pngs = ["layerwise.png", "attention_layer1.png", "pca.png", "segmentation.png"]
    for name in pngs:
        with Image.open(os.path.join(out, name)) as im:
            im.verify()
    with open(os.path.join(out, "layerwise.json")) as f:
        doc = json.load(f)
    assert [r["name"] for r in doc["runs"]] == [os.path.basename(smoke_run), "random init"]
    for r in doc["runs"]:
        depth = r["depth"]
        assert depth == 2
        assert len(r["compression_mean"]) == len(r["compression_std"]) == depth + 1
        assert len(r["compression_heads_mean"]) == depth + 1
        assert len(r["compression_heads_mean"][0]) == r["heads"]
        for key in ("sparsity", "objective", "l0"):
            assert len(r[f"{key}_mean"]) == len(r[f"{key}_std"]) == depth
        assert all(0.0 <= s <= 1.0 for s in r["sparsity_mean"])
        assert all(np.isfinite(r["compression_mean"]))
    assert doc["settings"]["normalization"] == "reference"
    with open(os.path.join(out, "segmentation.json")) as f:
        segdoc = json.load(f)
    scores = segdoc["synthetic_segmentation"]
    assert set(scores) == {os.path.basename(smoke_run), "random init"}
    for s in scores.values():
        assert 0.0 <= s["miou"] <= 1.0 and s["num_images"] == 16


def test_analyze_errors_name_the_flag(tmp_path, smoke_run, capsys):
    from crate_jax import analyze
    assert analyze.main([f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path}"]) == 2
    assert "--workdir" in capsys.readouterr().err
    assert analyze.main([f"--checkpoint={tmp_path / 'nope'}", f"--out={tmp_path}"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze.main([f"--workdir={smoke_run}", "--data=imagenet", f"--out={tmp_path}"])
    assert "--data" in capsys.readouterr().err
    # A config whose model is not an image model.
    text_run = tmp_path / "text_run"
    (text_run / "checkpoints" / "1").mkdir(parents=True)
    with open(os.path.join(smoke_run, "config.json")) as f:
        config = json.load(f)
    config["trainer"] = "language_model"
    (text_run / "config.json").write_text(json.dumps(config))
    assert analyze.main([f"--workdir={text_run}", f"--out={tmp_path}"]) == 2
    assert "--workdir" in capsys.readouterr().err
    # A step directory loads as well.
    step_dir = os.path.join(smoke_run, "checkpoints", "2")
    run = analyze.load_checkpoint(step_dir)
    assert run.step == 2 and run.model.cfg.depth == 2
