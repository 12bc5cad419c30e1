"""Tokenizers: byte fallback, SentencePiece training / loading / CLI, tokenize, CLIPA reduction."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from crate_jax.data import tokenizer as T

REPO = Path(__file__).resolve().parents[1]

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black",
           "brown", "grey", "cyan", "magenta", "teal", "violet", "golden")
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star", "hexagon",
          "pentagon", "ellipse", "arrow", "crescent", "heart")
SIZES = ("small", "large", "tiny", "huge", "medium")
TEMPLATES = ("A photo of a {}", "An image showing a {}", "A picture of the {}",
             "There is a {} here", "A drawing of one {}", "A blurry snapshot of a {}",
             "Close-up view of a {}")
RELATIONS = ("next to a {}", "above the {}", "below a {}", "to the left of the {}",
             "inside a {}", "behind some {}", "on top of a {}", "near the {}")
BACKGROUNDS = ("on a wooden table", "against a plain background", "in the garden",
               "under bright sunlight", "at night", "on striped paper")


def make_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]
    lines = []
    for _ in range(n):
        obj = f"{pick(SIZES)} {pick(COLOURS)} {pick(SHAPES)}"
        text = pick(TEMPLATES).format(obj)
        if rng.random() < 0.7:
            text += " " + pick(RELATIONS).format(f"{pick(COLOURS)} {pick(SHAPES)}")
        if rng.random() < 0.5:
            text += " " + pick(BACKGROUNDS)
        lines.append(text)
    return lines


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "captions.txt"
    path.write_text("\n".join(make_corpus()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sp_model(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    prefix = tmp_path_factory.mktemp("sp") / "caps"
    return T.train_sentencepiece([str(corpus_file)], str(prefix), vocab_size=400)


def content_of(row: np.ndarray, eot: int) -> list[int]:
    return row[: int(np.flatnonzero(row == eot)[0])].tolist()


def check_one_eot_last(out: np.ndarray, pad: int, eot: int) -> None:
    for row in out:
        real = np.flatnonzero(row != pad)
        assert (row == eot).sum() == 1
        assert row[real[-1]] == eot
        assert (row[real[-1] + 1:] == pad).all()


# --------------------------------------------------------------------------- bytes


def test_byte_tokenizer_round_trip_and_ids():
    tok = T.ByteTokenizer()
    assert isinstance(tok, T.Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eot_id) == (259, 0, 1, 2)
    text = "héllo wörld — 日本語 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < 259 for i in ids)
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.decode(ids) == text
    assert tok.decode([1, *ids[:3], 2, 0, 0]) == "hé"
    assert tok.encode("") == [] and tok.decode([]) == ""
    with pytest.raises(ValueError, match="259"):
        tok.decode([259])


# --------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_trained_model(sp_model: str):
    assert sp_model.endswith(".model") and Path(sp_model).exists()
    tok = T.load(sp_model)
    assert isinstance(tok, T.SentencePieceTokenizer) and isinstance(tok, T.Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eot_id) == (0, 1, 2)
    assert tok.vocab_size == 400
    text = "A Photo of a LARGE Red Circle  next to the blue star"
    ids = tok.encode(text)
    assert ids and all(3 < i < 400 for i in ids)  # no specials, no unk for in-domain text
    assert tok.decode(ids) == "a photo of a large red circle next to the blue star"
    assert tok.decode([1, *ids, 2, 0, 0]) == tok.decode(ids)
    assert len(ids) < len(text.split()) + 4  # subwords, not characters
    # Out-of-domain characters map to unk (3) rather than failing.
    assert 3 in tok.encode("日本")
    # Pickles (for data-loader worker processes) to an equivalent tokenizer.
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids and clone.vocab_size == 400


def test_sentencepiece_case_preserving_model(corpus_file: Path, tmp_path: Path):
    path = T.train_sentencepiece([str(corpus_file)], str(tmp_path / "cased"), vocab_size=300,
                                 lowercase=False)
    tok = T.SentencePieceTokenizer(path, lowercase=False)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("A photo of a red circle")) == "A photo of a red circle"
    lower = T.SentencePieceTokenizer(path)
    assert lower.decode(lower.encode("A Photo")) == "a photo"


def test_corpus_formats_jsonl_and_tar(tmp_path: Path):
    lines = make_corpus(400, seed=1)
    jsonl = tmp_path / "caps.jsonl"
    recs = [json.dumps({"caption": t}) if i % 2 else json.dumps({"text": t, "url": "x"})
            for i, t in enumerate(lines[:200])]
    jsonl.write_text("\n".join([*recs, "not json", json.dumps({"other": 1}), ""]),
                     encoding="utf-8")
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, t in enumerate(lines[200:]):
            add(f"{i:06d}.txt", t.encode("utf-8"))
            add(f"{i:06d}.jpg", b"\xff\xd8 not really a jpeg")
        add("broken.txt", b"\xff\xfe\xfa invalid utf-8")
    got = list(T.iter_captions([str(jsonl), str(tar_path)]))
    assert got == lines
    # Unigram: this corpus has ~90 distinct words, too few for a larger unigram vocabulary.
    path = T.train_sentencepiece([str(jsonl), str(tar_path)], str(tmp_path / "mixed"),
                                 vocab_size=100, model_type="unigram")
    tok = T.load(path)
    assert tok.vocab_size == 100 and (tok.pad_id, tok.bos_id, tok.eot_id) == (0, 1, 2)
    assert tok.decode(tok.encode(lines[0])) == lines[0].lower()


def test_train_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        T.train_sentencepiece([str(tmp_path / "missing.txt")], str(tmp_path / "m"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no captions"):
        T.train_sentencepiece([str(empty)], str(tmp_path / "m"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # the timeout only guards against a hang: a busy 2-core machine has taken 4x the ~10 s of
    # an idle one to start Python, import and train
    return subprocess.run([sys.executable, "-m", "crate_jax.data.tokenizer", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_train_and_encode(corpus_file: Path, tmp_path: Path):
    prefix = tmp_path / "cli" / "tok"
    res = run_cli("train", "--corpus", str(corpus_file), "--out", str(prefix),
                  "--vocab-size", "350", "--model-type", "bpe")
    assert res.returncode == 0, res.stderr
    out_lines = res.stdout.splitlines()
    model = f"{prefix}.model"
    assert out_lines[0] == model and len(out_lines) > 1
    tok = T.load(model)
    assert tok.vocab_size == 350 and (tok.pad_id, tok.bos_id, tok.eot_id) == (0, 1, 2)

    res = run_cli("encode", "--model", model, "A red circle", "a blue star")
    assert res.returncode == 0, res.stderr
    got = [[int(i) for i in line.split()] for line in res.stdout.splitlines()]
    assert got == [tok.encode("A red circle"), tok.encode("a blue star")]


def test_cli_errors(tmp_path: Path):
    missing = tmp_path / "no_such_corpus.txt"
    res = run_cli("train", "--corpus", str(missing), "--out", str(tmp_path / "x"),
                  "--vocab-size", "300")
    assert res.returncode == 2 and str(missing) in res.stderr
    res = run_cli("encode", "--model", str(tmp_path / "nope.model"), "hi")
    assert res.returncode == 2 and "nope.model" in res.stderr


# --------------------------------------------------------------------------- load


def test_load_specs_and_errors(tmp_path: Path):
    assert isinstance(T.load(None), T.ByteTokenizer)
    assert isinstance(T.load("bytes"), T.ByteTokenizer)
    missing = str(tmp_path / "absent.model")
    with pytest.raises(FileNotFoundError, match=r"absent\.model"):
        T.load(missing)
    with pytest.raises(FileNotFoundError, match=r"absent\.model"):
        T.SentencePieceTokenizer(missing)
    with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
        T.load(str(tmp_path / "absent.txt"))  # a BERT vocab.txt, were it there
    with pytest.raises(ValueError, match=r"vocab\.txt"):
        T.load("vocab.bin")
    with pytest.raises(ValueError, match="bpe"):
        T.load("bpe")


# --------------------------------------------------------------------------- tokenize


def test_tokenize_shapes_padding_and_eot():
    tok = T.ByteTokenizer()
    out = T.tokenize(tok, ["ab", "", "a much longer caption"], 8)
    assert out.dtype == np.int32 and out.shape == (3, 8)
    a, b = ord("a") + 3, ord("b") + 3
    np.testing.assert_array_equal(out[0], [a, b, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1], [2, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[2], [*tok.encode("a much ")[:7], 2])
    assert tok.decode(out[2]) == "a much "
    check_one_eot_last(out, 0, 2)

    with_bos = T.tokenize(tok, ["ab", "a much longer caption"], 8, add_bos=True)
    np.testing.assert_array_equal(with_bos[0], [1, a, b, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(with_bos[1], [1, *tok.encode("a much")[:6], 2])
    assert T.tokenize(tok, [], 8).shape == (0, 8)


def test_tokenize_sentencepiece_truncation(sp_model: str):
    tok = T.load(sp_model)
    text = " ".join(make_corpus(3, seed=2))
    ids = tok.encode(text)
    assert len(ids) > 8
    out = T.tokenize(tok, [text, "a red star"], 8, add_bos=True)
    np.testing.assert_array_equal(out[0], [1, *ids[:6], 2])
    np.testing.assert_array_equal(out[1][: len(tok.encode("a red star")) + 2],
                                  [1, *tok.encode("a red star"), 2])
    check_one_eot_last(out, 0, 2)


def test_tokenize_errors():
    tok = T.ByteTokenizer()
    with pytest.raises(ValueError, match="context_length"):
        T.tokenize(tok, ["a"], 1, add_bos=True)
    with pytest.raises(ValueError, match="context_length"):
        T.tokenize(tok, ["a"], 0)
    with pytest.raises(TypeError):
        T.tokenize(tok, "a caption", 8)

    class NoBos(T.ByteTokenizer):
        bos_id = None

    with pytest.raises(ValueError, match="bos"):
        T.tokenize(NoBos(), ["a"], 8, add_bos=True)


# --------------------------------------------------------------------------- reduce_tokens

L, K = 32, 8


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, list[str]]:
    texts = ["", "abc", "abcdefg", "abcdefgh", *make_corpus(60, seed=3)]
    return T.tokenize(T.ByteTokenizer(), texts, L), texts


def is_subsequence(sub: list[int], seq: list[int]) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


def is_block(sub: list[int], seq: list[int]) -> bool:
    return any(seq[s:s + len(sub)] == sub for s in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("method", T.REDUCE_METHODS)
def test_reduce_tokens_invariants(rows, method: str):
    tokens, _ = rows
    out = T.reduce_tokens(tokens, K, method=method, rng=np.random.default_rng(0), pad_id=0,
                          eot_id=2)
    assert out.dtype == np.int32 and out.shape == (len(tokens), K)
    check_one_eot_last(out, 0, 2)
    for src, red in zip(tokens, out, strict=True):
        content, reduced = content_of(src, 2), content_of(red, 2)
        if len(content) <= K - 1:
            np.testing.assert_array_equal(red, src[:K])  # short rows are unchanged
            continue
        assert len(reduced) == K - 1
        if method == "truncate":
            assert reduced == content[: K - 1]
        elif method == "random":
            assert is_subsequence(reduced, content)
        else:
            assert is_block(reduced, content)


def test_reduce_random_positions_are_ordered_and_varied():
    # Distinct content tokens make positions recoverable: chosen positions strictly increase.
    content = np.arange(3, 3 + L - 1)
    tokens = np.tile(np.concatenate([content, [2]]), (200, 1))
    out = T.reduce_tokens(tokens, K, method="random", rng=np.random.default_rng(1), pad_id=0,
                          eot_id=2)
    pos = out[:, : K - 1] - 3
    assert (np.diff(pos, axis=1) > 0).all()
    assert len({tuple(p) for p in pos}) > 150  # not one fixed subset
    assert set(np.unique(pos)) == set(range(L - 1))  # every position can be drawn

    block = T.reduce_tokens(tokens, K, method="block", rng=np.random.default_rng(1), pad_id=0,
                            eot_id=2)
    starts = block[:, 0] - 3
    assert (np.diff(block[:, : K - 1], axis=1) == 1).all()
    assert starts.min() == 0 and starts.max() == L - 1 - (K - 1)  # first and last blocks


@pytest.mark.parametrize("method", ["random", "block"])
def test_reduce_tokens_deterministic(rows, method: str):
    tokens, _ = rows
    run = lambda seed: T.reduce_tokens(tokens, K, method=method,
                                       rng=np.random.default_rng(seed), pad_id=0, eot_id=2)
    np.testing.assert_array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))


def test_reduce_truncate_matches_tokenize(rows):
    tokens, texts = rows
    tok = T.ByteTokenizer()
    for k in (1, 2, K, L):
        out = T.reduce_tokens(tokens, k, method="truncate", rng=None, pad_id=0, eot_id=2)
        np.testing.assert_array_equal(out, T.tokenize(tok, texts, k))


def test_reduce_tokens_with_bos(rows):
    _, texts = rows
    tok = T.ByteTokenizer()
    tokens = T.tokenize(tok, texts, L, add_bos=True)
    out = T.reduce_tokens(tokens, K, method="truncate", rng=None, pad_id=0, eot_id=2, bos_id=1)
    np.testing.assert_array_equal(out, T.tokenize(tok, texts, K, add_bos=True))
    for method in ("random", "block"):
        out = T.reduce_tokens(tokens, K, method=method, rng=np.random.default_rng(0), pad_id=0,
                              eot_id=2, bos_id=1)
        assert (out[:, 0] == 1).all()
        check_one_eot_last(out, 0, 2)


def test_reduce_tokens_errors(rows):
    tokens, _ = rows
    kw = dict(pad_id=0, eot_id=2)
    with pytest.raises(ValueError, match="shuffle"):
        T.reduce_tokens(tokens, K, method="shuffle", rng=np.random.default_rng(0), **kw)
    for method in ("random", "block"):
        with pytest.raises(ValueError, match=method):
            T.reduce_tokens(tokens, K, method=method, rng=None, **kw)
    with pytest.raises(ValueError, match="k="):
        T.reduce_tokens(tokens, L + 1, method="truncate", rng=None, **kw)
    with pytest.raises(ValueError, match="k="):
        T.reduce_tokens(tokens, 0, method="truncate", rng=None, **kw)
    with pytest.raises(ValueError, match="eot"):
        T.reduce_tokens(np.full((2, L), 5), K, method="truncate", rng=None, **kw)
    with pytest.raises(ValueError, match="bos"):
        T.reduce_tokens(tokens, K, method="truncate", rng=None, bos_id=1, **kw)


def test_generated_corpus_is_varied():
    lines = make_corpus()
    assert len(set(lines)) > 2000
    words = set(itertools.chain.from_iterable(t.lower().split() for t in lines))
    assert len(words) > 60
