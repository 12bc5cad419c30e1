"""The model a CRATE / CRATE-α checkpoint holds, read off its tensor shapes (docs/design.md §3):
what the layouts of convert/crate_torch.py, convert/crate_alpha_npz.py and convert/clipa.py
share.

Each importer reads the model size off the tensor shapes — width (a vote over the tensors that
carry it, so that one wrong tensor is reported rather than believed), depth (the layer indices),
patch size and channels (the stem), image size (the position-table rows, a square grid), number
of classes (the head; no head at all gives num_classes=0), the overcomplete ratio (D's columns) —
and returns `Imported(name, overrides, params, notes)` (`finish`), with
`models.create(name, **overrides)` the model these params belong to.

Heads. The big_vision layout stores them ((d, K, p) projection). The PyTorch layouts do not (qkv
is (d, d)), so heads come from, in this order: the `heads` argument (CLI --heads); the size of a
registry `name` given as a hint (e.g. 'crate-b'); a file's safetensors metadata 'heads' (written
by our exporter); the standard size table of the family by width (CRATE 384→6, 576→12, 768→12,
1024→16; CRATE-α 192→3, 576→12, 768→12, 1024→16, 1280/1408/1664/1792→16). A width outside the
table without any of these is an error that says to pass heads (`resolve_heads`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from crate_jax import models
from crate_jax.convert.primitives import (
    ConversionError,
    Entry,
    Imported,
    apply_spec,
    check_against_model,
    closest_size,
    describe,
    flatten_source,
    nest,
    resize_imported,
    size_label,
    vote,
)
from crate_jax.models.registry import VISION_SIZES

__all__ = ["FAMILY_OF", "CrateSource", "alpha_overrides", "dictionary_ratio", "finish",
           "name_and_overrides", "parse_name_hint", "resolve_heads"]

FAMILY_OF = {"crate": "crate", "crate_alpha": "crate-alpha"}


def parse_name_hint(name: str | None, block: str) -> tuple[str | None, int | None]:
    """(size key, patch or None) of a registry name hint like 'crate-b' or 'crate-alpha-l/14'."""
    if name is None:
        return None, None
    match = re.match(r"^(crate-alpha|crate)-([A-Za-z]+)(?:/(\d+))?$", name.strip(), re.I)
    if not match or match[1].lower() != FAMILY_OF[block]:
        raise ConversionError(f"name {name!r} is not a {FAMILY_OF[block]} model name "
                              f"(e.g. '{FAMILY_OF[block]}-b/16')")
    table = VISION_SIZES[block]
    size = match[2]
    if size not in table:
        lower = [k for k in table if k.lower() == size.lower()]
        if len(lower) != 1:
            raise ConversionError(f"name {name!r}: size {size!r} not in {sorted(table)}")
        size = lower[0]
    return size, int(match[3]) if match[3] else None


def resolve_heads(block: str, width: int, heads: int | None, size_hint: str | None,
                  metadata_heads: str | None, notes: list[str], layout: str) -> int:
    """The number of heads of a layout that does not store it (see the module docstring)."""
    table = VISION_SIZES[block]
    if heads is not None:
        source = "the heads argument"
    elif size_hint is not None:
        heads, source = table[size_hint][2], f"the name's size {size_hint!r}"
    elif metadata_heads is not None:
        try:
            heads = int(metadata_heads)
        except ValueError as err:
            raise ConversionError(f"file metadata heads={metadata_heads!r} is not an "
                                  "integer") from err
        source = "the file's metadata"
    else:
        by_width = sorted({dims[2] for dims in table.values() if dims[0] == width})
        if len(by_width) != 1:
            standard = ", ".join(f"{d[0]}→{d[2]}" for d in table.values())
            raise ConversionError(
                f"the {layout} layout does not record the number of attention heads and width "
                f"{width} is not a standard {FAMILY_OF[block]} width ({standard}); pass "
                "heads=K (CLI: --heads K)")
        heads, source = by_width[0], f"the standard {FAMILY_OF[block]} size table for width " \
                                     f"{width}"
    if heads <= 0 or width % heads:
        raise ConversionError(f"heads={heads} (from {source}) does not divide width {width}")
    notes.append(f"heads={heads} from {source}")
    return heads


def name_and_overrides(block: str, width: int, depth: int, heads: int, patch: int,
                       size_hint: str | None) -> tuple[str, dict[str, Any]]:
    """The registry name closest to the checkpoint's size, and the overrides that make it
    exact: the size whose (width, depth, heads) all match, else the one of that width, else the
    smallest of the family with width/depth/heads overridden."""
    table = VISION_SIZES[block]
    size, overrides = closest_size(table, dict(width=width, depth=depth, heads=heads),
                                   size_hint)
    return f"{FAMILY_OF[block]}-{size_label(table, size)}/{patch}", overrides


def dictionary_ratio(flat: Mapping[str, np.ndarray], layout: str, d: int, depth: int,
                     dkey: str) -> int:
    """The overcomplete ratio C of the (d, C·d) dictionaries."""
    ratio_cols = vote(flat, [(dkey.format(i=i) + suffix, lambda s: s[1])
                             for i in range(depth) for suffix in ("", "1")],
                      "dictionary size", layout)
    if ratio_cols % d:
        raise ConversionError(f"{layout}: dictionary D has {ratio_cols} columns, not a multiple "
                              f"of the width {d}")
    return ratio_cols // d


def alpha_overrides(*, stem_bias: bool, ratio: int, chans: int) -> dict[str, Any]:
    """The CRATE-α fields a checkpoint sets away from their defaults: no stem bias, another
    overcomplete ratio than 4, other input channels than 3."""
    overrides: dict[str, Any] = {}
    if not stem_bias:
        overrides["stem_bias"] = False
    if ratio != 4:
        overrides["overcomplete_ratio"] = ratio
    if chans != 3:
        overrides["channels"] = chans
    return overrides


@dataclasses.dataclass
class CrateSource:
    """A source state dict on its way in as one CRATE-family layout: its flat tensors, the notes
    so far, and what a name hint says (size key, patch)."""

    layout: str
    block: str
    flat: dict[str, np.ndarray]
    notes: list[str]
    size_hint: str | None
    name_patch: int | None

    @classmethod
    def read(cls, source: Mapping[str, Any], sep: str, name: str | None, *, layout: str,
             block: str) -> CrateSource:
        """`source` flattened with `sep` (flatten_source), the name hint parsed."""
        flat, notes = flatten_source(source, sep)
        return cls(layout, block, flat, notes, *parse_name_hint(name, block))

    def vote(self, probes: list[tuple[str, Callable[[tuple], Any]]], what: str) -> Any:
        """`primitives.vote` over this source's tensors."""
        return vote(self.flat, probes, what, self.layout)


