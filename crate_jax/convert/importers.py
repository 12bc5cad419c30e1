"""Importers: released CRATE / CRATE-α checkpoints → our parameter tree (docs/design.md §3).

Three source layouts, each in its own module:

    'crate-torch'        CRATE PyTorch state_dict (T/S/B/L), linear stem, Linear weights (out, in)
                         (convert/crate_torch.py)
    'crate-alpha-torch'  CRATE-α PyTorch port: conv1 (d, C, P, P), head LN with eps 1e-5
                         (convert/crate_torch.py)
    'crate-alpha-npz'    CRATE-α big_vision .npz, '/'-joined keys, proj (d, K, p), out (K, p, d)
                         (convert/crate_alpha_npz.py)

(the two-tower 'crate-alpha-clipa-torch' and the masked autoencoder 'crate-mae-torch' have
their own modules, convert/clipa.py and convert/crate_mae.py; `convert.layouts.import_weights`
reads every layout). How the model size and the heads are read off the shapes:
convert/crate_family.py; what every converter shares (ConversionError, Imported, the layout
check that drops nothing silently): convert/primitives.py. This module names every layout
(FORMATS), maps the three above to their importers (IMPORTERS) and keeps the names the rest of
the package and its users import from here.
"""

from __future__ import annotations

from collections.abc import Callable

from crate_jax.convert.crate_alpha_npz import import_crate_alpha_npz
from crate_jax.convert.crate_torch import import_crate_alpha_torch, import_crate_torch
from crate_jax.convert.primitives import (
    TORCH_HEAD_EPS,
    ConversionError,
    Entry,
    Imported,
    apply_spec,
    build_loaded,
    check_against_model,
    check_params_fit,
    flatten_source,
    resize_imported,
)

__all__ = [
    "FORMATS", "IMPORTERS", "TORCH_HEAD_EPS", "ConversionError", "Entry", "Imported",
    "apply_spec", "build_loaded", "check_against_model", "check_params_fit", "flatten_source",
    "import_crate_alpha_npz", "import_crate_alpha_torch", "import_crate_torch",
    "resize_imported",
]

FORMATS = ("crate-torch", "crate-alpha-torch", "crate-alpha-npz", "crate-alpha-clipa-torch",
           "crate-mae-torch", "dino-vit-torch", "tost-torch", "tost-gpt-torch")

IMPORTERS: dict[str, Callable[..., Imported]] = {
    "crate-torch": import_crate_torch,
    "crate-alpha-torch": import_crate_alpha_torch,
    "crate-alpha-npz": import_crate_alpha_npz,
}
