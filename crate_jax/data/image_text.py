"""Image-text input for contrastive training, and the evaluation sets of its evaluators.

Training sources (config.data.source):
    synthetic_captions  the procedurally generated shapes + captions set (random access, grain)
    webdataset          img2dataset tar shards, data.shards = '/data/datacomp/{00000..12799}.tar'
                        (local or gs://), read by a resumable WebDatasetReader (data.interleave
                        shards at once, data.shuffle_buffer samples / data.shuffle_buffer_bytes),
                        decoded on data.num_workers threads while the next samples are read
                        (crate_jax.data.wds.batches); with data.worker_processes = P > 0, in P
                        worker processes, each that pipeline over its own shards with 1/P of
                        the buffer bounds (crate_jax.data.wds.processes)
    array_record        those shards converted to ArrayRecord (crate_jax.data.wds.to_array_record),
                        data.paths = '/data/cc12m_ar/*.array_record': the grain path, the whole
                        set shuffled every epoch
Every batch is {'image': uint8 (B, S, S, 3), 'tokens': int32 (B, k)}: images at the training
resolution (CLIPA's low resolution comes from a DCT-scaled JPEG decode), captions tokenized to
data.context_length and reduced to data.text_tokens tokens (truncate / random / block).
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any

import numpy as np

from crate_jax.data import tokenizer as tokenizers


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: str | None) -> tokenizers.Tokenizer:
    if spec and spec.startswith("builtin:"):
        # Tokenizers that ship with the package: crate_jax/data/assets/NAME.model (SentencePiece)
        # or NAME.txt (a BERT vocab.txt)
        from importlib import resources
        assets = resources.files("crate_jax.data").joinpath("assets")
        found = [assets.joinpath(spec[8:] + s) for s in (".model", ".txt")
                 if assets.joinpath(spec[8:] + s).is_file()]
        if not found:
            raise FileNotFoundError(f"tokenizer {spec!r}: no {spec[8:]}.model or "
                                    f"{spec[8:]}.txt in crate_jax/data/assets")
        spec = str(found[0])
    return tokenizers.load(spec)


def tokenizer_for(data: Any) -> tokenizers.Tokenizer:
    spec = data.get("tokenizer")
    if not spec:
        if data.source != "synthetic_captions":
            raise ValueError("data.tokenizer: set a tokenizer file (a BERT vocab.txt, a "
                             "Hugging Face tokenizer.json, or a SentencePiece .model: train "
                             "one with `python -m crate_jax.data.tokenizer train ...`) or "
                             "'bytes'")
        spec = "bytes"
    return _load_tokenizer(spec)


def text_tokens(data: Any, captions: list[str], rng: np.random.Generator | None) -> np.ndarray:
    """Tokenize to context_length, then reduce to data.text_tokens (CLIPA text reduction)."""
    return _TextTokens(data)(captions, rng)


class _TextTokens:
    """text_tokens with the config read once (it runs per sample, on the decode threads)."""

    def __init__(self, data: Any):
        self.tok = tokenizer_for(data)
        self.length = data.context_length
        self.k = data.get("text_tokens") or data.context_length
        self.method = data.get("text_reduction", "truncate")

    def __call__(self, captions: list[str], rng: np.random.Generator | None) -> np.ndarray:
        if self.k >= self.length or self.method == "truncate":
            # truncating to k is tokenizing to k: the first k - 1 (- bos) content tokens, eot
            return tokenizers.tokenize(self.tok, captions, min(self.k, self.length))
        return self._reduce(tokenizers.tokenize(self.tok, captions, self.length), rng)

    def _reduce(self, tokens: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        tok = self.tok
        return tokenizers.reduce_tokens(tokens, self.k, method=self.method, rng=rng,
                                        pad_id=tok.pad_id, eot_id=tok.eot_id,
                                        bos_id=tok.bos_id if tok.add_bos else None)

    def many(self, captions: list[str], rngs: list[np.random.Generator]) -> list[np.ndarray]:
        """One row per caption, caption i reduced with rngs[i]: as calling this on each."""
        if not captions:
            return []
        if self.k >= self.length or self.method == "truncate":
            return list(self(captions, None))
        tokens = tokenizers.tokenize(self.tok, captions, self.length)
        return [self._reduce(row[None], rng)[0] for row, rng in zip(tokens, rngs, strict=True)]


def _synthetic(data: Any, split: str, num_examples: int | None = None,
               holdout_pairs: int | None = None):
    from crate_jax.data.synthetic import ShapesCaptions
    if holdout_pairs is None:
        holdout_pairs = data.get("holdout_pairs", 0)
    return ShapesCaptions(split, num_examples=num_examples, image_size=data.image_size,
                          seed=data.get("seed", 0), holdout_pairs=holdout_pairs)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def train_iterator(data: Any, *, batch_size: int, seed: int):
    if data.source == "synthetic_captions":
        from crate_jax.data import pipeline  # grain, and with it JAX: not in a worker process
        source = _synthetic(data, "train", data.get("num_train_examples"))

        def transform(example, rng):
            image = example["image"]
            if rng.random() < 0.5 and data.get("flip", False):
                image = image[:, ::-1]
            return {"image": np.ascontiguousarray(image),
                    "tokens": text_tokens(data, [example["caption"]], rng)[0]}

        return pipeline.train_iterator(source, batch_size=batch_size, seed=seed,
                                       transform=transform,
                                       num_workers=data.get("num_workers", 0))
    if data.source == "webdataset":
        if not data.get("shards"):
            raise ValueError("data.shards: set the tar shards, e.g. "
                             "--config.data.shards='/data/datacomp/{00000..12799}.tar'")
        import jax

        processes = data.get("worker_processes", 0)
        if not processes:
            return webdataset_batches(data=data, batch_size=batch_size, seed=seed,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
        return _worker_processes(data, processes, batch_size, seed)
    if data.source == "array_record":
        return _array_record_iterator(data, batch_size, seed)
    raise ValueError(f"data.source: {data.source!r}; use 'synthetic_captions', 'webdataset' or "
                     "'array_record'")


def _array_record_iterator(data: Any, batch_size: int, seed: int):
    """Pairs converted to ArrayRecord (wds.to_array_record) on the grain path: the whole set
    shuffled every epoch, each pair cropped and tokenized with grain's per-example RNG."""
    from crate_jax.data import pipeline
    from crate_jax.data.decode import random_resized_crop
    from crate_jax.data.wds.to_array_record import Records

    source = Records(data.get("paths"))
    tokens = _TextTokens(data)
    size, flip = data.image_size, data.get("flip", False)
    area = tuple(data.get("crop_area", (0.4, 1.0)))

    def transform(example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # the converter kept only images that decode: a failure here is a real error
        image = random_resized_crop(example["image"], rng, size, area=area, flip=flip)
        return {"image": image, "tokens": tokens([example["caption"]], rng)[0]}

    return pipeline.train_iterator(source, batch_size=batch_size, seed=seed,
                                   transform=transform, num_workers=data.get("num_workers", 0))


def webdataset_batches(*, data: Any, batch_size: int, seed: int, process_index: int,
                       process_count: int, share: int = 1):
    """The webdataset pipeline of one process: its reader (1/`share` of the shuffle buffer
    bound: a worker process's part of its host's) and `OrderedBatches` of decoded pairs on
    data.num_workers threads."""
    from crate_jax.data.wds.batches import OrderedBatches
    from crate_jax.data.wds.reader import WebDatasetReader
    if isinstance(data, dict):  # sent to a worker process as a plain dict
        import ml_collections
        data = ml_collections.ConfigDict(data)
    # Images are checked by the decode in _DecodePair, not decoded twice.
    reader = WebDatasetReader(data.shards, seed=seed, process_index=process_index,
                              process_count=process_count,
                              shuffle_buffer=data.get("shuffle_buffer", 0) // share,
                              shuffle_buffer_bytes=data.get("shuffle_buffer_bytes", 0) // share,
                              interleave=data.get("interleave", 1),
                              max_bad_fraction=data.get("max_bad_fraction", 0.5),
                              verify_images=False)
    # The decode threads are the parallelism; the tokenizer's own thread pool on top of
    # them only adds hand-overs (a user's explicit setting wins).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return OrderedBatches(reader, _DecodePair(data, seed), batch_size=batch_size,
                          threads=data.get("num_workers", 8))