def finish(src: CrateSource, spec: Mapping[str, Entry], dims: dict[str, Any], *,
           overrides: dict[str, Any], config_overrides: Mapping[str, Any],
           allow_extra: Mapping[str, str] | None, image_size: int | None,
           patch_size: int | None) -> Imported:
    """The import of `src` by its `spec`: the registry name and overrides of `dims`, the
    tensors checked and mapped (apply_spec), checked against the model, resized to `image_size`
    / `patch_size` when given, and the name hint's patch checked."""
    name, size_overrides = name_and_overrides(src.block, dims["width"], dims["depth"],
                                              dims["heads"], dims["patch"], src.size_hint)
    all_overrides = {**size_overrides, **overrides, **dict(config_overrides)}
    try:
        cfg = models.config_for(name, **all_overrides)
    except ValueError as err:
        raise ConversionError(f"the {src.layout} checkpoint ({describe(dims)}) does not make a "
                              f"valid model config: {err}") from err
    params = apply_spec(src.flat, spec, layout=src.layout, dims=dims,
                        allow_extra=allow_extra or {}, dtype=cfg.storage_dtype, notes=src.notes)
    imported = Imported(name, all_overrides, nest(params), tuple(src.notes))
    check_against_model(imported)
    imported = resize_imported(imported, image_size=image_size, patch_size=patch_size)
    final_patch = imported.config().patch_size
    if src.name_patch is not None and src.name_patch != final_patch:
        raise ConversionError(f"the name hint says patch {src.name_patch} but the model has "
                              f"patch {final_patch} (checkpoint patch {dims['patch']}; pass "
                              "patch_size to resize the stem)")
    return imported
