"""Zero-shot ImageNet as the CRATE-α-CLIPA release evaluates it (torch_inference/eval_in1k.py):
OpenAI CLIP's 1,000 curated class names and 80 templates shipped with the package, the real
BERT-base uncased vocab.txt shipped with it, the classifier rule (each prompt embedding
normalised, the 80 averaged, normalised again) against NumPy on all 80,000 prompts tokenized by
an independent tokenizer, torchvision's Resize + CenterCrop, and an imported release's run
config that carries the release's preprocessing and tokenizer."""

import functools
import hashlib
import json
import os

import bert_reference
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from crate_jax import parallel
from crate_jax.data import images as image_ops
from crate_jax.data.image_text import tokenizer_for
from crate_jax.data.tokenizer import tokenize
from crate_jax.evals import zeroshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, "crate_jax", "data", "assets", "bert_base_uncased.txt")
LISTS = os.path.join(ROOT, "crate_jax", "evals", "data", "imagenet_zeroshot.json")
CONTEXT = 32  # the CLIPA releases' text context


def test_the_shipped_lists_are_openai_clips_imagenet_names_and_templates():
    names, templates = zeroshot.imagenet_class_names(), zeroshot.imagenet_templates()
    assert len(names) == 1000 and len(templates) == 80
    assert all(t.count("{}") == 1 for t in templates)
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet paper"
    assert names[134] == "crane bird" and names[517] == "construction crane"  # curated apart
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    # the exact lists eval_in1k.py imports (torch_inference/imagenet_templates.py)
    digest = hashlib.sha256(json.dumps([names, templates]).encode()).hexdigest()
    assert digest == "013c913e922205eb80a6ffed6b1de25a566ffd5e0b27666b169e0041595116b2"
    assert zeroshot.read_templates(zeroshot.IMAGENET_TEMPLATES) == templates
    assert len(zeroshot.read_templates()) == 12  # the synthetic sets' simple set


def test_the_shipped_vocab_is_bert_base_uncased():
    with open(VOCAB, "rb") as f:
        raw = f.read()
    # Google's BERT-Base uncased vocab.txt, byte for byte (as the Hugging Face hub serves it)
    assert hashlib.sha256(raw).hexdigest() == \
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert len(lines) == 30522
    assert [lines[i] for i in (0, 100, 101, 102, 103)] == \
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = tokenizer_for({"tokenizer": "builtin:bert_base_uncased"})
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.sep_id) == \
        (30522, 0, 100, 101, 102)


class BagOfTokens(nnx.Module):
    """A text tower simple enough to write in NumPy: Σ_t position_t · table[token_t]; its
    embeddings are not normalised (their norms grow with the prompt's length), so the
    per-prompt normalisation matters."""

    def __init__(self, rngs: nnx.Rngs):
        del rngs
        table = np.random.default_rng(0).normal(size=(30522, 8)).astype(np.float32)
        table[0] = 0.0  # [PAD]: prompts differ in length
        self.table = nnx.Param(jnp.asarray(table))
        self.position = nnx.Param(jnp.linspace(1.0, 3.0, CONTEXT))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return jnp.einsum("btd,t->bd", self.table[...][tokens], self.position[...])


def _reference_rows(prompts: list[str], vocab: dict[str, int]) -> np.ndarray:
    """bert_reference.clipa_rows, its word pieces cached per whitespace-separated word (its
    basic tokenizer splits on whitespace first, so a word's pieces do not depend on the
    rest; 80,000 prompts would take half a minute uncached)."""
    @functools.cache
    def ids(word: str) -> tuple[int, ...]:
        return tuple(vocab[p] for w in bert_reference.basic_tokens(word)
                     for p in bert_reference.word_pieces(w, vocab))

    rows = np.zeros((len(prompts), CONTEXT), np.int64)  # [PAD] = 0, [SEP] replaced by 0
    for row, prompt in zip(rows, prompts, strict=True):
        content = [vocab["[CLS]"], *(i for w in prompt.split() for i in ids(w))][:CONTEXT - 1]
        row[:len(content)] = content
    return rows


