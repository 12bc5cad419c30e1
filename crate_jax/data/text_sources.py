"""Where language-model text comes from: files, folders, globs, the Python standard library,
and tokenized ArrayRecord files.

A path setting (`data.train_path`, `data.eval_path`) is one of, or a comma-separated list of:

    a file            .jsonl: one document per line, the string field `data.text_field`
                      ('text'); .array_record: tokenized (below); any other: the whole file
                      is one UTF-8 document
    a folder          every file below it whose suffix is in TEXT_SUFFIXES, sorted
    a glob            'corpus/**/*.txt' (recursive), sorted
    'tfds:NAME:SPLIT' (the whole setting) a prepared TFDS dataset in ArrayRecord format, its
                      examples' int feature data.tokens_key ('tokens') or text data.text_field,
                      data.data_dir its folder (read through crate_jax/data/tfds_source.py)
    'stdlib:SPLIT'    the top-level .py files of this Python's standard library (the folder of
                      `os.__file__`), sorted by name; file i is held out ('eval') when
                      i % heldout_every == heldout_every − 1, else 'train'; 'all' is both

Tokenized ArrayRecord comes in two layouts:

    token stream      written by `write_token_stream` / `python -m crate_jax.data.text_sources
                      prepare`: the corpus tokenized once, documents joined by EOS, cut into
                      records of `chunk_tokens` tokens (raw little-endian uint16 or int32); a
                      sidecar FILE.meta.json holds the dtype, the chunk length and the token
                      count. Reading a window touches one or two records, so a corpus of
                      billions of tokens opens in O(1) (OpenWebText).
    documents         any other array_record file: one record per document, each an .npy
                      serialised integer array or raw int32 bytes. Read whole into memory
                      (EOS appended to every document), so meant for small corpora.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from etils import epath

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".array_record")
META_SUFFIX = ".meta.json"
STREAM_FORMAT = "crate_jax.token_stream.v1"


# --- paths -----------------------------------------------------------------------------------

def stdlib_files(split: str, heldout_every: int = 10) -> list[str]:
    """This Python's top-level standard-library .py files of `split` ('train', 'eval', 'all'),
    sorted by name: file i is held out when i % heldout_every == heldout_every − 1 (so the two
    splits are disjoint and interleaved through the alphabet)."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"stdlib split {split!r}: 'train', 'eval' or 'all'")
    if heldout_every < 2:
        raise ValueError(f"data.heldout_every={heldout_every}: must be ≥ 2")
    folder = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(folder, "*.py")))
    if split == "all":
        return files
    held = [i % heldout_every == heldout_every - 1 for i in range(len(files))]
    return [f for f, h in zip(files, held, strict=True) if h == (split == "eval")]


def _walk(folder: epath.Path) -> Iterator[epath.Path]:
    """Every file below `folder` (iterdir: epath's rglob refuses '**' for remote paths)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


def _expand_one(item: str, setting: str, heldout_every: int) -> list[str]:
    if item.startswith("stdlib"):
        _, _, split = item.partition(":")
        return stdlib_files(split or "all", heldout_every)
    if any(c in item for c in "*?["):
        found = sorted(f for f in glob.glob(item, recursive=True) if os.path.isfile(f))
        if not found:
            raise FileNotFoundError(f"{setting}: the pattern {item!r} matches no file")
        return found
    path = epath.Path(item)
    if not path.exists():
        raise FileNotFoundError(f"{setting}: {item} does not exist")
    if not path.is_dir():
        return [item]
    found = sorted(str(p) for p in _walk(path) if
                   p.suffix in TEXT_SUFFIXES and not p.name.endswith(META_SUFFIX))
    if not found:
        raise FileNotFoundError(f"{setting}: the folder {item} holds no file ending in "
                                f"{', '.join(TEXT_SUFFIXES)}")
    return found


def expand_paths(spec: str | Sequence[str], setting: str, *, heldout_every: int = 10
                 ) -> list[str]:
    """The files a path setting names (module docstring), in order; FileNotFoundError naming
    `setting` when one names nothing."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [i.strip() for i in items if i and i.strip()]
    if not items:
        raise ValueError(f"{setting}: no path given")
    return [f for item in items for f in _expand_one(item, setting, heldout_every)]


def _jsonl_documents(name: str, text_field: str) -> Iterator[str]:
    # split on "\n" only: str.splitlines would also cut at U+2028 inside a JSON string
    lines = epath.Path(name).read_bytes().decode("utf-8", errors="replace").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ValueError(f"{name}:{n}: no string field {text_field!r} (data.text_field)")
        yield obj[text_field]


def read_documents(files: Sequence[str], *, text_field: str = "text") -> Iterator[str]:
    """The documents of text files: a .jsonl line's `text_field`, or a whole other file.
    Raises ValueError naming the file and line of a .jsonl line without the field."""
    for name in files:
        if name.endswith(".jsonl"):
            yield from _jsonl_documents(name, text_field)
        else:
            yield epath.Path(name).read_bytes().decode("utf-8", errors="replace")


# --- tokenized ArrayRecord -------------------------------------------------------------------

