"""BERT WordPiece tokenization as the CRATE-α-CLIPA models were trained with it: crate_jax's
tokenizer (Hugging Face `tokenizers`, read from a generated vocab.txt, or from the
tokenizer.json that `tokenizers` itself writes) gives the same rows as the independent
plain-Python BERT tokenizer of tests/bert_reference.py, on captions with punctuation, accents,
CJK characters, control characters, unknown characters and over-long text."""

import pickle

import numpy as np
import pytest
from bert_reference import basic_tokens, clipa_rows, read_vocab

from crate_jax.data import tokenizer as T
from crate_jax.data.image_text import text_tokens
from crate_jax.data.wordpiece import WordPieceTokenizer

CONTEXT = 32
LONG = " ".join(f"word{i % 7} and photographs of cats" for i in range(12))
CAPTIONS = [
    "A photo of a dog, running!", "it's a state-of-the-art (tiny) photograph...",
    "Café crème brûlée — naïve Ångström", "e\u0301tude in Ü-bahn", "一只猫 sitting on 桌子",
    "東京tower at night。", "tab\there\x00null\u200bzero-width \u00a0nbsp", "$5.00 & 50% off",
    "a cat 🐱 emoji", "x" * 101, "photographs photographing photographed", "UPPER lower MiXeD",
    "", "   ", LONG, "unknownzzqq words", "«quoted» ‘single’ “double”",
]
# Characters the vocabulary leaves out, so that [UNK] appears ('q' only as a word start).
LEFT_OUT = {"🐱", "z"}


def _write_vocab(path) -> dict[str, int]:
    """A BERT-layout vocab.txt: [PAD] 0, [unused0..98], [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, then single characters, their '##' forms, words and word pieces."""
    words = [w for c in CAPTIONS for w in basic_tokens(c)]
    chars = sorted({ch for w in words for ch in w} - LEFT_OUT)
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]",
              "[MASK]", *chars, *(f"##{c}" for c in chars if c != "q"),
              "photo", "photograph", "##graph", "##s", "##ing", "##ed", "cat", "dog", "the",
              "of", "a", "state", "art", "tiny", "run", "##ning", "word", "and", "night"]
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return read_vocab(str(path))


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    return path, _write_vocab(path)


def test_rows_equal_the_reference_bert_tokenizer(vocab_file):
    path, vocab = vocab_file
    tok = T.load(str(path))
    assert isinstance(tok, WordPieceTokenizer)
    got = T.tokenize(tok, CAPTIONS, CONTEXT)
    want = np.array(clipa_rows(CAPTIONS, vocab, CONTEXT), np.int32)
    for caption, g, w in zip(CAPTIONS, got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=repr(caption))
    # the set exercises what it claims to: unknowns, truncation, [CLS] first, 0 padding
    assert (got == vocab["[UNK]"]).any() and (got[:, 0] == vocab["[CLS]"]).all()
    long_row = got[CAPTIONS.index(LONG)]  # 30 pieces, then the [SEP] that became 0
    assert (long_row[:-1] != 0).all() and long_row[-1] == 0
    assert not (got == vocab["[SEP]"]).any()


def test_ids_come_from_the_file(vocab_file):
    path, vocab = vocab_file
    tok = T.load(str(path))
    assert tok.vocab_size == len(vocab) and tok.pad_id == 0
    assert (tok.bos_id, tok.sep_id, tok.unk_id, tok.eot_id) == (101, 102, 100, 0)
    keep_sep = WordPieceTokenizer(str(path), sep_to_pad=False)
    row = T.tokenize(keep_sep, ["a dog"], 8)[0]
    assert row.tolist() == [101, vocab["a"], vocab["dog"], 102, 0, 0, 0, 0]


def test_tokenizer_json_written_by_tokenizers_reads_the_same(vocab_file, tmp_path):
    from tokenizers import BertWordPieceTokenizer

    path, vocab = vocab_file
    json_path = tmp_path / "tokenizer.json"
    BertWordPieceTokenizer(str(path), lowercase=True).save(str(json_path))
    from_json = T.load(str(json_path))
    np.testing.assert_array_equal(T.tokenize(from_json, CAPTIONS, CONTEXT),
                                  np.array(clipa_rows(CAPTIONS, vocab, CONTEXT), np.int32))