def _worker_processes(data: Any, processes: int, batch_size: int, seed: int):
    """`webdataset_batches` in data.worker_processes worker processes (wds.processes)."""
    import jax

    from crate_jax.data.wds import shards
    from crate_jax.data.wds.processes import ProcessBatches
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
        raise ValueError(f"config data.worker_processes={processes!r}: must be a whole "
                         "number >= 0 (0: decode threads in the training process)")
    hosts, found = jax.process_count(), len(shards.shard_list(data.shards))
    if found < hosts * processes:
        raise ValueError(
            f"config data.worker_processes={processes}: {found} shards for {hosts} host(s) x "
            f"{processes} worker processes; each worker reads shards of its own, so there "
            f"must be at least {hosts * processes}: lower data.worker_processes")
    tokenizer_for(data)  # a missing tokenizer file fails here, named, not in every worker
    kwargs = dict(data=data.to_dict(), batch_size=batch_size, seed=seed, share=processes)
    return ProcessBatches("crate_jax.data.image_text:webdataset_batches", kwargs,
                          processes=processes, process_index=jax.process_index(),
                          process_count=hosts)


class _DecodePair:
    """The training pair of a webdataset sample (decode + crop + flip, tokens), or None when
    the image does not decode (counted as bad). `many` does a chunk of samples with one
    tokenizer call; it gives what calling this on each sample gives."""

    def __init__(self, data: Any, seed: int):
        self.seed, self.size, self.flip = seed, data.image_size, data.get("flip", False)
        self.area = tuple(data.get("crop_area", (0.4, 1.0)))
        self.tokens = _TextTokens(data)

    def _image(self, sample: dict) -> tuple[np.ndarray | None, np.random.Generator]:
        from crate_jax.data.decode import random_resized_crop
        # The sample's own RNG: the same crop whatever thread decodes it, and after a resume;
        # a new one every epoch.
        rng = np.random.default_rng([self.seed, sample["epoch"],
                                     zlib.crc32(sample["shard"].encode()), sample["index"]])
        try:
            return random_resized_crop(sample["image"], rng, self.size, area=self.area,
                                       flip=self.flip), rng
        except (OSError, ValueError, SyntaxError):  # what the decoders raise for corrupt data
            return None, rng

    def __call__(self, sample: dict) -> dict[str, np.ndarray] | None:
        return self.many([sample])[0]

    def many(self, samples: list[dict]) -> list[dict[str, np.ndarray] | None]:
        images = [self._image(sample) for sample in samples]
        good = [(s, rng) for s, (image, rng) in zip(samples, images, strict=True)
                if image is not None]
        tokens = iter(self.tokens.many([s["caption"] for s, _ in good], [r for _, r in good]))
        return [None if image is None else {"image": image, "tokens": next(tokens)}
                for image, _ in images]


