"""CLIPA: the global-batch losses on 8 fake devices against NumPy, token reduction, the CLIP
model, evaluator metrics, and training from webdataset shards (frozen and loaded towers:
test_multiprocess_tasks.py, on 1 and 2 processes)."""

import io
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from crate_jax import config_utils, parallel
from crate_jax.data import image_text
from crate_jax.data.webdataset import WebDatasetReader
from crate_jax.evals import clip as clip_evals
from crate_jax.models.clip import CLIP, ClipConfig
from crate_jax.tasks import token_reduction
from crate_jax.tasks.contrastive_loss import contrastive_loss
from crate_jax.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _embeddings(n=16, e=8, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, e)), rng.normal(size=(n, e))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return x, y


def _numpy_loss(x, y, scale, bias, kind):
    logits = scale * x @ y.T
    if kind == "infonce":
        def ce(m):
            m = m - m.max(1, keepdims=True)
            return -(np.diag(m) - np.log(np.exp(m).sum(1)))
        return 0.5 * (ce(logits).mean() + ce(logits.T).mean())
    z = 2 * np.eye(len(x)) - 1
    return -np.log(1 / (1 + np.exp(-z * (logits + bias)))).sum() / len(x)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_global_batch_loss_and_gradients_on_8_devices(kind):
    x, y = _embeddings()
    want = _numpy_loss(x, y, 10.0, -2.0, kind)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    grad = jax.value_and_grad(lambda *a: contrastive_loss(*a, kind=kind), argnums=(0, 1, 2, 3))
    single_loss, single_grads = grad(x, y, 10.0, -2.0)
    np.testing.assert_allclose(single_loss, want, rtol=1e-5)
    for shape in ({"data": 8}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = parallel.make_mesh(shape)
        with jax.set_mesh(mesh):
            xs, ys = (jax.device_put(a, parallel.batch_sharding(mesh)) for a in (x, y))
            loss, grads = jax.jit(grad)(xs, ys, 10.0, -2.0)
        np.testing.assert_allclose(loss, single_loss, rtol=1e-6)
        for a, b in zip(grads, single_grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_batch_accuracy_from_the_sharded_blocks(kind):
    """Image→text top-1 over the global batch, each device scoring its rows against all B
    texts: NumPy's argmax (the first maximum on a tie) of the whole similarity."""
    x, y = _embeddings(seed=1)
    rng = np.random.default_rng(2)
    x = y + 0.7 * rng.normal(size=y.shape)
    y[5] = y[3]  # a tie: rows 3 and 5 match columns 3 and 5 equally, and argmax takes 3
    x[3], x[5] = y[3], y[5]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x, y = x.astype(np.float32), y.astype(np.float32)
    best = np.argmax(x @ y.T, axis=1)
    want = np.mean(best == np.arange(len(x)))
    assert best[3] == best[5] == 3 and 0.3 < want < 0.9, (best, want)
    fn = jax.jit(lambda x, y: contrastive_loss(x, y, 10.0, -2.0, kind=kind, with_accuracy=True))
    loss, accuracy = fn(x, y)
    assert float(accuracy) == pytest.approx(want)
    np.testing.assert_allclose(loss, contrastive_loss(x, y, 10.0, -2.0, kind=kind), rtol=1e-6)
    for shape in ({"fsdp": 8}, {"dcn": 2, "fsdp": 4}):
        mesh = parallel.make_mesh(shape)
        with jax.set_mesh(mesh):
            xs, ys = (jax.device_put(a, parallel.batch_sharding(mesh)) for a in (x, y))
            sharded_loss, sharded_accuracy = fn(xs, ys)
        assert float(sharded_accuracy) == pytest.approx(want), shape
        np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)


def test_loss_memory_is_linear_in_devices():
    """Per-device logits are (B/n) × B: the compiled sharded loss never holds B × B."""
    mesh = parallel.make_mesh({"data": 8})
    x = jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=parallel.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda x, y: contrastive_loss(x, y, 1.0)).lower(x, x).compile().as_text()
    assert "f32[8,64]" in hlo and "f32[64,64]" not in hlo


