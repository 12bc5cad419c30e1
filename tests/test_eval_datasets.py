"""The published evaluation sets as users prepare them, in TFDS's real on-disk format (written
by TFDS itself, ArrayRecord) under the real builder names, configs and splits: COCO captions
(Karpathy splits), Flickr30k (the package's own builder, resolved as `tfds build` resolves
the README's path), ImageNet-1K. The README's `python -m crate_jax.evaluate
--evals=zeroshot,retrieval,probe` runs on an imported CRATE-α-CLIPA-style run without flags and
names every protocol; retrieval recall and k-NN accuracy equal NumPy computations of the
rules; ImageNet gets the published zero-shot protocol; probes evaluate an imported
classification backbone (num_classes=0) too."""

import io
import json
import os
import subprocess
import sys
from typing import ClassVar

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from doc_utils import documentation
from flax import nnx
from multiprocess_utils import FAST_COMPILE, ROOT, env
from PIL import Image

COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], np.uint8)


def _jpeg(label: int, rng: np.random.Generator, size=(40, 30)) -> bytes:
    """A noisy image of the class colour (so that a random network's features still group)."""
    image = rng.integers(0, 60, (size[1], size[0], 3)).astype(np.uint8) + COLOURS[label] // 2
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _captioned(split: str, count: int):
    rng = np.random.default_rng(len(split))
    for i in range(count):
        # image 0 has 6 captions: only the first 5 count (COCO's few such images)
        captions = [f"a {('red', 'green', 'blue', 'yellow')[(i + j) % 4]} picture number {i}"
                    for j in range(6 if i == 0 else 5)]
        yield f"{split}{i}", {"image": _jpeg(i % 4, rng), "image/filename": f"{i}.jpg",
                              "image/id": i,
                              "captions": [{"text": t, "id": 10 * i + j}
                                           for j, t in enumerate(captions)]}


class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """coco_captions/2014 as the catalog's builder writes it (its code needs tensorflow): the
    Karpathy splits, with the features evaluation reads."""

    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS: ClassVar = [tfds.core.BuilderConfig(name="2014")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(), "image/id": np.int64,
            "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64})}))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, n)
                for s, n in (("train", 4), ("val", 3), ("test", 7), ("restval", 2))}

    def _generate_examples(self, split, count):
        yield from _captioned(split, count)