# --- evaluation sets -----------------------------------------------------------------------

def class_names(spec: Any) -> tuple[list[str], list[int] | None]:
    """Class names for a zero-shot spec (the synthetic shapes' own, or spec.class_names = a
    file, one per line), and the subset of classes scored (None: all). ImageNet's curated
    names are the evaluators' (crate_jax.evals.zeroshot)."""
    if spec.source == "synthetic_captions":
        from crate_jax.data.synthetic import ShapesCaptions
        probe = ShapesCaptions("train", num_examples=1, holdout_pairs=spec.get("holdout_pairs",
                                                                               0),
                               seed=spec.get("seed", 0))
        subset = probe.heldout_class_ids if spec.get("heldout_only", False) else None
        return list(probe.class_names), subset
    if spec.get("class_names"):
        with open(spec.class_names, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()], None
    raise ValueError(f"evals: no class names for {spec.get('name') or spec.source!r}; "
                     "give class_names=FILE")


def eval_source(spec: Any, data: Any, split: str):
    """The spec's random-access source for `split`, cut to spec.num_examples for TFDS sets
    (the synthetic sets are generated at that size)."""
    if spec.source == "synthetic_captions":
        return _synthetic(data, split, spec.get("num_examples"), spec.get("holdout_pairs"))
    if spec.source == "tfds":
        import ml_collections

        from crate_jax.data import pipeline
        from crate_jax.data.images import image_source
        tfds_cfg = ml_collections.ConfigDict(dict(source="tfds", name=spec.name,
                                                  data_dir=spec.get("data_dir")))
        source = image_source(tfds_cfg, split)
        num = spec.get("num_examples")
        return pipeline.first_examples(source, num) if num else source
    raise ValueError(f"evals source {spec.source!r}: use 'synthetic_captions' or 'tfds'")


