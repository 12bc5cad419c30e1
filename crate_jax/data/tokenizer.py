"""Text tokenizers for the CLIPA text tower: a byte-level fallback, trainable SentencePiece, and
BERT WordPiece (crate_jax/data/wordpiece.py, the vocabulary of the released CLIPA models).

`load(spec)` returns a `Tokenizer`, chosen by the file given: `None` or `'bytes'` gives
`ByteTokenizer` (no file needed), a path ending in `.model` gives `SentencePieceTokenizer`, one
ending in `.txt` (a BERT vocab.txt) or `.json` (a Hugging Face tokenizer.json) gives
`WordPieceTokenizer`; files may be local or `gs://` (read with etils.epath). `tokenize` turns
texts into fixed-length int32 rows `[bos] + ids + [eot] + pad` (bos when the tokenizer's
`add_bos` says so: [CLS] for WordPiece),
and `reduce_tokens` implements CLIPA's text-token reduction (truncate / random / block) on such
rows. `train_sentencepiece` (crate_jax/data/tokenizer_training.py, re-exported here with
`iter_captions`; also the CLI) trains a subword model on caption files:

    python -m crate_jax.data.tokenizer train --corpus captions.txt --out /tmp/sp --vocab-size 8000
    python -m crate_jax.data.tokenizer encode --model /tmp/sp.model "a photo of a red circle"

Nothing is downloaded: models are trained here or loaded from a path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from etils import epath

from crate_jax.data.tokenizer_training import iter_captions, train_sentencepiece


@runtime_checkable
class Tokenizer(Protocol):
    """What the text tower and the input pipeline need from a tokenizer."""

    vocab_size: int
    pad_id: int
    eot_id: int
    bos_id: int | None
    add_bos: bool  # whether `tokenize` starts each row with bos_id by default

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos / eot / padding."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad / eot / bos ids are ignored."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte b is id b + 3; pad 0, bos 1, eot 2; 259 ids in all."""

    pad_id: int = 0
    bos_id: int | None = 1
    eot_id: int = 2
    add_bos: bool = False
    offset: int = 3
    vocab_size: int = 256 + 3

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`, shifted past the special ids."""
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (invalid UTF-8 is replaced); special ids are skipped."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id, self.eot_id):
                continue
            if not self.offset <= i < self.vocab_size:
                raise ValueError(f"ByteTokenizer: id {i} is outside [0, {self.vocab_size})")
            out.append(i - self.offset)
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece model read from `model_file` (any etils.epath path, e.g. gs://).

    The pad / bos / eot ids are those of the model (eot is its eos; bos is None if the model
    has none). With `lowercase`, text is lowercased before encoding. Pickles as the serialized
    model, so it can be shipped to data-loader worker processes.
    """

    add_bos = False

    def __init__(self, model_file: str, *, lowercase: bool = True):
        path = epath.Path(model_file)
        if not path.exists():
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.model_file = str(model_file)
        self.lowercase = lowercase
        self._setup(path.read_bytes())

    def _setup(self, proto: bytes) -> None:
        import sentencepiece as spm

        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size: int = int(self._sp.get_piece_size())
        pad, bos, eos = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        if pad < 0 or eos < 0:
            raise ValueError(f"SentencePiece model {self.model_file} must define pad and eos "
                             f"ids (got pad_id={pad}, eos_id={eos}); train_sentencepiece does")
        self.pad_id: int = int(pad)
        self.eot_id: int = int(eos)
        self.bos_id: int | None = int(bos) if bos >= 0 else None
        self._special = {i for i in (self.pad_id, self.eot_id, self.bos_id) if i is not None}

    def encode(self, text: str) -> list[int]:
        """Subword ids of `text` (lowercased first if `lowercase`)."""
        if self.lowercase:
            text = text.lower()
        return list(self._sp.encode(text, out_type=int))

    def pieces(self, text: str) -> list[str]:
        """Subword pieces of `text`, for inspection."""
        if self.lowercase:
            text = text.lower()
        return list(self._sp.encode(text, out_type=str))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping pad / eot / bos."""
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special])

    def __getstate__(self) -> dict[str, Any]:
        return {"model_file": self.model_file, "lowercase": self.lowercase, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_file = state["model_file"]
        self.lowercase = state["lowercase"]
        self._setup(state["proto"])

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer({self.model_file!r}, lowercase={self.lowercase}, "
                f"vocab_size={self.vocab_size})")


def load(spec: str | None) -> Tokenizer:
    """`None` / `'bytes'` -> ByteTokenizer; a `.model` file -> SentencePieceTokenizer; a
    `.txt` (BERT vocab.txt) or `.json` (Hugging Face tokenizer.json) -> WordPieceTokenizer."""
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    name = str(spec) if isinstance(spec, str | os.PathLike) else ""
    if name.endswith((".model", ".txt", ".json")):
        if not epath.Path(name).exists():
            raise FileNotFoundError(f"tokenizer file not found: {name}")
        if name.endswith(".model"):
            return SentencePieceTokenizer(name)
        from crate_jax.data.wordpiece import WordPieceTokenizer
        return WordPieceTokenizer(name)
    raise ValueError(f"unknown tokenizer spec {spec!r}: expected None, 'bytes', a SentencePiece "
                     "'.model', a BERT 'vocab.txt' or a Hugging Face 'tokenizer.json'")


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], context_length: int, *,
             add_bos: bool | None = None) -> np.ndarray:
    """int32 (len(texts), context_length) rows of `[bos] + ids + [eot]`, right-padded.

    Over-long texts lose content from the end; the eot is always kept as the last real token.
    `add_bos` defaults to the tokenizer's own `add_bos`.
    """
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos", False))
    if isinstance(texts, str):
        raise TypeError("tokenize: `texts` must be a sequence of strings, not one string")
    if add_bos and tokenizer.bos_id is None:
        raise ValueError(f"tokenize: add_bos=True but {tokenizer!r} has no bos id")
    prefix = [tokenizer.bos_id] if add_bos else []
    room = context_length - len(prefix) - 1
    if room < 0:
        raise ValueError(f"tokenize: context_length={context_length} leaves no room for "
                         f"{'bos and ' if add_bos else ''}eot")
    out = np.full((len(texts), context_length), tokenizer.pad_id, dtype=np.int32)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = (encode_batch(list(texts)) if encode_batch is not None and len(texts) > 1
               else [tokenizer.encode(text) for text in texts])
    for row, content in zip(out, encoded, strict=True):
        ids = [*prefix, *content[:room], tokenizer.eot_id]
        row[: len(ids)] = ids
    return out


REDUCE_METHODS: tuple[str, ...] = ("truncate", "random", "block")


def reduce_tokens(tokens: np.ndarray, k: int, *, method: str, rng: np.random.Generator | None,
                  pad_id: int, eot_id: int, bos_id: int | None = None) -> np.ndarray:
    """CLIPA text-token reduction of `tokenize` rows to `k` tokens each, int32 (n, k).

    The content of a row is everything before its first eot. Rows whose content fits in k - 1
    tokens are kept as they are; longer ones become k - 1 content tokens then the eot:
    'truncate' keeps the first ones, 'random' a uniformly random subset in order, 'block' a
    random contiguous run. `rng` is required for 'random' and 'block'. With `bos_id`, rows
    must start with it and it stays in front (the content budget is then k - 2).
    """
    tokens = np.asarray(tokens)
    n_content = _content_lengths(tokens, k, method=method, rng=rng, eot_id=eot_id,
                                 bos_id=bos_id)
    prefix = 0 if bos_id is None else 1
    budget = k - 1 - prefix

    out = np.full((tokens.shape[0], k), pad_id, dtype=np.int32)
    short = n_content <= budget
    out[short] = tokens[short, :k]
    long_rows = np.flatnonzero(~short)
    if long_rows.size == 0:
        return out
    idx = _kept_positions(method, rng, n_content[long_rows], budget, tokens.shape[1] - prefix)
    picked = np.take_along_axis(tokens[long_rows], idx + prefix, axis=1)
    if prefix:
        out[long_rows, 0] = bos_id
    out[long_rows, prefix:k - 1] = picked
    out[long_rows, k - 1] = eot_id
    return out


def _content_lengths(tokens: np.ndarray, k: int, *, method: str,
                     rng: np.random.Generator | None, eot_id: int,
                     bos_id: int | None) -> np.ndarray:
    """The number of content tokens (after any bos, before the first eot) of each row, once
    the arguments of `reduce_tokens` are checked."""
    if method not in REDUCE_METHODS:
        raise ValueError(f"reduce_tokens: unknown method {method!r}; expected one of "
                         f"{REDUCE_METHODS}")
    if method != "truncate" and rng is None:
        raise ValueError(f"reduce_tokens: method {method!r} needs an rng")
    if tokens.ndim != 2:
        raise ValueError(f"reduce_tokens: expected (n, length) tokens, got shape {tokens.shape}")
    length = tokens.shape[1]
    prefix = 0 if bos_id is None else 1
    if not prefix + 1 <= k <= length:
        raise ValueError(f"reduce_tokens: k={k} must be in [{prefix + 1}, {length}] "
                         f"(the context length)")
    is_eot = tokens == eot_id
    if not is_eot.any(axis=1).all():
        bad = int(np.flatnonzero(~is_eot.any(axis=1))[0])
        raise ValueError(f"reduce_tokens: row {bad} has no eot ({eot_id}); expected rows "
                         f"from tokenize()")
    if prefix and not (tokens[:, 0] == bos_id).all():
        raise ValueError(f"reduce_tokens: bos_id={bos_id} given but not every row starts "
                         f"with it")
    return is_eot.argmax(axis=1) - prefix


def _kept_positions(method: str, rng: np.random.Generator | None, lens: np.ndarray,
                    budget: int, width: int) -> np.ndarray:
    """(rows, budget) content positions, in order, that `method` keeps of rows with `lens`
    (each > budget) content tokens out of `width` positions."""
    steps = np.arange(budget)
    if method == "truncate":
        return np.broadcast_to(steps, (lens.size, budget))
    assert rng is not None
    if method == "block":
        start = rng.integers(0, lens - budget + 1)  # inclusive of the last full block
        return start[:, None] + steps
    # The `budget` smallest of iid uniform keys over the valid positions form a uniformly
    # random subset; sorting the chosen positions keeps the original order.
    keys = rng.random((lens.size, width))
    keys[np.arange(width) >= lens[:, None]] = np.inf
    return np.sort(np.argsort(keys, axis=1, kind="stable")[:, :budget], axis=1)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crate_jax.data.tokenizer",
                                description="Train or try a SentencePiece caption tokenizer.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model on caption files")
    t.add_argument("--corpus", nargs="+", required=True, metavar="FILE",
                   help="caption files: .txt (one per line), .jsonl, or webdataset .tar")
    t.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model/.vocab")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--no-lowercase", dest="lowercase", action="store_false")
    t.add_argument("--max-sentences", type=int, default=2_000_000)
    t.add_argument("--character-coverage", type=float, default=0.9995)
    e = sub.add_parser("encode", help="print the token ids of texts")
    e.add_argument("--model", required=True, help="a .model path, or 'bytes'")
    e.add_argument("texts", nargs="+")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (argument / file errors exit with 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        for name in args.corpus:
            if not epath.Path(name).exists():
                parser.error(f"corpus file not found: {name}")
        try:
            path = train_sentencepiece(args.corpus, args.out, vocab_size=args.vocab_size,
                                       model_type=args.model_type, lowercase=args.lowercase,
                                       character_coverage=args.character_coverage,
                                       max_sentences=args.max_sentences)
        except (ValueError, RuntimeError) as err:  # e.g. vocab too large for the corpus
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 1
        print(path)
        tok = SentencePieceTokenizer(path, lowercase=args.lowercase)
        examples = []
        for text in iter_captions(args.corpus):
            examples.append(text)
            if len(examples) == 3:
                break
        for text in examples:
            print(f"{text!r} -> {tok.pieces(text)} {tok.encode(text)}")
        return 0
    try:
        tok = load(args.model)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    for text in args.texts:
        print(" ".join(str(i) for i in tok.encode(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