@pytest.mark.parametrize("strategy,keep,count", [
    ("random", 0.5, 32), ("grid", 0.25, 16), ("block", 0.25, 16)])
def test_token_reduction(strategy, keep, count):
    idx = np.asarray(token_reduction.patch_keep_indices(jax.random.key(0), 4, 8, keep, strategy))
    assert idx.shape == (4, count) and idx.min() >= 0 and idx.max() < 64
    for row in idx:
        assert len(set(row)) == count and (np.diff(row) > 0).all()
        r, c = row // 8, row % 8
        if strategy == "grid":  # every other row and column, one offset per image
            assert len(set(r % 2)) == 1 and len(set(c % 2)) == 1 and len(set(r)) == 4
        if strategy == "block":  # a contiguous 4 × 4 square
            assert r.max() - r.min() == 3 and c.max() - c.min() == 3
    assert token_reduction.patch_keep_indices(jax.random.key(0), 4, 8, 1.0, "random") is None
    with pytest.raises(ValueError, match="strategy"):
        token_reduction.patch_keep_indices(jax.random.key(0), 4, 8, 0.5, "zigzag")


def test_clip_model_embeddings_and_temperature_clip():
    cfg = ClipConfig(image="crate-alpha-ti/8", image_overrides=dict(width=32, depth=1, heads=2,
                                                                    image_size=16),
                     text="text-ti", text_overrides=dict(width=32, depth=1, heads=2,
                                                         vocab_size=50, eot_id=2,
                                                         context_length=8),
                     embed_dim=16)
    model = CLIP(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 6, 2, 0, 0, 0, 0, 0]] * 3)
    u, v, scale, bias = nnx.jit(lambda m, x, t: m(x, t))(model, jnp.ones((3, 16, 16, 3)),
                                                          tokens)
    assert bias == 0.0
    assert u.shape == v.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)


def _temperature_step(loss_kind: str, start: float, sign: float):
    """One SGD step (lr 0.5) of a tiny two-tower model on loss = sign · (its scale t),
    starting from logit_scale = start, through the shared train step with the task's bounds."""
    import math

    import optax

    from crate_jax.tasks.contrastive import ContrastiveTask
    from crate_jax.train.step import make_train_step

    c = config_utils.base_config()
    c.loss = loss_kind
    c.model = ml_collections.ConfigDict(dict(
        image="crate-alpha-ti/8", image_overrides=dict(width=32, depth=1, heads=2),
        text="text-ti", text_overrides=dict(width=32, depth=1, heads=2, vocab_size=50,
                                            eot_id=2, pad_id=0), embed_dim=16))
    c.data = ml_collections.ConfigDict(dict(image_size=16, context_length=8))
    task = ContrastiveTask(c)
    model = task.build_model(nnx.Rngs(0))
    init_scale = float(model.logit_scale[...])
    model.logit_scale[...] = jnp.asarray(start)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)

    def loss(m, batch, rng):  # the scale as the forward pass gives it, pushed by `sign`
        u, v, t, b = m(batch["image"], batch["tokens"])
        return sign * t + 0.0 * contrastive_loss(u, v, t, b, kind=loss_kind), {}

    tx = optax.sgd(0.5)
    step = make_train_step(loss, graphdef, tx, optax.constant_schedule(0.5), seed=0,
                           bounds=task.param_bounds())
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.random((4, 16, 16, 3)), jnp.float32),
             "tokens": jnp.asarray(rng.integers(3, 50, (4, 8)), jnp.int32)}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    new, _ = jax.jit(step)(state, rest, batch)
    return init_scale, float(new["params"]["logit_scale"]), task, math.log(100.0)


