"""Training a SentencePiece caption tokenizer: the caption corpus reader (plain text, .jsonl,
webdataset .tar; unreadable records are logged and skipped) and `train_sentencepiece`, which
writes the `.model` that `crate_jax.data.tokenizer.SentencePieceTokenizer` loads. The command
line is `python -m crate_jax.data.tokenizer train`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence

from etils import epath

log = logging.getLogger(__name__)


def _clean(text: str) -> str:
    return " ".join(text.split())


def _jsonl_captions(lines: Iterable[str], name: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not valid JSON, skipped", name, n)
            continue
        if isinstance(obj, dict):
            text = obj.get("caption", obj.get("text"))
            if isinstance(text, str):
                yield text


def _tar_captions(path: epath.Path) -> Iterator[str]:
    with path.open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        members = iter(tar)
        while True:
            try:
                member = next(members, None)
            except (tarfile.TarError, OSError) as e:  # truncated / corrupt archive
                log.warning("%s: unreadable after this point (%s), rest skipped", path, e)
                return
            if member is None:
                return
            if not (member.isfile() and member.name.endswith(".txt")):
                continue
            try:
                data = tar.extractfile(member)
                text = data.read().decode("utf-8") if data is not None else None
            except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
                log.warning("%s: member %s unreadable (%s), skipped", path, member.name, e)
                continue
            if text is not None:
                yield text


def _file_captions(name: str) -> Iterator[str]:
    path = epath.Path(name)
    if path.name.endswith((".tar", ".tar.gz", ".tgz")):
        yield from _tar_captions(path)
        return
    with path.open("r", encoding="utf-8") as f:
        if path.name.endswith(".jsonl"):
            yield from _jsonl_captions(f, name)
        else:
            yield from f


def iter_captions(corpus_files: Sequence[str]) -> Iterator[str]:
    """Captions of the corpus files: plain text (one per line), .jsonl, or webdataset .tar."""
    for name in corpus_files:
        for text in _file_captions(name):
            text = _clean(text)
            if text:
                yield text


def train_sentencepiece(corpus_files: Sequence[str], model_prefix: str, *, vocab_size: int = 8000,
                        model_type: str = "bpe", lowercase: bool = True,
                        character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000) -> str:
    """Trains a SentencePiece model on caption files; returns the path of the `.model` file.

    The model has pad=0, bos=1, eos(=eot)=2, unk=3. At most `max_sentences` captions, sampled
    at random, are used. With `lowercase` the model case-folds (nmt_nfkc_cf normalization).
    `model_prefix` may be remote (gs://): the model is trained locally and copied there.
    SentencePiece raises RuntimeError when the corpus cannot support `vocab_size`.
    """
    import sentencepiece as spm

    if isinstance(corpus_files, str):
        corpus_files = [corpus_files]
    if not corpus_files:
        raise ValueError("train_sentencepiece: no corpus files")
    for name in corpus_files:
        if not epath.Path(name).exists():
            raise FileNotFoundError(f"corpus file not found: {name}")
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise ValueError(f"train_sentencepiece: unknown model_type {model_type!r}")
    sentences = iter_captions(corpus_files)
    first = next(sentences, None)
    if first is None:
        raise ValueError(f"train_sentencepiece: no captions in {list(corpus_files)}")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    remote = "://" in str(model_prefix)
    with tempfile.TemporaryDirectory() as tmp:
        local_prefix = os.path.join(tmp, "sp") if remote else str(model_prefix)
        if not remote:
            os.makedirs(os.path.dirname(os.path.abspath(local_prefix)), exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_prefix=local_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            minloglevel=2,
        )
        if remote:
            for ext in (".model", ".vocab"):
                dst = epath.Path(f"{model_prefix}{ext}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(local_prefix + ext, "rb") as src, dst.open("wb") as out:
                    shutil.copyfileobj(src, out)
    return f"{model_prefix}.model"
