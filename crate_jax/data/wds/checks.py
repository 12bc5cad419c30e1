"""What counts as a bad sample, and the counters of bad data (`ReaderStats`).

Bad data is skipped and counted, never fatal by itself. Each bad sample is counted once, under
the first check it fails, in this order: no image member (``bad_images``), no '.txt'
(``missing_captions``), whitespace-only caption (``empty_captions``), image that does not decode
(``bad_images``). Images are checked by decoding them with PIL (JPEGs with DCT scaling to 1/8
size, which still reads every byte of entropy-coded data): ``Image.verify()`` alone does not
notice a truncated JPEG. A shard that ends early counts as truncated; one that cannot be opened
or is not a tar counts as unreadable. `check_bad_fraction` raises once too much is bad.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

from crate_jax.data.wds.tar import Group

_MAX_BAD_SHARDS = 100


@dataclasses.dataclass
class ReaderStats:
    """Counts of what this process has read (good samples and each kind of bad data).

    `samples` counts good samples read from shards (including ones still in the shuffle buffer).
    `bad_shards` names the shards where any bad data was found, most recent last, at most 100.
    """

    samples: int = 0
    bad_images: int = 0
    missing_captions: int = 0
    empty_captions: int = 0
    truncated_shards: int = 0
    unreadable_shards: int = 0
    bad_shards: list[str] = dataclasses.field(default_factory=list)

    @property
    def bad_samples(self) -> int:
        return self.bad_images + self.missing_captions + self.empty_captions

    @property
    def seen_samples(self) -> int:
        return self.samples + self.bad_samples

    @property
    def bad_fraction(self) -> float:
        """(bad samples + bad shards) / (samples seen + bad shards)."""
        bad = self.bad_samples + self.truncated_shards + self.unreadable_shards
        total = self.seen_samples + self.truncated_shards + self.unreadable_shards
        return bad / total if total else 0.0

    def note_bad_shard(self, shard: str) -> None:
        if shard in self.bad_shards:
            self.bad_shards.remove(shard)
        self.bad_shards.append(shard)
        del self.bad_shards[:-_MAX_BAD_SHARDS]

    def as_metrics(self) -> dict[str, float]:
        """Scalars for a metrics writer, keys 'data/...'."""
        return {
            "data/samples": float(self.samples),
            "data/bad_images": float(self.bad_images),
            "data/missing_captions": float(self.missing_captions),
            "data/empty_captions": float(self.empty_captions),
            "data/bad_samples": float(self.bad_samples),
            "data/truncated_shards": float(self.truncated_shards),
            "data/unreadable_shards": float(self.unreadable_shards),
            "data/bad_fraction": float(self.bad_fraction),
        }

    def summary(self) -> str:
        return (f"samples={self.samples}, bad_images={self.bad_images}, "
                f"missing_captions={self.missing_captions}, empty_captions={self.empty_captions}, "
                f"truncated_shards={self.truncated_shards}, "
                f"unreadable_shards={self.unreadable_shards}")


def name_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[-limit:])
    return shown if len(names) <= limit else f"{shown} (and {len(names) - limit} more)"


def problem_of(group: Group, verify_images: bool) -> tuple[str | None, str]:
    """(the counter a bad group is counted under or None, its caption)."""
    if group.image is None:
        return "bad_images", ""
    if group.caption is None:
        return "missing_captions", ""
    caption = group.caption.decode("utf-8", "replace")
    if not caption.strip():
        return "empty_captions", caption
    if verify_images and not image_ok(group.image):
        return "bad_images", caption
    return None, caption


def count(stats: ReaderStats, problem: str | None, shard: str) -> None:
    if problem is None:
        stats.samples += 1
    else:
        setattr(stats, problem, getattr(stats, problem) + 1)
        stats.note_bad_shard(shard)


def check_bad_fraction(stats: ReaderStats, max_bad_fraction: float, min_samples: int,
                       process_index: int) -> None:
    """RuntimeError naming the shards with bad data once the bad fraction is over the limit."""
    if stats.seen_samples < min_samples:
        return
    fraction = stats.bad_fraction
    if fraction > max_bad_fraction:
        raise RuntimeError(
            f"WebDatasetReader: too much bad data in process {process_index}: bad "
            f"fraction {fraction:.3f} > max_bad_fraction {max_bad_fraction} after "
            f"{stats.seen_samples} samples ({stats.summary()}); shards with bad data "
            f"(most recent last): {name_list(stats.bad_shards)}")


def image_ok(data: bytes) -> bool:
    """Whether the bytes decode as an image (JPEG at 1/8 scale: same bytes read, less work)."""
    from PIL import Image  # only needed to verify images

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("L", (1, 1))
            image.load()
        return True
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError, struct.error)
        return False


def parse_json(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None

