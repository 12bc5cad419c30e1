"""White-box measurements of CRATE models.

    crate_jax.whitebox.coding_rate   coding rates R, the compression term Rᶜ per layer and head,
                                     sparsity of the codes, the sparse rate reduction objective
    crate_jax.whitebox.segmentation  MaskCut-style normalised cuts on patch features, mIoU

The command line that runs them on trained runs is `python -m crate_jax.analyze`.
"""