def test_infonce_temperature_is_bounded_as_a_parameter_and_can_come_back():
    init, _, task, top = _temperature_step("infonce", 1.0, 1.0)
    assert init == pytest.approx(np.log(1 / 0.07)) and task.param_bounds() == {
        "logit_scale": (0.0, pytest.approx(top))}
    # pushed up past the bound: it stops at log 100 exactly
    _, pushed_up, _, _ = _temperature_step("infonce", top - 1e-3, -1.0)
    assert pushed_up == pytest.approx(top, abs=1e-6)
    # at the bound, a gradient that lowers it still reaches it (a clip in the forward pass
    # gave it none): the scale comes back down
    _, came_down, _, _ = _temperature_step("infonce", top, 1.0)
    assert came_down < top - 1e-4


def test_sigmoid_loss_starts_at_scale_10_bias_minus_10_without_a_bound():
    init, after, task, top = _temperature_step("sigmoid", 5.0, -1.0)
    assert init == pytest.approx(np.log(10.0)) and task.param_bounds() == {}
    assert after > 5.0 > top  # no bound: it moves past log 100
    model = task.build_model(nnx.Rngs(0))
    assert float(model.logit_bias[...]) == -10.0


def test_retrieval_recall_and_probes():
    # 3 images, 5 captions; caption j describes image caption_image[j]
    caption_image = np.array([0, 0, 1, 2, 2])
    sim = np.array([[0.9, 0.1, 0.8, 0.0, 0.2],   # image 0: best caption 0 (its own)
                    [0.2, 0.3, 0.1, 0.9, 0.0],   # image 1: best caption 3 (image 2's)
                    [0.1, 0.2, 0.3, 0.4, 0.8]])  # image 2: best caption 4 (its own)
    r = clip_evals.retrieval_recall(sim, caption_image, ks=(1, 2))
    assert r["i2t_R@1"] == pytest.approx(2 / 3)
    # captions' best images: 0→0 ✓, 1→1 ✗, 2→0 ✗, 3→1 ✗, 4→2 ✓
    assert r["t2i_R@1"] == pytest.approx(2 / 5)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)) * 3
    y = rng.integers(0, 4, 200)
    x = centers[y] + rng.normal(size=(200, 6)) * 0.3
    assert clip_evals.knn_accuracy(x[:150], y[:150], x[150:], y[150:], num_classes=4) > 0.95
    assert clip_evals.linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:],
                                            num_classes=4) > 0.95
    assert "{}" in clip_evals.read_templates()[0]
    assert len(clip_evals.imagenet_class_names()) == 1000


def _demo_smoke(**updates) -> ml_collections.ConfigDict:
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs",
                                                                       "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.checkpoint.async_save = False
    c.evals = ml_collections.ConfigDict()
    c.update(updates)
    return c


def _write_caption_shards(directory, n=96, per_shard=24):
    from crate_jax.data.synthetic import ShapesCaptions
    from crate_jax.data.webdataset import write_shards
    source = ShapesCaptions("train", num_examples=n, image_size=32)

    def samples():
        for i in range(n):
            example = source[i]
            buffer = io.BytesIO()
            Image.fromarray(example["image"]).save(buffer, format="JPEG", quality=90)
            yield {"key": f"{i:06d}", "image": buffer.getvalue(), "caption": example["caption"]}
    return write_shards(str(directory), samples(), per_shard)


def test_image_text_batches_resume_exactly(tmp_path):
    shards = _write_caption_shards(tmp_path)
    data = ml_collections.ConfigDict(dict(source="webdataset", shards=shards, tokenizer="bytes",
                                          image_size=16, context_length=48, text_tokens=24,
                                          text_reduction="block", num_workers=2))
    it = image_text.train_iterator(data, batch_size=8, seed=1)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(6)]
    it.close()
    again = image_text.train_iterator(data, batch_size=8, seed=1)
    again.set_state(state)
    got = [next(again) for _ in range(6)]
    again.close()
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert want[0]["image"].shape == (8, 16, 16, 3) and want[0]["tokens"].shape == (8, 24)


