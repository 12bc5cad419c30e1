"""Language-model data: packing, exact resume through grain, BERT masking, the tokenizers (a
BERT vocab.txt, a GPT-2-style BPE folder, bytes), ArrayRecord token files, the unigram figure
and the errors that name a setting."""

from __future__ import annotations

import io
import json
import math

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from crate_jax.data import pipeline, text, text_sources
from crate_jax.data.mlm_masking import KEEP, MASK, RANDOM, BertMasker
from crate_jax.data.wordpiece import bert_layout_vocab

DATA = ml_collections.ConfigDict(dict(text_field="text", heldout_every=10))
BYTES = text.load_tokenizer("bytes")


def _stream(n: int = 1000, seed: int = 0) -> text.ArrayStream:
    return text.ArrayStream(np.random.default_rng(seed).integers(4, 260, n))


def test_causal_rows_score_every_target_once():
    stream, L = _stream(1003), 10
    rows = text.LMRows(stream, L, pad_id=0, tail=True)
    assert len(rows) == math.ceil(1002 / L) == 101
    targets, inputs = [], []
    for i in range(len(rows)):
        row = rows[i]
        w = row["weights"] > 0
        targets.append(row["tokens"][1:][w])
        inputs.append(row["tokens"][:-1][w])
    np.testing.assert_array_equal(np.concatenate(targets), stream.tokens[1:])
    np.testing.assert_array_equal(np.concatenate(inputs), stream.tokens[:-1])
    assert rows[100]["weights"].sum() == 2 and (rows[100]["tokens"][3:] == 0).all()
    train = text.LMRows(stream, L, pad_id=0)  # training drops the partial tail
    assert len(train) == 100 and set(train[0]) == {"tokens"}


def test_masked_rows_pack_the_stream_between_cls_and_sep():
    stream = _stream(95)
    rows = text.MLMRows(stream, 12, tok=BYTES, tail=True)
    assert len(rows) == 10  # 10 content tokens a row
    body = []
    for i in range(len(rows)):
        row = rows[i]
        n = int(row["attention_mask"].sum())
        assert row["tokens"][0] == BYTES.bos_id and row["tokens"][n - 1] == BYTES.eos_id
        body.append(row["tokens"][1:n - 1])
    np.testing.assert_array_equal(np.concatenate(body), stream.tokens)


def _batches(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("masked", [False, True])
def test_text_iterator_resumes_exactly(masked):
    stream = _stream(5000)
    if masked:
        rows = text.MLMRows(stream, 16, tok=BYTES)
        transform = BertMasker(vocab_size=BYTES.vocab_size, special_ids=BYTES.special_ids,
                               mask_id=BYTES.mask_id, max_predictions=3)
    else:
        rows, transform = text.LMRows(stream, 16, pad_id=0), (lambda ex, rng: ex)
    it = pipeline.train_iterator(rows, batch_size=8, seed=3, transform=transform,
                                 process=(0, 1))
    _batches(it, 3)
    state = it.get_state()
    expected = _batches(it, 40)  # past one epoch of the rows: the reshuffle resumes too
    again = pipeline.train_iterator(rows, batch_size=8, seed=3, transform=transform,
                                    process=(0, 1))
    again.set_state(state)
    for a, b in zip(expected, _batches(again, 40), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_bert_masking_proportions_and_specials():
    rng = np.random.default_rng(0)
    specials = BYTES.special_ids
    masker = BertMasker(vocab_size=BYTES.vocab_size, special_ids=specials,
                        mask_id=BYTES.mask_id, max_predictions=64)
    chosen_total = candidates = 0
    kinds = []
    for _ in range(400):
        tokens = rng.integers(4, 260, 128).astype(np.int32)
        tokens[rng.random(128) < 0.2] = rng.choice(specials)  # specials sprinkled in
        positions, kind = masker.choose(tokens, rng)
        assert not np.isin(tokens[positions], specials).any()
        assert len(np.unique(positions)) == len(positions)
        n = int((~np.isin(tokens, specials)).sum())
        assert len(positions) == max(1, round(0.15 * n))
        chosen_total, candidates = chosen_total + len(positions), candidates + n
        kinds.append(kind)
    kinds = np.concatenate(kinds)
    assert abs(chosen_total / candidates - 0.15) < 0.005
    for k, share in ((MASK, 0.8), (RANDOM, 0.1), (KEEP, 0.1)):
        assert abs((kinds == k).mean() - share) < 0.02


def test_bert_masking_output_and_determinism():
    masker = BertMasker(vocab_size=BYTES.vocab_size, special_ids=BYTES.special_ids,
                        mask_id=BYTES.mask_id, max_predictions=6)
    tokens = np.r_[1, np.arange(10, 40), 2, 0, 0].astype(np.int32)
    example = {"tokens": tokens, "attention_mask": (tokens > 0).astype(np.int32), "index": 7}
    a = masker.fixed(5)(example)
    b = masker.fixed(5)(example)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    k = int(a["mlm_weights"].sum())
    assert k == round(0.15 * 30) == 4 and "index" not in a
    pos = a["mlm_positions"][:k]
    np.testing.assert_array_equal(a["mlm_ids"][:k], tokens[pos])
    unchanged = np.setdiff1d(np.arange(len(tokens)), pos)
    np.testing.assert_array_equal(a["tokens"][unchanged], tokens[unchanged])
    # a chosen position holds [MASK], a random non-special id or its own id: never pad/bos/eos
    assert not np.isin(a["tokens"][pos], [BYTES.pad_id, BYTES.bos_id, BYTES.eos_id]).any()
    assert not np.isin(masker.replacements, BYTES.special_ids).any()


def test_bert_vocab_txt_through_the_wordpiece_path(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(bert_layout_vocab(["the", "cat", "sat", "on", "mat"])) + "\n")
    tok = text.load_tokenizer(str(vocab))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 101, 102, 103)
    ids = tok.encode("The cat sat on the MAT.")
    assert tok.decode(ids) == "the cat sat on the mat."
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in ["The cat.", "Sat on mat."]))
    stream = text.open_stream(str(corpus), tok, DATA, setting="data.train_path")
    row = text.MLMRows(stream, 12, tok=tok, tail=True)[0]
    assert row["tokens"][0] == 101 and list(row["tokens"]).count(102) == 3  # 2 docs + row end
    assert tok.decode(row["tokens"]) == "the cat. sat on mat."


