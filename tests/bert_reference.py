"""An independent, plain-Python BERT uncased tokenizer, written from the published algorithm
(Devlin et al., BERT; the `BasicTokenizer` + `WordpieceTokenizer` pair of its release), to
check crate_jax's WordPiece tokenizer (Hugging Face `tokenizers`) against. No library code:
every step is spelled out here.

    clean: drop NUL, U+FFFD and control characters (category C*, except tab/newline/CR),
           whitespace (space, tab, newline, CR, category Zs) → ' '
    CJK:   a space on each side of every CJK ideograph
    words: split on whitespace; each word lower-cased, NFD, combining marks (Mn) removed,
           then split into runs of non-punctuation and single punctuation characters
           (ASCII 33–47, 58–64, 91–96, 123–126, or category P*)
    pieces: greedy longest match first, continuations prefixed '##'; a word longer than 100
           characters, or with no complete split, is [UNK]
"""

from __future__ import annotations

import unicodedata

CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def basic_tokens(text: str) -> list[str]:
    cleaned = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or is_control(ch):
            continue
        cleaned.append(" " if is_whitespace(ch) else f" {ch} " if is_cjk(ch) else ch)
    words = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                       if unicodedata.category(c) != "Mn")
        run = ""
        for ch in word:
            if is_punctuation(ch):
                words.extend([run] if run else [])
                words.append(ch)
                run = ""
            else:
                run += ch
        words.extend([run] if run else [])
    return words


def word_pieces(word: str, vocab: dict[str, int]) -> list[str]:
    if len(word) > 100:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = ("##" if start else "") + word[start:end]
            if piece in vocab:
                break
            end -= 1
        else:
            return ["[UNK]"]
        pieces.append(piece)
        start = end
    return pieces


def read_vocab(path: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab.setdefault(line.rstrip("\n"), i)
    return vocab


def clipa_rows(texts: list[str], vocab: dict[str, int], context_length: int) -> list[list[int]]:
    """What open_clip's CLIPA tokenizer gives: [CLS] + pieces truncated to context − 2 +
    [SEP], padded with [PAD] to the context length, then every [SEP] id replaced by 0."""
    rows = []
    for text in texts:
        pieces = [p for w in basic_tokens(text) for p in word_pieces(w, vocab)]
        ids = [vocab["[CLS]"], *(vocab[p] for p in pieces[:context_length - 2]), vocab["[SEP]"]]
        ids += [vocab["[PAD]"]] * (context_length - len(ids))
        rows.append([0 if i == vocab["[SEP]"] else i for i in ids])
    return rows
