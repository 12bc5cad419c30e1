"""Checkpoint conversion: the released CRATE / CRATE-α weights in, PyTorch layouts out.

    from crate_jax import convert
    imported = convert.import_weights("crate_alpha_b16.npz", "crate-alpha-npz")
    name, overrides, params = imported           # models.create(name, **overrides) fits params
    model = imported.build()                     # the model with the weights loaded
    convert.write_run("runs/crate_alpha_b16", imported)   # finetune: config.init_from=that dir
    params, cfg, name = convert.load_run("runs/my_run")
    convert.export_weights(params, "crate-alpha-torch", "out.safetensors", cfg)

Layouts (docs/design.md §3): 'crate-torch', 'crate-alpha-torch', 'crate-alpha-npz' (import);
'crate-torch', 'crate-alpha-torch' (export); 'crate-alpha-clipa-torch' and the CRATE-MAE
release 'crate-mae-torch' (docs/design.md §1; convert/crate_mae.py) both ways, as are the DINO /
SimDINO / SimDINOv2 ViT backbones, 'dino-vit-torch' (convert/dino_vit.py). .npz and
.safetensors need only NumPy; .pth needs PyTorch (requirements-torch.txt). Command line:
`python -m crate_jax.convert --help`.
"""

from crate_jax.convert.crate_mae import (
    ImportedMAE,
    import_crate_mae_torch,
    to_crate_mae_torch,
)
from crate_jax.convert.export import (
    EXPORT_FORMATS,
    compatibility_notes,
    to_crate_alpha_torch,
    to_crate_torch,
)
from crate_jax.convert.files import load_weights, save_weights
from crate_jax.convert.importers import (
    FORMATS,
    ConversionError,
    Imported,
    check_against_model,
    import_crate_alpha_npz,
    import_crate_alpha_torch,
    import_crate_torch,
    resize_imported,
)
from crate_jax.convert.layouts import export_weights, import_weights
from crate_jax.convert.runs import load_run, run_config, write_run

__all__ = [
    "EXPORT_FORMATS", "FORMATS", "ConversionError", "Imported", "ImportedMAE",
    "check_against_model", "compatibility_notes", "export_weights", "import_crate_alpha_npz",
    "import_crate_alpha_torch", "import_crate_mae_torch", "import_crate_torch", "import_weights",
    "load_run", "load_weights", "resize_imported", "run_config", "save_weights",
    "to_crate_alpha_torch", "to_crate_mae_torch", "to_crate_torch", "write_run",
]
