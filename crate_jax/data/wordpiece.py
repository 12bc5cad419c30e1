"""BERT WordPiece tokenizers (the vocabulary of the CRATE-α-CLIPA models), through Hugging Face
`tokenizers`.

Read from a BERT `vocab.txt` (one token a line, the line number is the id) or a Hugging Face
`tokenizer.json`, local or `gs://`. The text is processed as BERT's uncased tokenizer does it:
control characters dropped and whitespace normalised, spaces put around CJK ideographs,
lower-cased, accents stripped (NFD, combining marks removed), split on whitespace and
punctuation, then greedy longest-match-first word pieces (`##` continuations; a word with no
split, or over 100 characters, becomes [UNK]).

`crate_jax.data.tokenizer.tokenize` then builds the rows the CLIPA models were trained on:
[CLS] first (`add_bos`), at most context_length − 2 word pieces, the [SEP] that ends them, and
0-padding; with `sep_to_pad` (the default, as open_clip's CLIPA tokenizer does it) the [SEP]
id is replaced by 0, so `eot_id` is the pad id and a row is [CLS] + pieces + zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etils import epath

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _from_vocab_txt(text: str, *, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    for i, line in enumerate(text.splitlines()):
        token = line.rstrip("\r\n")
        if token and token not in vocab:  # a repeated line keeps its first id, as BERT does
            vocab[token] = i
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
        lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class WordPieceTokenizer:
    """A BERT WordPiece vocabulary from `path`: a `vocab.txt`, or a `tokenizer.json` (its own
    normaliser and pre-tokeniser are used; its post-processor is not, `tokenize` adds [CLS]).

    Ids come from the file: `vocab_size`, `pad_id` ([PAD]), `bos_id` ([CLS]) and `eot_id`
    ([SEP], or the pad id with `sep_to_pad`). Pickles as the tokenizer's JSON, so data-loader
    worker processes can use it.
    """

    add_bos = True

    def __init__(self, path: str, *, lowercase: bool = True, sep_to_pad: bool = True):
        file = epath.Path(path)
        if not file.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path, self.lowercase, self.sep_to_pad = str(path), lowercase, sep_to_pad
        text = file.read_text(encoding="utf-8")
        if str(path).endswith(".json"):
            from tokenizers import Tokenizer
            self._setup(Tokenizer.from_str(text).to_str())
        else:
            self._setup(_from_vocab_txt(text, lowercase=lowercase).to_str())

    def _setup(self, serialized: str) -> None:
        from tokenizers import Tokenizer

        self._json = serialized
        self._tok = Tokenizer.from_str(serialized)
        ids = {name: self._tok.token_to_id(name) for name in SPECIAL}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer {self.path}: no {', '.join(missing)} token; a BERT "
                             f"WordPiece vocabulary has {', '.join(SPECIAL)}")
        # the largest id + 1, not the count: a vocab.txt with a repeated line has a gap
        self.vocab_size: int = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.pad_id: int = int(ids["[PAD]"])
        self.bos_id: int | None = int(ids["[CLS]"])
        self.sep_id: int = int(ids["[SEP]"])
        self.unk_id: int = int(ids["[UNK]"])
        self.eot_id: int = self.pad_id if self.sep_to_pad else self.sep_id
        self._special = {self.pad_id, self.bos_id, self.sep_id}

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of `text`, without [CLS] / [SEP] / padding."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text in one call, with the GIL released (for decode threads)."""
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def pieces(self, text: str) -> list[str]:
        """The word pieces of `text`, for inspection."""
        return list(self._tok.encode(text, add_special_tokens=False).tokens)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (word pieces joined), skipping [PAD], [CLS] and [SEP]."""
        return self._tok.decode([int(i) for i in ids if int(i) not in self._special],
                                skip_special_tokens=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "lowercase": self.lowercase, "sep_to_pad": self.sep_to_pad,
                "json": self._json}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.lowercase = state["path"], state["lowercase"]
        self.sep_to_pad = state["sep_to_pad"]
        self._setup(state["json"])

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
                f"sep_to_pad={self.sep_to_pad})")


def bert_layout_vocab(words: Sequence[str]) -> list[str]:
    """The lines of a vocab.txt in BERT-base's layout for these words: [PAD] 0, [unused0..98],
    [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then every lower-case letter, digit and ASCII
    punctuation mark with its '##' continuation (so that no word becomes [UNK]), then the words.
    `crate_jax/data/assets/shapes_captions_bert.txt` is this for the synthetic captions."""
    import string

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    lines = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]",
             "[MASK]", *chars, *(f"##{c}" for c in chars), *sorted(set(words) - set(chars))]
    return list(dict.fromkeys(lines))