def test_zero_shot_classifier_equals_numpy_on_the_real_vocab():
    """Every tenth class with all 80 templates (8,000 prompts); the 1,000 names are checked
    against the vocabulary below."""
    with open(LISTS, encoding="utf-8") as f:
        lists = json.load(f)
    classes = list(range(0, 1000, 10))
    names, templates = [lists["classnames"][c] for c in classes], lists["templates"]
    tok = tokenizer_for({"tokenizer": "builtin:bert_base_uncased"})
    model = BagOfTokens(nnx.Rngs(0))
    evaluator = zeroshot.ZeroShotEvaluator(
        "zeroshot", lambda: iter(()), zeroshot.imagenet_class_names(),
        lambda texts: tokenize(tok, texts, CONTEXT),
        zeroshot.read_templates(zeroshot.IMAGENET_TEMPLATES), lambda b: b["image"],
        text_batch=4096, eval_classes=classes)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = parallel.make_mesh({"fsdp": -1})
    with jax.set_mesh(mesh):
        got = evaluator.class_embeddings(graphdef, nnx.to_pure_dict(params), rest, mesh)

    prompts = [t.format(c) for c in names for t in templates]  # class-major, as eval_in1k
    vocab = bert_reference.read_vocab(VOCAB)
    rows = _reference_rows(prompts, vocab)
    sample = np.random.default_rng(0).choice(len(prompts), 300, replace=False)
    np.testing.assert_array_equal(  # the cache changes nothing
        rows[sample], bert_reference.clipa_rows([prompts[i] for i in sample], vocab, CONTEXT))
    table = np.asarray(model.table[...], np.float64)
    emb = np.einsum("btd,t->bd", table[rows], np.linspace(1.0, 3.0, CONTEXT))
    emb = emb.reshape(len(classes), 80, -1)
    emb = emb / (np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-8)
    want = emb.mean(1) / np.linalg.norm(emb.mean(1), axis=-1, keepdims=True)
    assert got.shape == (len(classes), 8)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # the rule is what is tested: averaging the raw embeddings gives other weights
    raw = np.einsum("btd,t->bd", table[rows], np.linspace(1.0, 3.0, CONTEXT))
    raw = raw.reshape(len(classes), 80, -1).mean(1)
    naive = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
    assert np.abs(naive - want).max() > 1e-2
    # every curated name is in the vocabulary: no [UNK] in any of the 1,000
    all_rows = _reference_rows(lists["classnames"], vocab)
    assert not (all_rows == vocab["[UNK]"]).any()


TRACED_ROWS: list[int] = []


class RowCountingBag(BagOfTokens):
    """BagOfTokens that records in TRACED_ROWS the batch size of every program it is traced
    into."""

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        TRACED_ROWS.append(tokens.shape[0])
        return super().encode_text(tokens)


