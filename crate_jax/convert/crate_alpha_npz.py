"""The released CRATE-α big_vision parameter sets ('crate-alpha-npz') → our CRATE-α
(docs/design.md §3).

    embedding/kernel (P, P, C, d), embedding/bias    stem/kernel, stem/bias (optional)
    cls (1, 1, d)                                    cls
    pos_embedding (1, 1 + N, d)                      posemb/embedding (absent: the fixed
                                                     2-D sin-cos table, posemb='sincos2d')
    Transformer/encoderblock_{i}/
        LayerNorm_0, LayerNorm_1                     encoder/layers/{i}/{attn,sparse}/norm
        MultiHeadDotProductSubspaceAttention_0/
            proj/kernel (d, K, p), out/kernel (K, p, d)   .../attn/proj, .../attn/out
        OvercompleteISTABlock_0/D, D1 (d, C·d)       .../sparse/D, .../sparse/D1
    encoder_norm                                     norm
    head/kernel (d, classes), head/bias              head (optional: an encoder without one)

Keys are '/'-joined (or the nested dict); a leading 'params/' is accepted. Unlike the PyTorch
layouts this one records the heads, in the projections' (d, K, p) shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crate_jax.convert.crate_family import CrateSource, alpha_overrides, dictionary_ratio, finish
from crate_jax.convert.primitives import ConversionError, Entry, Imported, grid_side, layer_count

__all__ = ["LAYOUT", "import_crate_alpha_npz"]

LAYOUT = "crate-alpha-npz"
BLOCK = "Transformer/encoderblock_{i}"
ATTENTION = BLOCK + "/MultiHeadDotProductSubspaceAttention_0"


def _strip_params_prefix(src: CrateSource) -> None:
    """Keys under a leading 'params/' (a whole train state's parameters) lose the prefix."""
    flat = src.flat
    prefixed = [k for k in flat if k.startswith("params/")]
    if prefixed:
        for key in prefixed:
            stripped = key[len("params/"):]
            if stripped in flat:
                raise ConversionError(f"{key} and {stripped} both present")
            flat[stripped] = flat.pop(key)
        src.notes.append(f"stripped the 'params/' prefix from {len(prefixed)} key(s)")


def _stored_heads(src: CrateSource, width: int, depth: int, heads: int | None) -> int:
    """The heads the projection kernels record (a `heads` argument must agree)."""
    k = src.vote([(ATTENTION.format(i=i) + "/proj/kernel", lambda s: s[1]) for i in range(depth)]
                 + [(ATTENTION.format(i=i) + "/out/kernel", lambda s: s[0])
                    for i in range(depth)], "number of heads")
    if heads is not None and heads != k:
        raise ConversionError(f"heads={heads} was given but the checkpoint's projections have "
                              f"{k} heads")
    if k <= 0 or width % k:
        raise ConversionError(f"{LAYOUT}: {k} heads do not divide width {width}")
    src.notes.append(f"heads={k} from the projection kernels")
    return k


def _grid(src: CrateSource, patch: int, image_size: int | None) -> tuple[bool, int, int]:
    """(whether the position table is learned, its rows, the image size): the table's rows, or
    without a table the `image_size` argument (required then)."""
    if "pos_embedding" in src.flat:
        rows = src.vote([("pos_embedding", lambda s: s[1])], "position table")
        side = grid_side(rows - 1, f"{LAYOUT} pos_embedding")
        return True, rows, side * patch
    if image_size is None:
        raise ConversionError(f"{LAYOUT}: the checkpoint has no pos_embedding (a fixed 2-D "
                              "sin-cos table), so the image size is not recorded; pass "
                              "image_size (CLI: --image-size)")
    src.notes.append("no pos_embedding: the fixed 2-D sin-cos table (posemb='sincos2d')")
    return False, (image_size // patch) ** 2 + 1, image_size


def _spec(d: int, k: int, depth: int, ratio: int, patch: int, chans: int, rows: int, *,
          learned: bool, stem_bias: bool, classes: int | None) -> dict[str, Entry]:
    """The layout (module docstring) for these sizes; `classes` None: no head."""
    p = d // k
    spec = {
        "embedding/kernel": Entry("stem/kernel", (patch, patch, chans, d)),
        "cls": Entry("cls", (1, 1, d)),
        "encoder_norm/scale": Entry("norm/scale", (d,)),
        "encoder_norm/bias": Entry("norm/bias", (d,)),
    }
    if learned:
        spec["pos_embedding"] = Entry("posemb/embedding", (1, rows, d))
    if stem_bias:
        spec["embedding/bias"] = Entry("stem/bias", (d,))
    if classes is not None:
        spec["head/kernel"] = Entry("head/kernel", (d, classes))
        spec["head/bias"] = Entry("head/bias", (classes,))
    for i in range(depth):
        t, a, o = BLOCK.format(i=i), ATTENTION.format(i=i), f"encoder/layers/{i}"
        spec |= {
            f"{t}/LayerNorm_0/scale": Entry(f"{o}/attn/norm/scale", (d,)),
            f"{t}/LayerNorm_0/bias": Entry(f"{o}/attn/norm/bias", (d,)),
            f"{a}/proj/kernel": Entry(f"{o}/attn/proj", (d, k, p)),
            f"{a}/out/kernel": Entry(f"{o}/attn/out", (k, p, d)),
            f"{t}/LayerNorm_1/scale": Entry(f"{o}/sparse/norm/scale", (d,)),
            f"{t}/LayerNorm_1/bias": Entry(f"{o}/sparse/norm/bias", (d,)),
            f"{t}/OvercompleteISTABlock_0/D": Entry(f"{o}/sparse/D", (d, ratio * d)),
            f"{t}/OvercompleteISTABlock_0/D1": Entry(f"{o}/sparse/D1", (d, ratio * d)),
        }
    return spec


def _head(src: CrateSource) -> tuple[bool, int]:
    """Whether the checkpoint has a classifier head, and its class count (0 without)."""
    has_head = "head/kernel" in src.flat or "head/bias" in src.flat
    classes = (src.vote([("head/kernel", lambda s: s[1]), ("head/bias", lambda s: s[0])],
                        "class count") if has_head else 0)
    if not has_head:
        src.notes.append("no head: imported as an encoder without a classifier (num_classes=0)")
    return has_head, classes


def import_crate_alpha_npz(source: Mapping[str, Any], *, heads: int | None = None,
                           name: str | None = None, image_size: int | None = None,
                           patch_size: int | None = None,
                           allow_extra: Mapping[str, str] | None = None,
                           metadata: Mapping[str, str] | None = None,
                           **config_overrides: Any) -> Imported:
    """A CRATE-α big_vision parameter set ('/'-joined keys, or the nested dict) → our CRATE-α.

    Heads come from the (d, K, p) projection (a `heads` argument must agree). Keys under a
    leading 'params/' are accepted. Without 'pos_embedding' the model uses the fixed 2-D sin-cos
    table (posemb='sincos2d') and `image_size` must be given."""
    del metadata  # the layout records its heads
    src = CrateSource.read(source, "/", name, layout=LAYOUT, block="crate_alpha")
    _strip_params_prefix(src)
    flat = src.flat
    width = src.vote([("cls", lambda s: s[-1]), ("pos_embedding", lambda s: s[-1]),
                      ("embedding/kernel", lambda s: s[-1]),
                      ("embedding/bias", lambda s: s[0]),
                      (ATTENTION.format(i=0) + "/proj/kernel", lambda s: s[0]),
                      ("encoder_norm/scale", lambda s: s[0])], "width")
    patch = src.vote([("embedding/kernel", lambda s: s[0])], "patch size")
    chans = src.vote([("embedding/kernel", lambda s: s[2])], "input channels")
    depth = layer_count(flat, r"Transformer/encoderblock_(\d+)/", LAYOUT)
    k = _stored_heads(src, width, depth, heads)
    ratio = dictionary_ratio(flat, LAYOUT, width, depth, BLOCK + "/OvercompleteISTABlock_0/D")
    learned, rows, image = _grid(src, patch, image_size)
    stem_bias = "embedding/bias" in flat
    has_head, classes = _head(src)
    spec = _spec(width, k, depth, ratio, patch, chans, rows, learned=learned,
                 stem_bias=stem_bias, classes=classes if has_head else None)
    dims = dict(width=width, depth=depth, heads=k, patch=patch, image=image, classes=classes)
    overrides: dict[str, Any] = dict(num_classes=classes, image_size=image)
    if not learned:
        overrides["posemb"] = "sincos2d"
    overrides |= alpha_overrides(stem_bias=stem_bias, ratio=ratio, chans=chans)
    return finish(src, spec, dims, overrides=overrides, config_overrides=config_overrides,
                  allow_extra=allow_extra, image_size=image_size if learned else None,
                  patch_size=patch_size)
