"""Webdataset shards → ArrayRecord files, so the grain path serves an image-text set.

    python -m crate_jax.data.wds.to_array_record --shards='/data/cc12m/{00000..01242}.tar' \\
        --out=/data/cc12m_array_record

then train with ``--config.data.source=array_record`` and
``--config.data.paths='/data/cc12m_array_record/*.array_record'``.

When it pays. The webdataset reader streams from a bucket with no preparation and shuffles
within its buffer; the grain path shuffles the whole set every epoch and resumes at the same
global example with any process count, but reads files through ArrayRecord's own I/O (local
disks, or a bucket mounted with gcsfuse), after a conversion that reads and rewrites every
byte once. For sets that fit a disk (CC3M, CC12M, DataComp's small and medium pools) the
global shuffle is worth it; at DataComp xlarge's 450 TB the stream is the better deal.

What is written. Every good sample (the reader's checks, with each image fully decoded at 1/8
scale: the grain path cannot skip a sample at training time) becomes one record, a msgpack map
{"key", "image" (the image member's bytes, unchanged), "caption" (str), "json" (the .json
member, re-encoded, or None)}, in the reader's first-epoch order. Bad samples, truncated and
unreadable shards are skipped and counted as the reader counts them; more than
``--max_bad_fraction`` bad stops the conversion naming the shards. Files hold ``--per_file``
records each, written with ``group_size:1`` (every record readable on its own: random access)
under temporary names, renamed to ``data-00000-of-00012.array_record`` ... only when all are
written; on any error the files of the run are removed (after a SIGKILL the next run into
the same OUT removes them). OUT/conversion.json records the counts. An OUT that already
holds ArrayRecord files is refused.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import msgpack

from crate_jax.data.wds.reader import WebDatasetReader

FILE_PATTERN = "data-{index:05d}-of-{count:05d}.array_record"


def good_samples(shards: str | list[str], max_bad_fraction: float = 0.5
                 ) -> tuple[Iterator[dict[str, Any]], WebDatasetReader]:
    """One pass over every good sample of `shards` (the reader's first epoch: its shard order
    for seed 0, no shuffle buffer), and the reader, whose `stats` count what was skipped."""
    reader = WebDatasetReader(shards, seed=0, process_index=0, process_count=1,
                              max_bad_fraction=max_bad_fraction, verify_images=True)

    def samples() -> Iterator[dict[str, Any]]:
        try:
            while True:
                sample = next(reader)
                if reader.epoch > 0:
                    return
                yield sample
        finally:
            reader.close()

    return samples(), reader


def encode(sample: dict[str, Any]) -> bytes:
    meta = sample.get("json")
    return msgpack.packb({"key": sample["key"], "image": sample["image"],
                          "caption": sample["caption"],
                          "json": None if meta is None else json.dumps(meta).encode()})


def decode(record: bytes) -> dict[str, Any]:
    return msgpack.unpackb(record)


def convert(shards: str | list[str], out: str, per_file: int = 10_000,
            max_bad_fraction: float = 0.5) -> dict[str, Any]:
    """Write the good samples of `shards` to OUT as ArrayRecord files; returns the counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if per_file < 1:
        raise ValueError(f"--per_file must be >= 1, got {per_file}")
    if glob.glob(os.path.join(out, "*.array_record")):
        raise FileExistsError(f"{out} already holds .array_record files; give an empty --out")
    os.makedirs(out, exist_ok=True)
    for stale in glob.glob(os.path.join(out, ".part-*.array_record.tmp")):
        os.remove(stale)  # a conversion killed before it could clean up
    written: list[str] = []
    writer, count = None, 0
    try:
        samples, reader = good_samples(shards, max_bad_fraction)
        for sample in samples:
            if count % per_file == 0:
                if writer is not None:
                    writer.close()
                written.append(os.path.join(out, f".part-{len(written):05d}.array_record.tmp"))
                writer = ArrayRecordWriter(written[-1], "group_size:1")
            writer.write(encode(sample))
            count += 1
        if writer is not None:
            writer.close()
            writer = None
        final = [os.path.join(out, FILE_PATTERN.format(index=i, count=len(written)))
                 for i in range(len(written))]
        for temporary, path in zip(written, final, strict=True):
            os.replace(temporary, path)
    except BaseException:
        if writer is not None:
            writer.close()
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        raise
    report = {"records": count, "files": final, **reader.stats.as_metrics(),
              "bad_shards": list(reader.stats.bad_shards)}
    with open(os.path.join(out, "conversion.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


class Records:
    """Converted pairs as a random-access source (grain): example i is {'key', 'image' (the
    encoded bytes), 'caption'}. `paths`: files or glob patterns (local, or a mounted bucket)."""

    def __init__(self, paths: str | list[str]):
        import grain

        patterns = [paths] if isinstance(paths, str) else list(paths or [])
        if any("://" in p for p in patterns):
            raise ValueError(f"data.paths={paths!r}: ArrayRecord files are read through local "
                             "file I/O; copy them to a disk or mount the bucket (gcsfuse)")
        files = sorted(f for p in patterns for f in glob.glob(os.path.expanduser(p)))
        if not files:
            raise FileNotFoundError(
                f"data.paths={paths!r}: no ArrayRecord files there (make them from tar shards "
                "with python -m crate_jax.data.wds.to_array_record --shards=... --out=DIR)")
        self.files = files
        self._source = grain.sources.ArrayRecordDataSource(files)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = decode(self._source[index])
        return {"key": record["key"], "image": record["image"], "caption": record["caption"]}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="tar shards: a brace pattern or list")
    parser.add_argument("--out", required=True, help="the folder for the .array_record files")
    parser.add_argument("--per_file", type=int, default=10_000, help="records per file")
    parser.add_argument("--max_bad_fraction", type=float, default=0.5)
    args = parser.parse_args(argv)
    report = convert(args.shards, args.out, args.per_file, args.max_bad_fraction)
    print(f"{report['records']} records in {len(report['files'])} files under {args.out}; "
          f"skipped: {report['data/bad_samples']:.0f} bad samples, "
          f"{report['data/truncated_shards']:.0f} truncated and "
          f"{report['data/unreadable_shards']:.0f} unreadable shards")


if __name__ == "__main__":
    main()