class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """imagenet2012 (its images need a manual download): 1,000 classes, 'train' and
    'validation', images of four of the classes."""

    VERSION = tfds.core.Version("5.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000),
            "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24, 0),
                "validation": self._generate_examples(12, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for i in range(count):
            yield f"{seed}_{i}", {"image": _jpeg(i % 4, rng), "label": i % 4,
                                  "file_name": f"{i}.JPEG"}


def _flickr30k(data_dir, manual) -> None:
    """The package's Flickr30k builder from a manual directory, resolved from the README's
    path exactly as `tfds build crate_jax/data/tfds_builders/flickr30k` resolves it."""
    from tensorflow_datasets.scripts.cli import build

    (manual / "flickr30k-images").mkdir(parents=True)
    images = []
    for split, count in (("train", 3), ("val", 2), ("test", 5)):
        for key, ex in _captioned(split, count):
            name = f"{split}_{key}.jpg"
            (manual / "flickr30k-images" / name).write_bytes(ex["image"])
            images.append({"filename": name, "imgid": len(images), "split": split,
                           "sentences": [{"raw": c["text"], "sentid": c["id"]}
                                         for c in ex["captions"][:5]]})
    (manual / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    cls, _ = build._get_builder_cls_and_kwargs(
        os.path.join(ROOT, "crate_jax", "data", "tfds_builders", "flickr30k"), has_imports=False)
    assert cls.name == "flickr30k"
    cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))


@pytest.fixture(scope="module")
def captioned_dir(tmp_path_factory):
    """coco_captions and flickr30k prepared, as under a user's $TFDS_DATA_DIR."""
    base = tmp_path_factory.mktemp("tfds_captioned")
    CocoCaptions(data_dir=str(base / "data"), file_format="array_record").download_and_prepare()
    _flickr30k(base / "data", base / "manual")
    return base / "data"


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("tfds_imagenet")
    Imagenet2012(data_dir=str(base), file_format="array_record").download_and_prepare()
    return base


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A CRATE-α-CLIPA-layout run as `convert import` writes it (release preprocessing and
    BERT tokenizer recorded), toy-sized, random weights."""
    from crate_jax import tasks
    from crate_jax.convert.clipa import ImportedClip
    from crate_jax.convert.runs import write_run

    clip = dict(image="crate-alpha-ti/8", image_overrides=dict(image_size=16, pool="cls",
                                                               width=32, depth=1, heads=2),
                text="clipa-text-b", text_overrides=dict(context_length=32, width=32, depth=1,
                                                         heads=2),
                embed_dim=16)
    run = tmp_path_factory.mktemp("clip") / "run"
    config = ImportedClip(clip, {"text": {"token_embedding": np.zeros((32000, 1))}}).run_config()
    task = tasks.get("contrastive")(ml_collections.ConfigDict(config))
    model = task.build_model(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    cfg = task.model_config()
    write_run(run, ImportedClip(dict(clip, image_overrides=cfg.image_overrides,
                                     text_overrides=cfg.text_overrides), params))
    return run


def _recall_reference(sim: np.ndarray, caption_image: np.ndarray, k: int) -> tuple[float, float]:
    """(i2t, t2i) R@k by a loop: a hit when fewer than k wrong items score at least as high."""
    i2t = [sum(1 for j in range(sim.shape[1]) if caption_image[j] != i
               and sim[i, j] >= sim[i, caption_image == i].max()) < k for i in range(len(sim))]
    t2i = [sum(1 for i in range(len(sim)) if i != caption_image[j]
               and sim[i, j] >= sim[caption_image[j], j]) < k for j in range(sim.shape[1])]
    return float(np.mean(i2t)), float(np.mean(t2i))


def _knn_reference(train_x, train_y, test_x, test_y, k=20, t=0.07, classes=1000):
    """DINO's eval_knn.py rule: the k most similar train features, votes Σ exp(cos / T)."""
    def norm(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = norm(test_x) @ norm(train_x).T
    top1 = top5 = 0
    for row, label in zip(sim, test_y, strict=True):
        idx = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(classes)
        np.add.at(votes, train_y[idx], np.exp(row[idx] / t))
        order = np.argsort(-votes, kind="stable")
        top1 += order[0] == label
        top5 += label in order[:5]
    return top1 / len(test_y), top5 / len(test_y)


def test_readme_evaluate_command_runs_on_the_prepared_retrieval_sets(captioned_dir, clip_run,
                                                                     tmp_path):
    """The README's command, no other flag: retrieval on COCO's and Flickr30k's test splits
    (ImageNet is not prepared here: zero-shot and probes fall back, and say so)."""
    import crate_jax
    from crate_jax.data.tfds_source import open_data_source

    readme = documentation()
    command = "python -m crate_jax.evaluate --workdir=RUN --evals=zeroshot,retrieval,probe"
    assert command in readme
    out = tmp_path / "metrics.json"
    args = [a.replace("RUN", str(clip_run)) for a in command.split()[3:]] + [f"--json={out}"]
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.evaluate", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
        env=env(TFDS_DATA_DIR=str(captioned_dir),
                XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "zeroshot: imagenet2012 is not prepared; using the synthetic" in proc.stdout
    metrics = json.loads(out.read_text())
    for name, images in (("coco_captions", 7), ("flickr30k", 5)):
        protocol = metrics[f"retrieval_{name}/protocol"]
        assert protocol["data"] == f"tfds {name} test"
        assert protocol["captions per image"] == "the first 5 as stored"
        # the release's preprocessing, as the imported run records it
        assert (protocol["resize"], protocol["crop"], protocol["normalisation"]) == (
            "short side 16 bilinear", "centre 16 (crop fraction 1)", "ImageNet mean/std")
        assert metrics[f"retrieval_{name}/images"] == images
        assert metrics[f"retrieval_{name}/captions"] == 5 * images  # image 0's 6th: unused
    assert metrics["zeroshot/protocol"]["data"] == "synthetic_captions test (first 64)"
    assert metrics["probe/protocol"]["k-NN"].startswith("k 20, T 0.07")
    # the console names the protocol on the line of every number
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("eval: retrieval_coco")]
    assert lines and "[protocol: data tfds coco_captions test;" in lines[0]

    # the numbers, recomputed: embeddings from crate_jax.load, the rules in NumPy
    loaded = crate_jax.load(str(clip_run))
    for name in ("coco_captions", "flickr30k"):
        source = open_data_source(name, "test", str(captioned_dir))
        examples = [source[i] for i in range(len(source))]
        images = loaded.encode_image([e["image"] for e in examples])
        texts = [[t.decode() for t in e["captions"]["text"][:5]] for e in examples]
        captions = loaded.encode_text([t for group in texts for t in group])
        owner = np.repeat(np.arange(len(texts)), [len(g) for g in texts])
        for k in (1, 5):
            i2t, t2i = _recall_reference(images @ captions.T, owner, k)
            assert metrics[f"retrieval_{name}/i2t_R@{k}"] == pytest.approx(i2t)
            assert metrics[f"retrieval_{name}/t2i_R@{k}"] == pytest.approx(t2i)


def test_imagenet_is_evaluated_as_published_when_prepared(imagenet_dir, clip_run, monkeypatch):
    """With imagenet2012 prepared: zero-shot with the 1,000 curated names × 80 templates and
    the release's preprocessing; probes trained on train, tested on validation, with DINO's
    k-NN (recomputed here)."""
    from tensorflow_datasets.core import constants

    import crate_jax
    from crate_jax import tasks
    from crate_jax.data.tfds_source import open_data_source
    from crate_jax.evals import zeroshot
    from crate_jax.inference import eval_specs, evaluate, read_run_config

    monkeypatch.setattr(constants, "DATA_DIR", str(imagenet_dir))
    config = read_run_config(str(clip_run))
    specs = eval_specs(config, ["zeroshot", "probe"], "auto", None)
    assert specs == {
        "zeroshot_imagenet2012": dict(kind="zeroshot", source="tfds", name="imagenet2012",
                                      split="validation"),
        "probe_imagenet2012": dict(kind="probe", source="tfds", name="imagenet2012",
                                   train_split="train", split="validation")}
    config.evals = {"zeroshot_imagenet2012": specs["zeroshot_imagenet2012"]}
    config.eval_batch_size = config.batch_size = 8
    [evaluator] = tasks.get("contrastive")(config).evaluators()
    assert evaluator.class_names == zeroshot.imagenet_class_names()
    assert evaluator.templates == zeroshot.imagenet_templates()
    assert evaluator.protocol == {
        "data": "tfds imagenet2012 validation", "resize": "short side 16 bilinear",
        "crop": "centre 16 (crop fraction 1)", "normalisation": "ImageNet mean/std",
        "class names": "OpenAI CLIP's 1,000 curated ImageNet names",
        "template set": "openai_imagenet_80", "classes": 1000, "templates": 80,
        "class embedding": "mean of L2-normalised prompt embeddings, renormalised",
        "logits": "100·cos", "metrics": "top-1, top-5"}

    metrics = evaluate(str(clip_run), kinds=["probe"])
    assert metrics["probe_imagenet2012/protocol"]["data"] == \
        "tfds imagenet2012: train train, test validation"
    assert (metrics["probe_imagenet2012/train_count"], metrics["probe_imagenet2012/count"]) \
        == (24, 12)
    loaded = crate_jax.load(str(clip_run))
    splits = [open_data_source("imagenet2012", s, str(imagenet_dir))
              for s in ("train", "validation")]
    (xtr, ytr), (xte, yte) = [
        (loaded.encode_image([s[i]["image"] for i in range(len(s))]),
         np.array([s[i]["label"] for i in range(len(s))])) for s in splits]
    top1, top5 = _knn_reference(xtr, ytr, xte, yte)
    assert metrics["probe_imagenet2012/knn_top1"] == pytest.approx(top1)
    assert metrics["probe_imagenet2012/knn_top5"] == pytest.approx(top5)


def test_probe_of_an_imported_classification_backbone(imagenet_dir, tmp_path, monkeypatch):
    """A backbone as `convert import` writes it (num_classes=0): its pooled features, k-NN
    equal to DINO's rule; zero-shot is refused, naming --evals."""
    from tensorflow_datasets.core import constants

    from crate_jax import models
    from crate_jax.convert.importers import Imported
    from crate_jax.convert.runs import write_run
    from crate_jax.data.images import resize_center_crop, to_pil
    from crate_jax.data.tfds_source import open_data_source
    from crate_jax.inference import evaluate

    monkeypatch.setattr(constants, "DATA_DIR", str(imagenet_dir))
    overrides = dict(num_classes=0, image_size=16, width=32, depth=1, heads=2)
    model = models.create("vit-ti/8", rngs=nnx.Rngs(0), **overrides)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    run = tmp_path / "backbone"
    write_run(run, Imported("vit-ti/8", overrides, params))
    metrics = evaluate(str(run), kinds=["probe"], data="tfds:imagenet2012:train,validation")
    protocol = metrics["probe_imagenet2012/protocol"]
    assert protocol["feature"].startswith("the backbone's pooled output, the head's input")
    assert (protocol["resize"], protocol["crop"], protocol["normalisation"]) == (
        "short side 18 bicubic", "centre 16 (crop fraction 0.875)", "ImageNet mean/std")

    def features(split):
        source = open_data_source("imagenet2012", split, str(imagenet_dir))
        pixels = np.stack([np.asarray(resize_center_crop(to_pil(source[i]["image"]), 16,
                                                         0.875, "bicubic"))
                           for i in range(len(source))]).astype(np.float32) / 255
        x = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        model.eval()
        return (np.asarray(model(jnp.asarray(x, jnp.float32))),
                np.array([source[i]["label"] for i in range(len(source))]))

    top1, top5 = _knn_reference(*features("train"), *features("validation"))
    assert metrics["probe_imagenet2012/knn_top1"] == pytest.approx(top1)
    assert metrics["probe_imagenet2012/knn_top5"] == pytest.approx(top5)
    assert 0.0 <= metrics["probe_imagenet2012/linear_top1"] <= 1.0
    with pytest.raises(ValueError, match=r"--evals: \['zeroshot'\] need a two-tower"):
        evaluate(str(run), kinds=["zeroshot"])
    with pytest.raises(ValueError, match=r"--data='tfds:': use auto"):
        evaluate(str(run), kinds=["probe"], data="tfds:")