def captions_per_image(spec: Any) -> int:
    """K, the captions of each image a retrieval spec uses: spec.captions_per_image, else 5
    for TFDS sets (COCO's and Flickr30k's protocol) and 1 for the synthetic ones."""
    k = spec.get("captions_per_image") or (1 if spec.source == "synthetic_captions" else 5)
    if int(k) < 1:
        raise ValueError(f"evals captions_per_image={k!r}: must be at least 1")
    return int(k)


def _captions(example: dict) -> list[str]:
    if "caption" in example:  # the synthetic sets: one caption
        return [example["caption"]]
    return [t.decode() if isinstance(t, bytes) else str(t) for t in example["captions"]["text"]]


def eval_batches_factory(spec: Any, data: Any, batch_size: int, split: str | None = None, *,
                         default_crop: float = 1.0):
    """A function returning a fresh pass of padded, masked eval batches for this spec: images
    resized and centre-cropped by the run's data.eval_crop_fraction (default `default_crop`)
    and data.eval_interpolation; for retrieval, one row per image with its first K captions
    ('tokens' (K, L), 'caption_mask' (K,))."""
    from crate_jax.data import pipeline
    from crate_jax.data.images import eval_resize_settings, resize_center_crop, to_pil
    split = split or spec.get("split", "test")
    source = eval_source(spec, data, split)
    size = data.image_size
    crop, interpolation = eval_resize_settings(data, default_crop)
    k = captions_per_image(spec) if spec.kind == "retrieval" else 0

    generated = spec.source == "synthetic_captions"  # made at the size: nothing to resize

    def transform(example: dict) -> dict:
        image = example["image"]
        if not generated or np.asarray(image).shape[:2] != (size, size):
            # every stored image, even one already at the size (torchvision's Resize + Crop
            # would change one at crop fraction < 1 too)
            image = np.asarray(resize_center_crop(to_pil(image), size, crop, interpolation))
        out = {"image": np.asarray(image, np.uint8),
               "label": np.int32(example.get("label", 0))}
        if k:
            captions = _captions(example)[:k]
            tokens = np.zeros((k, data.context_length), np.int32)
            tokens[:len(captions)] = tokenizers.tokenize(tokenizer_for(data), captions,
                                                         data.context_length)
            out["tokens"] = tokens
            out["caption_mask"] = (np.arange(k) < len(captions)).astype(np.float32)
        return out

    return lambda: pipeline.eval_batches(source, batch_size=batch_size, transform=transform)
