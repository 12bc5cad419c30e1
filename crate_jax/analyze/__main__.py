"""White-box analysis of trained CRATE / CRATE-α / ToST runs: the paper's layer-wise figure,
attention maps, PCA of the patch features and emergent segmentation. Any run with a CRATE
image model: classifiers, CLIPA's image tower, a masked autoencoder's encoder (and its CRATE
decoder: layerwise_autoencoder.png), SimDINO's teacher backbone; ToST classifiers.

    python -m crate_jax.analyze --workdir=RUN [--workdir=RUN2 ...] [--random-init] \
        --data=synthetic_shapes --out=DIR
    python -m crate_jax.analyze --checkpoint=RUN/checkpoints[/STEP] --data=synthetic_segmentation \
        --out=DIR

Writes into DIR:
    layerwise.json        per run: mean/std over images of Rᶜ per layer (and per head), of the
                          sparsity of the codes, of R and of the sparse rate reduction objective
    layerwise.png         two panels: Rᶜ vs layer, sparsity vs layer; ±std bands, one curve a run
    attention_layer{L}.png  [CLS]→patch attention of every head (rows) for a few images (columns)
                          in layer L (0-based; --layer -1 is the last), over the image;
                          for ToST its analogue, TSSA's membership Π of every patch per head
    pca.png               the first three principal components of the last layer's patch
                          features as RGB, under each image
    segmentation.json     MaskCut scores (miou, fg_iou, object_iou) of each run and of a random
                          initialisation of the same config, on synthetic shapes and (when
                          prepared locally) COCO val2017
    segmentation.png      the images, the ground truth and the masks of the run and of the
                          random initialisation

The measurement conventions (which tokens, which normalisation, cls token) are documented in
crate_jax/whitebox/coding_rate.py; the segmentation and its scores in segmentation.py. The
figures and the segmentation panels use the first run given.
"""

from __future__ import annotations

import argparse
import os
import sys

from crate_jax.analyze.command import analyze, analyze_language, language_run
from crate_jax.analyze.loading import DATA_CHOICES

SHOW_IMAGES = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m crate_jax.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", action="append", default=[],
                   help="a training run's workdir (repeat for several runs)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a checkpoints directory (latest step) or one step directory of a run")
    p.add_argument("--random-init", action="store_true",
                   help="add a randomly initialised model of the first run's config as a curve")
    p.add_argument("--data", default="synthetic_shapes",
                   help=f"images to measure on: {' | '.join(DATA_CHOICES)}")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=None,
                   help="output directory (default with one --workdir: WORKDIR/analysis)")
    p.add_argument("--layer", type=int, default=-1,
                   help="layer of the attention maps (0-based; negative counts from the end)")
    p.add_argument("--normalization", default="reference", choices=("reference", "paper"),
                   help="Rᶜ normalisation (see crate_jax/whitebox/coding_rate.py)")
    p.add_argument("--eps", type=float, default=None,
                   help="ε of the coding rate (default: ε²=0.01 reference, ε=0.5 paper)")
    p.add_argument("--exclude-cls", action="store_true",
                   help="measure the patch tokens only (default: every token, cls included)")
    p.add_argument("--seg-images", type=int, default=None,
                   help="synthetic segmentation images scored with MaskCut (default: "
                        "--num-images, at most 64)")
    p.add_argument("--num-objects", type=int, default=2, help="MaskCut objects per image")
    p.add_argument("--num-sequences", type=int, default=64,
                   help="language runs: held-out rows the neurons are measured on")
    p.add_argument("--top-neurons", type=int, default=12,
                   help="language runs: the most active neurons shown per layer")
    p.add_argument("--snippets", type=int, default=8,
                   help="language runs: highest activations shown per neuron")
    p.add_argument("--seg-center", action="store_true",
                   help="subtract each image's mean patch feature before the cut")
    p.add_argument("--coco", default="auto", choices=("auto", "off"),
                   help="score COCO val2017 too when TFDS coco/2017_panoptic is prepared locally")
    p.add_argument("--coco-data-dir", default=None, help="TFDS data_dir holding COCO")
    p.add_argument("--coco-images", type=int, default=500)
    p.add_argument("--show", type=int, default=SHOW_IMAGES, help="images in the figures")
    args = p.parse_args(argv)
    if not args.workdir and not args.checkpoint:
        p.error("give at least one --workdir=RUN or --checkpoint=PATH")
    if args.out is None:
        if len(args.workdir) != 1 or args.checkpoint:
            p.error("--out is needed unless exactly one --workdir is given")
        if "://" in args.workdir[0]:
            p.error(f"--out is needed with --workdir={args.workdir[0]}: runs are read from "
                    "gs:// and the like, the figures written to a local folder")
        args.out = os.path.join(args.workdir[0], "analysis")
    if "://" in args.out:
        p.error(f"--out={args.out}: name a local folder (runs may be read from gs://)")
    if args.data not in DATA_CHOICES:
        p.error(f"--data: unknown data {args.data!r}; use one of {', '.join(DATA_CHOICES)}")
    if args.seg_images is None:
        args.seg_images = min(args.num_images, 64)
    for flag in ("num_images", "batch", "seg_images", "show", "num_objects"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if language_run(args):
            return analyze_language(args)
        analyze(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The command (`python -m crate_jax.analyze`, `crate-analyze`): the garbage collector set
    for tracing (crate_jax/gc_tuning.py), then `main` on the process's arguments."""
    from crate_jax import gc_tuning

    gc_tuning.for_tracing()
    sys.exit(main())


if __name__ == "__main__":
    cli()