@pytest.mark.parametrize("tokenizer", ["bytes", "builtin:shapes_captions_bert"])
def test_truncating_text_tokens_equals_tokenize_then_reduce(tokenizer):
    from crate_jax.data import tokenizer as tokenizers

    rng = np.random.default_rng(0)
    words = "a the red small photo of dog grass over under near bright".split()
    captions = [" ".join(rng.choice(words, int(rng.integers(1, 30)))) for _ in range(40)]
    data = ml_collections.ConfigDict(dict(source="webdataset", tokenizer=tokenizer,
                                          context_length=32, text_tokens=8,
                                          text_reduction="truncate"))
    tok = image_text.tokenizer_for(data)
    reference = tokenizers.reduce_tokens(tokenizers.tokenize(tok, captions, 32), 8,
                                         method="truncate", rng=None, pad_id=tok.pad_id,
                                         eot_id=tok.eot_id,
                                         bos_id=tok.bos_id if tok.add_bos else None)
    np.testing.assert_array_equal(image_text.text_tokens(data, captions, None), reference)


@pytest.mark.parametrize("reduction", ["truncate", "random", "block"])
def test_a_chunk_of_pairs_equals_the_pairs_one_by_one(tmp_path, reduction):
    # chunks tokenize with one encode_batch call; the result must not depend on chunking
    shards = _write_caption_shards(tmp_path)
    data = ml_collections.ConfigDict(dict(source="webdataset", shards=shards,
                                          tokenizer="builtin:shapes_captions_bert",
                                          image_size=16, context_length=32, text_tokens=6,
                                          text_reduction=reduction, flip=True))
    reader = WebDatasetReader(shards, process_index=0, process_count=1, verify_images=False)
    samples = [dict(next(reader), epoch=0) for _ in range(12)]
    samples[3] = dict(samples[3], image=b"not a jpeg")  # a bad image inside the chunk
    pair = image_text._DecodePair(data, seed=5)
    chunk = pair.many(samples)
    single = [pair(sample) for sample in samples]
    assert chunk[3] is None and single[3] is None
    for a, b in zip(chunk, single, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_webdataset_flip_mirrors_about_half_the_crops(tmp_path):
    shards = _write_caption_shards(tmp_path)
    base = dict(source="webdataset", shards=shards, tokenizer="bytes", image_size=16,
                context_length=16, num_workers=2)
    plain = image_text.train_iterator(ml_collections.ConfigDict(base), batch_size=16, seed=3)
    flipped = image_text.train_iterator(ml_collections.ConfigDict(dict(base, flip=True)),
                                        batch_size=16, seed=3)
    a, b = next(plain)["image"], next(flipped)["image"]
    plain.close()
    flipped.close()
    same = [np.array_equal(x, y) for x, y in zip(a, b, strict=True)]
    # the flip draw follows the box draws, so a mirrored crop keeps its box
    mirrored = [np.array_equal(x[:, ::-1], y) for x, y in zip(a, b, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 2 <= sum(mirrored) <= 14 and sum(same) >= 2


def test_contrastive_training_from_webdataset_shards(tmp_path):
    shards = _write_caption_shards(tmp_path / "shards")
    config = _demo_smoke()
    config.data.update(source="webdataset", shards=shards, tokenizer="bytes", num_workers=2)
    config.image_reduction = config_utils.ml_collections.ConfigDict(dict(strategy="grid",
                                                                         keep=0.25))
    final = train_and_evaluate(config, str(tmp_path / "run"))
    assert final["step"] == config.total_steps
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"data/bad_images"' in lines


def test_contrastive_training_from_shards_converted_to_array_record(tmp_path):
    from crate_jax.data.wds.to_array_record import convert

    shards = _write_caption_shards(tmp_path / "shards", n=64)
    assert convert(shards, str(tmp_path / "ar"), per_file=20)["records"] == 64
    config = _demo_smoke()
    config.data.update(source="array_record", paths=str(tmp_path / "ar" / "*.array_record"),
                       tokenizer="bytes", num_workers=0)
    final = train_and_evaluate(config, str(tmp_path / "run"))
    assert final["step"] == config.total_steps
    assert "train/loss" in (tmp_path / "run" / "metrics.jsonl").read_text()