@pytest.mark.parametrize("classes, text_batch, traced", [
    (3, 2048, [16]),  # 3 × 4 = 12 prompts: one batch of 16 rows (8 devices), not of 2,048
    (5, 8, [8]),  # 20 prompts: batches of 8, the last one padded to 8
    # 100 classes per call: 400 prompts in batches of 16, then 2 classes' 8 in one of 8
    (102, 16, [16, 8]),
])
def test_prompt_batches_are_no_bigger_than_the_prompts(classes, text_batch, traced):
    names = [f"thing {i}" for i in range(classes)]
    templates = ["a {}.", "a photo of a {}.", "{} again", "the {}"]
    tok = tokenizer_for({"tokenizer": "builtin:bert_base_uncased"})
    evaluator = zeroshot.ZeroShotEvaluator(
        "zeroshot", lambda: iter(()), names, lambda texts: tokenize(tok, texts, CONTEXT),
        templates, lambda b: b["image"], text_batch=text_batch)
    model = RowCountingBag(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = parallel.make_mesh({"fsdp": -1})
    TRACED_ROWS.clear()
    with jax.set_mesh(mesh):
        got = evaluator.class_embeddings(graphdef, nnx.to_pure_dict(params), rest, mesh)
    assert TRACED_ROWS == traced

    table = np.asarray(model.table[...], np.float64)
    rows = tokenize(tok, [t.format(c) for c in names for t in templates], CONTEXT)
    emb = np.einsum("btd,t->bd", table[rows], np.linspace(1.0, 3.0, CONTEXT))
    emb = emb.reshape(classes, len(templates), -1)
    emb = emb / (np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-8)
    want = emb.mean(1) / np.linalg.norm(emb.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("size_in, crop, interpolation, resized, box", [
    # eval_in1k.py: Resize(224) keeps the aspect, the long side truncated: 500·224/375 = 298.7
    ((500, 375), 1.0, "bilinear", (298, 224), (37, 0)),
    ((375, 500), 1.0, "bilinear", (224, 298), (0, 37)),
    # CenterCrop's offset is Python's round, half to even: (301 − 224) / 2 = 38.5 → 38
    ((301, 224), 1.0, "bilinear", None, (38, 0)),
    # DINO's Resize(256, bicubic) + CenterCrop(224): 320·256/240 = 341.3 → 341, offset 58.5 → 58
    ((320, 240), 0.875, "bicubic", (341, 256), (58, 16)),
])
def test_eval_resize_is_torchvisions(size_in, crop, interpolation, resized, box):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size_in[1], size_in[0], 3), dtype=np.uint8))
    got = np.asarray(image_ops.resize_center_crop(image, 224, crop, interpolation))
    filt = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    want = image.resize(resized, filt) if resized else image
    want = np.asarray(want.crop((box[0], box[1], box[0] + 224, box[1] + 224)))
    np.testing.assert_array_equal(got, want)


def test_bad_eval_preprocessing_settings_are_named():
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match="eval_interpolation: 'nearest'"):
        image_ops.resize_center_crop(image, 16, 1.0, "nearest")
    with pytest.raises(ValueError, match=r"eval_crop_fraction: 1\.2"):
        image_ops.resize_center_crop(image, 16, 1.2)


def _imported_clip(rows: int):
    from crate_jax.convert.clipa import ImportedClip

    return ImportedClip(clip=dict(image="crate-alpha-ti/14", text="clipa-text-b", embed_dim=8,
                                  image_overrides=dict(image_size=28, pool="cls"),
                                  text_overrides=dict(context_length=CONTEXT)),
                        params={"text": {"token_embedding": np.zeros((rows, 4))}})


def test_an_imported_release_run_carries_the_releases_preprocessing_and_tokenizer():
    from crate_jax import tasks
    from crate_jax.inference import Loaded

    config = _imported_clip(32000).run_config()
    data = config["data"]
    assert (data["eval_crop_fraction"], data["eval_interpolation"]) == (1.0, "bilinear")
    assert (tuple(data["mean"]), tuple(data["std"])) == ((0.485, 0.456, 0.406),
                                                         (0.229, 0.224, 0.225))
    assert data["tokenizer"] == "builtin:bert_base_uncased"
    # a text table too small for BERT's 30,522 ids names no tokenizer (--tokenizer is needed)
    assert "tokenizer" not in _imported_clip(320).run_config()["data"]
    # crate_jax.load's preprocessing follows the record: short side bilinear, no margin cut
    config = ml_collections.ConfigDict(json.loads(json.dumps(config)))
    loaded = Loaded(model=None, config=config, task=tasks.get("contrastive")(config))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), np.uint8))
    want = np.asarray(image.resize((46, 28), Image.BILINEAR).crop((9, 0, 37, 28)))
    np.testing.assert_array_equal(loaded.pixels([image])[0], want)
    x = np.asarray(loaded.task.preprocess({"image": jnp.full((1, 2, 2, 3), 255, jnp.uint8)}))
    np.testing.assert_allclose(x[0, 0, 0], (1 - np.array(data["mean"])) / np.array(data["std"]),
                               rtol=1e-6)
