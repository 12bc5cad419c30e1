"""Tokenizers for the language tasks, with the ids they need (eos, pad, [CLS], [MASK]).

`load_tokenizer(spec)` takes: 'bytes' (the built-in byte-level tokenizer: 256 bytes + pad, bos,
eos, mask; nothing to download), a BERT vocab.txt (WordPiece, crate_jax/data/wordpiece.py), a
Hugging Face tokenizer.json, a GPT-2 BPE folder (vocab.json + merges.txt, or OpenAI's
encoder.json + vocab.bpe) or such a vocab.json, a SentencePiece .model, or 'builtin:NAME'
(crate_jax/data/assets). A missing file raises FileNotFoundError naming the setting and the path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from crate_jax.data.tokenizer import ByteTokenizer


class ByteLevelTokenizer(ByteTokenizer):
    """UTF-8 bytes as ids 4 … 259 (byte b is b + 4); pad 0, bos ([CLS]) 1, eos ([SEP]) 2,
    mask 3: 260 ids."""

    mask_id: int = 3
    offset: int = 4
    vocab_size: int = 256 + 4

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def decode(self, ids: Sequence[int]) -> str:
        return super().decode([i for i in ids if int(i) != self.mask_id])

    def __repr__(self) -> str:
        return "ByteLevelTokenizer()"


@dataclasses.dataclass
class TextTokenizer:
    """A tokenizer with the ids the language tasks need: eos ends every document, bos opens an
    MLM row ([CLS]; None: no [CLS]), mask is BERT's [MASK] (None: no masked LM)."""

    inner: Any
    spec: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    mask_id: int | None = None

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in (self.pad_id, self.eos_id, self.bos_id, self.mask_id)
                             if i is not None}))

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.inner.encode(text)]

    def encode_array(self, texts: Sequence[str]) -> list[np.ndarray]:
        """int32 ids of each text (batched where the tokenizer can)."""
        if hasattr(self.inner, "encode_array"):
            return [self.inner.encode_array(t) for t in texts]
        if hasattr(self.inner, "encode_batch"):
            return [np.asarray(ids, np.int32) for ids in self.inner.encode_batch(list(texts))]
        return [np.asarray(self.inner.encode(t), np.int32) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode([int(i) for i in ids])

    def token_text(self, token: int) -> str:
        """One token's text, for display (specials by name)."""
        names = {self.pad_id: "[PAD]", self.eos_id: "[EOS]", self.bos_id: "[BOS]",
                 self.mask_id: "[MASK]"}
        return names[token] if token in names else self.inner.decode([int(token)])


class _HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (BPE, tokenizer.json) behind encode / decode."""

    def __init__(self, tok, path: str):
        self.tok, self.path = tok, path

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def __getstate__(self) -> dict:
        return {"json": self.tok.to_str(), "path": self.path}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer
        self.tok, self.path = Tokenizer.from_str(state["json"]), state["path"]


def _first_id(tok, names: Sequence[str]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    return None


def _hf_tokenizer(tok, spec: str, setting: str) -> TextTokenizer:
    eos = _first_id(tok, ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|eos|>"))
    if eos is None:
        raise ValueError(f"{setting}={spec!r}: the tokenizer has no end-of-document token "
                         "(<|endoftext|>, </s>, [SEP] or <eos>)")
    pad = _first_id(tok, ("<pad>", "[PAD]", "<|pad|>"))
    vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    return TextTokenizer(_HFTokenizer(tok, spec), spec, vocab, eos, eos if pad is None else pad,
                         _first_id(tok, ("[CLS]", "<s>", "<bos>")),
                         _first_id(tok, ("[MASK]", "<mask>")))


def _bpe_files(path: epath.Path) -> tuple[epath.Path, epath.Path] | None:
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (path / vocab).exists() and (path / merges).exists():
            return path / vocab, path / merges
    return None


def _bpe(vocab: epath.Path, merges: epath.Path, spec: str, setting: str) -> TextTokenizer:
    """GPT-2's byte-level BPE from its vocabulary and merges files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _hf_tokenizer(tok, spec, setting)


def _wordpiece(path: str, spec: str) -> TextTokenizer:
    from crate_jax.data.wordpiece import WordPieceTokenizer
    wp = WordPieceTokenizer(path, sep_to_pad=False)  # [SEP] ends a document, [PAD] pads
    return TextTokenizer(wp, spec, wp.vocab_size, wp.sep_id, wp.pad_id, wp.bos_id,
                         wp._tok.token_to_id("[MASK]"))


def _from_file(path: epath.Path, spec: str, setting: str) -> TextTokenizer:
    name = str(path)
    if path.is_dir():
        if (path / "vocab.txt").exists():
            return _wordpiece(str(path / "vocab.txt"), spec)
        if (path / "tokenizer.json").exists():
            return _from_file(path / "tokenizer.json", spec, setting)
        files = _bpe_files(path)
        if files is None:
            raise FileNotFoundError(f"{setting}={spec!r}: the folder holds no vocab.txt, "
                                    "tokenizer.json, vocab.json + merges.txt or encoder.json + "
                                    "vocab.bpe")
        return _bpe(*files, spec, setting)
    if name.endswith(".txt"):
        return _wordpiece(name, spec)
    if name.endswith(".model"):
        from crate_jax.data.tokenizer import SentencePieceTokenizer
        sp = SentencePieceTokenizer(name, lowercase=False)
        return TextTokenizer(sp, spec, sp.vocab_size, sp.eot_id, sp.pad_id, sp.bos_id, None)
    if name.endswith(".json"):
        data = json.loads(path.read_text())
        if "model" not in data:  # a GPT-2 vocab.json: the merges lie next to it
            merges = path.parent / "merges.txt"
            if not merges.exists():
                raise FileNotFoundError(f"{setting}={spec!r}: a BPE vocabulary needs its "
                                        f"merges file, {merges} does not exist")
            return _bpe(path, merges, spec, setting)
        if data["model"].get("type") == "WordPiece":
            return _wordpiece(name, spec)
        from tokenizers import Tokenizer
        return _hf_tokenizer(Tokenizer.from_str(json.dumps(data)), spec, setting)
    raise ValueError(f"{setting}={spec!r}: expected 'bytes', 'builtin:NAME', a vocab.txt, a "
                     "tokenizer.json, a BPE folder or vocab.json, or a SentencePiece .model")


def load_tokenizer(spec: str | None, *, setting: str = "data.tokenizer") -> TextTokenizer:
    """The tokenizer `spec` names (module docstring). A missing file raises
    FileNotFoundError naming `setting` and the path."""
    if spec is None or spec == "bytes":
        inner = ByteLevelTokenizer()
        return TextTokenizer(inner, "bytes", inner.vocab_size, inner.eot_id, inner.pad_id,
                             inner.bos_id, inner.mask_id)
    spec = str(spec)
    path_name = spec
    if spec.startswith("builtin:"):
        assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
        found = [os.path.join(assets, spec[8:] + s) for s in (".txt", ".model")
                 if os.path.isfile(os.path.join(assets, spec[8:] + s))]
        if not found:
            raise FileNotFoundError(f"{setting}={spec!r}: no {spec[8:]}.txt or .model in "
                                    f"{assets}")
        path_name = found[0]
    path = epath.Path(path_name)
    if not path.exists():
        raise FileNotFoundError(f"{setting}={spec!r}: {path_name} does not exist")
    return _from_file(path, spec, setting)