def test_pickles_decodes_and_names_missing_specials(vocab_file, tmp_path):
    path, _ = vocab_file
    tok = T.load(str(path))
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(T.tokenize(again, CAPTIONS, CONTEXT),
                                  T.tokenize(tok, CAPTIONS, CONTEXT))
    assert tok.decode(T.tokenize(tok, ["A photograph, of cats!"], 16)[0]) == (
        "a photograph, of cats!")
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"no \[CLS\], \[SEP\]"):
        T.load(str(bad))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        T.load(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("method", T.REDUCE_METHODS)
def test_clipa_text_reduction_keeps_cls_first(vocab_file, method):
    """CLIPA's text-token reduction on top of WordPiece rows: [CLS] stays in front, the
    kept pieces keep their order, and the row ends in the eot (0) when it was cut."""
    import ml_collections

    path, vocab = vocab_file
    data = ml_collections.ConfigDict(dict(tokenizer=str(path), context_length=CONTEXT,
                                          text_tokens=8, text_reduction=method))
    full = T.tokenize(T.load(str(path)), [LONG, "a dog"], CONTEXT)
    reduced = text_tokens(data, [LONG, "a dog"], np.random.default_rng(0))
    assert reduced.shape == (2, 8) and (reduced[:, 0] == vocab["[CLS]"]).all()
    assert reduced[0, -1] == 0 and (reduced[0, 1:-1] != 0).all()
    pieces, kept = list(full[0, 1:]), list(reduced[0, 1:-1])
    windows = [pieces[i:i + 6] for i in range(len(pieces) - 5)]
    if method == "truncate":
        assert kept == pieces[:6]
    elif method == "block":
        assert kept in windows
    else:  # an ordered subsequence of the pieces
        it = iter(pieces)
        assert all(any(p == k for p in it) for k in kept)
    np.testing.assert_array_equal(reduced[1], full[1, :8])  # short rows are untouched


def test_text_tower_ids_come_from_a_wordpiece_vocab(tmp_path):
    """The contrastive task on a BERT vocab.txt: the CLIP-style text tower's table, pad and
    end ids come from the file (the CLIPA path trains on one in test_configs.py,
    clipa_l14:smoke)."""
    import os
    import string

    from flax import nnx

    from crate_jax import tasks
    from crate_jax.config_check import load_config

    letters = list(string.ascii_lowercase + string.digits)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
                                *(f"##{c}" for c in letters), "a", "photo", "of"]) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "demo.py") + ":smoke")
    config.data.tokenizer = str(vocab)
    task = tasks.get(config.trainer)(config)
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    # one row per line of the file ('a' is on two lines: ids run to the last line's)
    assert model.text.token_embedding.shape[0] == 5 + 2 * len(letters) + 3
    assert (model.text.cfg.pad_id, model.text.cfg.eot_id) == (0, 0)
    batch = next(task.train_data(16, seed=0))
    assert (batch["tokens"][:, 0] == 2).all()  # [CLS] first


def test_the_shipped_vocab_covers_the_synthetic_captions():
    """crate_jax/data/assets/shapes_captions_bert.txt (the smoke configs' BERT vocab.txt,
    'builtin:shapes_captions_bert') is in BERT-base's layout, and none of the synthetic
    captions' words, class names or prompt templates becomes [UNK]."""
    from crate_jax.data.image_text import tokenizer_for
    from crate_jax.data.synthetic import ShapesCaptions
    from crate_jax.evals.clip import read_templates

    data = ShapesCaptions("train", num_examples=3000, holdout_pairs=0, seed=0)
    texts = [data._layout(i).caption for i in range(3000)] + list(data.class_names)
    texts += [t.format(c) for t in read_templates() for c in data.class_names]
    tok = tokenizer_for({"tokenizer": "builtin:shapes_captions_bert"})
    assert isinstance(tok, WordPieceTokenizer)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.sep_id) == (0, 100, 101, 102)
    rows = T.tokenize(tok, texts, CONTEXT)
    assert not (rows == tok.unk_id).any()