def _token_dtype(vocab_size: int) -> np.dtype:
    # uint16 halves the file for vocabularies up to 65,536 ids (GPT-2's 50,257, BERT's 30,522)
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def write_token_stream(path: str, documents: Iterable[Sequence[int]], *, eos_id: int,
                       vocab_size: int, chunk_tokens: int = 1 << 16,
                       tokenizer: str = "") -> dict:
    """Writes the documents' ids, each followed by `eos_id`, as a token-stream ArrayRecord file
    (records of `chunk_tokens` tokens, the last one shorter) and its FILE.meta.json; returns
    the metadata."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be ≥ 1")
    dtype = _token_dtype(vocab_size)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    pending, buffered, total, records = [], 0, 0, 0
    try:
        for doc in documents:
            pending.append(np.asarray([*list(doc), eos_id], dtype))
            buffered += len(pending[-1])
            if buffered < chunk_tokens:
                continue
            flat = np.concatenate(pending)
            cut = len(flat) - len(flat) % chunk_tokens
            for start in range(0, cut, chunk_tokens):
                writer.write(flat[start:start + chunk_tokens].tobytes())
                records += 1
            pending, buffered, total = [flat[cut:]], len(flat) - cut, total + cut
        flat = np.concatenate(pending) if pending else np.zeros(0, dtype)
        if len(flat):
            writer.write(flat.tobytes())
            records, total = records + 1, total + len(flat)
    finally:
        writer.close()
    meta = dict(format=STREAM_FORMAT, dtype=dtype.str, chunk_tokens=chunk_tokens,
                num_tokens=total, num_records=records, eos_id=eos_id, vocab_size=vocab_size,
                tokenizer=tokenizer)
    epath.Path(str(path) + META_SUFFIX).write_text(json.dumps(meta, indent=2))
    return meta


class RecordStream:
    """A token-stream ArrayRecord file as a random-access token sequence (module docstring):
    len() tokens, read(start, stop) → int32. Opens its reader lazily, so it pickles (grain
    worker processes)."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = str(path), meta
        self.dtype = np.dtype(meta["dtype"])
        self.chunk = int(meta["chunk_tokens"])
        self.num_tokens = int(meta["num_tokens"])
        self._reader = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["meta"])

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        from array_record.python.array_record_module import ArrayRecordReader
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) of {self.num_tokens} in {self.path}")
        if start == stop:
            return np.zeros(0, np.int32)
        if self._reader is None:
            self._reader = ArrayRecordReader(self.path, "readahead_buffer_size:0")
        first, last = start // self.chunk, (stop - 1) // self.chunk
        parts = self._reader.read(list(range(first, last + 1)))
        flat = np.concatenate([np.frombuffer(p, self.dtype) for p in parts])
        offset = first * self.chunk
        return flat[start - offset:stop - offset].astype(np.int32)


def read_meta(path: str) -> dict | None:
    """The token-stream metadata of an ArrayRecord file, or None for a documents file."""
    meta_path = epath.Path(str(path) + META_SUFFIX)
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STREAM_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected "
                         f"{STREAM_FORMAT!r}")
    return meta


def _decode_record(record: bytes, name: str, index: int) -> np.ndarray:
    if record[:6] == b"\x93NUMPY":
        array = np.load(io.BytesIO(record), allow_pickle=False)
    else:
        if len(record) % 4:
            raise ValueError(f"{name}: record {index} is neither an .npy array nor raw int32 "
                             f"({len(record)} bytes)")
        array = np.frombuffer(record, "<i4")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: record {index} holds a {array.dtype} array of shape "
                         f"{array.shape}; expected a 1-d array of token ids")
    return array.astype(np.int32)


def read_document_records(path: str) -> list[np.ndarray]:
    """Every record of a documents ArrayRecord file, as int32 token arrays."""
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(str(path))
    try:
        return [_decode_record(r, str(path), i) for i, r in enumerate(reader.read_all())]
    finally:
        reader.close()


# --- CLI ---------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """`prepare`: tokenize text files into a token-stream ArrayRecord file."""
    parser = argparse.ArgumentParser(prog="python -m crate_jax.data.text_sources")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text into a token-stream ArrayRecord file")
    p.add_argument("--input", required=True, help="files, folders, globs or stdlib:SPLIT")
    p.add_argument("--out", required=True, help="the .array_record file to write")
    p.add_argument("--tokenizer", default="bytes", help="'bytes', vocab.txt, tokenizer.json, "
                   "a BPE folder (vocab.json + merges.txt) or a SentencePiece .model")
    p.add_argument("--text-field", default="text")
    p.add_argument("--chunk-tokens", type=int, default=1 << 16)
    args = parser.parse_args(argv)
    from crate_jax.data.text_tokenizers import load_tokenizer
    try:
        tok = load_tokenizer(args.tokenizer, setting="--tokenizer")
        files = expand_paths(args.input, "--input")
    except (FileNotFoundError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    docs = (tok.encode(text) for text in read_documents(files, text_field=args.text_field))
    meta = write_token_stream(args.out, docs, eos_id=tok.eos_id, vocab_size=tok.vocab_size,
                              chunk_tokens=args.chunk_tokens, tokenizer=args.tokenizer)
    print(f"{args.out}: {meta['num_tokens']:,} tokens in {meta['num_records']} records "
          f"from {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
