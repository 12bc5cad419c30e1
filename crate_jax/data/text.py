"""Language-model data: tokenizers, token streams and the packed rows grain reads.

Packing. The documents of a split (crate_jax/data/text_sources.py) are tokenized and joined,
each followed by the EOS id, into one token stream s₀ s₁ … s_{n−1}; rows are fixed windows of
it, computed from the row index alone, so a row source is random access (len, getitem) and
grain's shuffle and `pipeline.TrainIterator`'s exact resume apply unchanged.

    causal ('lm'), seq_len L:  row i = s[iL : iL + L + 1]        inputs row[:-1], targets row[1:]
                               consecutive rows overlap by one token, so every pair
                               (s_j → s_{j+1}) is trained, and scored, exactly once; rows =
                               ⌊(n − 1)/L⌋ (training drops the partial tail; evaluation keeps it,
                               padded, with per-target `weights` 0 on the padding)
    masked ('mlm'), seq_len L: row i = [CLS] s[iC : iC + C] [SEP] with C = L − 2 (L − 1 without a
                               [CLS] id): documents packed across rows as RoBERTa's
                               FULL-SENTENCES, no next-sentence task

Attention is not cut at document boundaries inside a row (GPT-2 / nanoGPT do the same).

Tokenizers: crate_jax/data/text_tokenizers.py (`load_tokenizer`, re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from crate_jax.data import text_sources
from crate_jax.data.text_tokenizers import ByteLevelTokenizer, TextTokenizer, load_tokenizer

__all__ = [
    "ArrayStream", "ByteLevelTokenizer", "ConcatStream", "LMRows", "MLMRows", "TextTokenizer",
    "TokenStream", "load_tokenizer", "open_stream", "token_counts", "unigram_perplexity",
]


# --- token streams -----------------------------------------------------------------------------

class TokenStream(Protocol):
    def __len__(self) -> int: ...
    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArrayStream:
    """A token stream held in memory (int32)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.ascontiguousarray(tokens, np.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]