def test_gpt2_style_bpe_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    bpe.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    tok = text.load_tokenizer(str(tmp_path))
    assert tok.eos_id == 0 and tok.mask_id is None
    source = "def g(y):\n    return y * 2 ünïcode\n"
    assert tok.decode(tok.encode(source)) == source
    assert text.load_tokenizer(str(tmp_path / "vocab.json")).vocab_size == tok.vocab_size


def test_array_record_token_stream_and_documents(tmp_path):
    docs = [BYTES.encode(t) for t in ["first document", "x", "a third, longer one " * 9]]
    expected = np.concatenate([np.r_[d, BYTES.eos_id] for d in docs])
    path = str(tmp_path / "tokens.array_record")
    meta = text_sources.write_token_stream(path, docs, eos_id=BYTES.eos_id,
                                           vocab_size=BYTES.vocab_size, chunk_tokens=7)
    assert meta["num_tokens"] == len(expected) and meta["num_records"] == -(-len(expected) // 7)
    stream = text.open_stream(path, BYTES, DATA, setting="data.train_path")
    np.testing.assert_array_equal(stream.read(0, len(stream)), expected)
    np.testing.assert_array_equal(stream.read(5, 30), expected[5:30])  # across records
    rows = text.LMRows(stream, 8, pad_id=0)
    np.testing.assert_array_equal(rows[3]["tokens"], expected[24:33])
    # a plain array_record of one .npy array per document
    plain = str(tmp_path / "docs.array_record")
    writer = ArrayRecordWriter(plain, "group_size:1")
    for d in docs:
        buf = io.BytesIO()
        np.save(buf, np.asarray(d, np.int64))
        writer.write(buf.getvalue())
    writer.close()
    stream = text.open_stream(str(tmp_path / "docs.array_record"), BYTES, DATA, setting="x")
    np.testing.assert_array_equal(stream.read(0, len(stream)), expected)
    wordpiece = text.TextTokenizer(None, "other", 300, eos_id=9, pad_id=0)
    with pytest.raises(ValueError, match="eos_id=2"):
        text.open_stream(path, wordpiece, DATA, setting="data.train_path")


def test_prepare_cli_writes_a_stream(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world!")
    out = str(tmp_path / "out" / "t.array_record")
    assert text_sources.main(["prepare", "--input", str(tmp_path), "--out", out]) == 0
    stream = text.open_stream(out, BYTES, DATA, setting="data.train_path")
    assert BYTES.decode(stream.read(0, len(stream))) == "helloworld!"
    assert text_sources.main(["prepare", "--input", str(tmp_path / "nope"), "--out", out]) == 2


def test_unigram_perplexity_is_the_add_one_unigram():
    train, held = _stream(500, 1), _stream(80, 2)
    counts = np.bincount(train.tokens, minlength=260)
    p = (counts + 1) / (500 + 260)
    expected = np.exp(-np.mean(np.log(p[held.tokens[1:]])))
    assert text.unigram_perplexity(train, held, 260) == pytest.approx(expected, rel=1e-10)


def test_stdlib_splits_are_disjoint_and_sorted():
    train, held = (text_sources.stdlib_files(s, 10) for s in ("train", "eval"))
    assert held and train and not set(train) & set(held)
    assert sorted(train + held) == text_sources.stdlib_files("all")


def test_errors_name_the_setting(tmp_path):
    missing = str(tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer=.*vocab\.txt"):
        text.load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"data\.train_path: .*nothing"):
        text.open_stream(str(tmp_path / "nothing"), BYTES, DATA, setting="data.train_path")
    with pytest.raises(FileNotFoundError, match=r"data\.eval_path: the pattern"):
        text.open_stream(str(tmp_path / "*.txt"), BYTES, DATA, setting="data.eval_path")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field 'text'"):
        text.open_stream(str(bad), BYTES, DATA, setting="data.train_path")


def test_tfds_dataset_of_token_arrays(tmp_path):
    """A TFDS dataset prepared in ArrayRecord format ('tfds:NAME:SPLIT'), read without
    tensorflow: every example's 'tokens', each followed by EOS."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class CrateTinyTokens(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"tokens": np.arange(4 + i, 10 + i, dtype=np.int32)}

    CrateTinyTokens(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    data = ml_collections.ConfigDict(dict(data_dir=str(tmp_path)))
    stream = text.open_stream("tfds:crate_tiny_tokens:train", BYTES, data,
                              setting="data.train_path")
    tokens = stream.read(0, len(stream))
    docs = np.split(tokens, np.flatnonzero(tokens == BYTES.eos_id) + 1)[:-1]
    assert sorted(tuple(d[:-1]) for d in docs) == [tuple(range(4 + i, 10 + i))
                                                   for i in range(5)]