class ConcatStream:
    """Token streams one after the other (several token-stream ArrayRecord files)."""

    def __init__(self, parts: Sequence[TokenStream]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        out, at = [], start
        while at < stop:
            k = int(np.searchsorted(self.starts, at, side="right")) - 1
            end = min(stop, int(self.starts[k + 1]))
            out.append(self.parts[k].read(at - int(self.starts[k]), end - int(self.starts[k])))
            at = end
        return np.concatenate(out) if out else np.zeros(0, np.int32)


def _joined(docs: Sequence[np.ndarray], eos_id: int) -> ArrayStream:
    eos = np.asarray([eos_id], np.int32)
    return ArrayStream(np.concatenate([x for d in docs for x in (d, eos)]) if docs
                       else np.zeros(0, np.int32))


def _check_ids(tokens: np.ndarray, vocab_size: int, what: str, setting: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{setting}: {what} holds token ids outside [0, {vocab_size}) of "
                         f"the tokenizer (data.tokenizer)")


def _record_stream(files: list[str], tok: TextTokenizer, setting: str) -> TokenStream:
    metas = [text_sources.read_meta(f) for f in files]
    if all(m is None for m in metas):
        docs = [d for f in files for d in text_sources.read_document_records(f)]
        for f, d in zip(files, docs, strict=False):
            _check_ids(d, tok.vocab_size, f, setting)
        return _joined(docs, tok.eos_id)
    if any(m is None for m in metas):
        raise ValueError(f"{setting}: mixes token-stream and documents ArrayRecord files")
    for f, m in zip(files, metas, strict=True):
        if m["eos_id"] != tok.eos_id or m["vocab_size"] > tok.vocab_size:
            raise ValueError(f"{setting}: {f} was written with eos_id={m['eos_id']}, "
                             f"vocab_size={m['vocab_size']} (tokenizer {m['tokenizer']!r}), "
                             f"but data.tokenizer has eos_id={tok.eos_id}, vocab_size="
                             f"{tok.vocab_size}")
    return ConcatStream([text_sources.RecordStream(f, m) for f, m in zip(files, metas,
                                                                          strict=True)])


def _tfds_stream(spec: str, tok: TextTokenizer, data: Any, setting: str) -> TokenStream:
    """'tfds:NAME:SPLIT': a prepared TFDS dataset (ArrayRecord) whose examples hold token ids
    under data.tokens_key ('tokens') or a text under data.text_field; read into memory."""
    from crate_jax.data.tfds_source import open_data_source
    _, name, split = [*spec.split(":"), "train"][:3]
    source = open_data_source(name, split, data.get("data_dir"), setting="data")
    key, field = data.get("tokens_key", "tokens"), data.get("text_field", "text")
    docs = []
    for i in range(len(source)):
        example = source[i]
        if key in example:
            docs.append(np.asarray(example[key], np.int32))
        elif field in example:
            text = example[field]
            docs.append(tok.encode_array([text.decode() if isinstance(text, bytes)
                                          else str(text)])[0])
        else:
            raise ValueError(f"{setting}: TFDS {name} example {i} has neither "
                             f"{key!r} (data.tokens_key) nor {field!r} (data.text_field)")
    return _joined(docs, tok.eos_id)


def open_stream(spec: str, tok: TextTokenizer, data: Any, *, setting: str) -> TokenStream:
    """The token stream of a path setting (text_sources docstring), tokenized with `tok`.
    `data` is the config's data section (text_field, heldout_every, data_dir)."""
    if str(spec).startswith("tfds:"):
        return _tfds_stream(spec, tok, data, setting)
    files = text_sources.expand_paths(spec, setting,
                                      heldout_every=data.get("heldout_every", 10))
    records = [f for f in files if f.endswith(".array_record")]
    if records and len(records) != len(files):
        raise ValueError(f"{setting}: mixes .array_record and text files")
    if records:
        return _record_stream(records, tok, setting)
    texts = list(text_sources.read_documents(files, text_field=data.get("text_field", "text")))
    docs = [ids for start in range(0, len(texts), 256)
            for ids in tok.encode_array(texts[start:start + 256])]
    return _joined(docs, tok.eos_id)


# --- rows ---------------------------------------------------------------------------------------

class _Rows:
    """Random access to `num_rows` windows of a token stream (set by the subclass)."""

    stream: TokenStream
    num_rows: int

    def __len__(self) -> int:
        return self.num_rows

    def _window(self, index: int, stride: int, width: int) -> np.ndarray:
        """Tokens [index·stride, index·stride + width) of the stream, cut at its end."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} of {self.num_rows}")
        start = int(index) * stride
        return self.stream.read(start, min(start + width, len(self.stream)))


class LMRows(_Rows):
    """Causal rows (module docstring): {'tokens': int32 (L + 1,)}; with `tail`, the partial
    last row too and {'weights': float32 (L,)}, 0 on padded targets."""

    def __init__(self, stream: TokenStream, seq_len: int, *, pad_id: int, tail: bool = False):
        self.stream, self.seq_len, self.pad_id, self.tail = stream, seq_len, pad_id, tail
        n = len(stream)
        full, rest = divmod(max(n - 1, 0), seq_len)
        self.num_rows = full + (1 if tail and rest else 0)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        window = self._window(index, L, L + 1)
        tokens = np.full(L + 1, self.pad_id, np.int32)
        tokens[:len(window)] = window
        if not self.tail:
            return {"tokens": tokens}
        weights = (np.arange(L) < len(window) - 1).astype(np.float32)
        return {"tokens": tokens, "weights": weights}


class MLMRows(_Rows):
    """Masked-LM rows (module docstring): {'tokens': int32 (L,), 'attention_mask': int32 (L,),
    'index': int32}, before masking."""

    def __init__(self, stream: TokenStream, seq_len: int, *, tok: TextTokenizer,
                 tail: bool = False):
        self.stream, self.seq_len, self.tok = stream, seq_len, tok
        self.content = seq_len - 1 - (tok.bos_id is not None)
        full, rest = divmod(len(stream), self.content)
        self.num_rows = full + (1 if tail and rest else 0)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        body = self._window(index, self.content, self.content)
        head = [] if self.tok.bos_id is None else [self.tok.bos_id]
        ids = np.concatenate([np.asarray(head, np.int32), body,
                              np.asarray([self.tok.eos_id], np.int32)])
        tokens = np.full(self.seq_len, self.tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        mask = (np.arange(self.seq_len) < len(ids)).astype(np.int32)
        return {"tokens": tokens, "attention_mask": mask, "index": np.int32(index)}


def token_counts(stream: TokenStream, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
    """How often each id occurs in the stream (int64, (vocab_size,))."""
    counts = np.zeros(vocab_size, np.int64)
    for start in range(0, len(stream), chunk):
        counts += np.bincount(stream.read(start, min(start + chunk, len(stream))),
                              minlength=vocab_size)[:vocab_size]
    return counts


def unigram_perplexity(train: TokenStream, heldout: TokenStream, vocab_size: int) -> float:
    """exp(−(1/M)·Σ_j log p(s_j)) over the held-out targets s₁ … s_{n−1} (the tokens the LM
    evaluation scores), with the add-one-smoothed unigram p(t) = (c_t + 1)/(N + V) of the
    training split's counts c."""
    counts = token_counts(train, vocab_size)
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    held = token_counts(heldout, vocab_size)
    if len(heldout):
        held[int(heldout.read(0, 1)[0])] -= 1  # s₀ is never a target
    return float(np.exp(-(held * log_p).sum() / max(held.sum(), 1)))
