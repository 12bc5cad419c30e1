"""What `python -m crate_jax.analyze` does with its parsed flags (crate_jax/analyze/__main__.py
documents the outputs): the layer-wise measurements, the figures and the segmentation scores
of image runs, or the neuron-level analysis of a language run."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
from etils import epath

from crate_jax.analyze.figures import plot_attention, plot_layerwise, plot_pca, plot_segmentation
from crate_jax.analyze.loading import Run, load_checkpoint, load_images, load_workdir, random_init
from crate_jax.analyze.measuring import (
    coco_scores,
    decoder_summaries,
    run_model,
    run_summary,
    segment,
)
from crate_jax.generate import load_language_run
from crate_jax.whitebox import neurons, segmentation
from crate_jax.whitebox.autoencoder import plot_autoencoder


def _load_runs(args: argparse.Namespace) -> list[Run]:
    """The runs of --workdir then --checkpoint, their names made distinct (legend, JSON)."""
    runs = [load_workdir(w) for w in args.workdir] + [load_checkpoint(c) for c in args.checkpoint]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({i})"
    return runs


def _check_runs(args: argparse.Namespace, runs: list[Run]) -> int:
    """The attention layer (--layer, 0-based) after checking it exists in every run and that
    the runs take one image size; creates --out."""
    primary = runs[0]
    cfg = primary.model.cfg
    depth = cfg.depth
    layer = args.layer if args.layer >= 0 else depth + args.layer
    if not 0 <= layer < depth:
        raise ValueError(f"--layer: {args.layer} is outside the model's {depth} layers")
    os.makedirs(args.out, exist_ok=True)
    for r in runs[1:]:
        if r.model.cfg.image_size != cfg.image_size:
            raise ValueError(f"runs take different image sizes ({r.name}: "
                             f"{r.model.cfg.image_size}, {primary.name}: {cfg.image_size})")
        if r.model.cfg.depth <= layer:
            raise ValueError(f"--layer: {args.layer} is outside {r.name}'s layers")
    return layer


def _layerwise(args: argparse.Namespace, measured_runs: list[Run], measured: dict[str, dict],
               images: np.ndarray, layer: int) -> dict[str, Any]:
    """layerwise.json and layerwise.png (and layerwise_autoencoder.png for masked
    autoencoders); returns the JSON document."""
    summaries = [run_summary(r, measured[r.name]) for r in measured_runs]
    settings = {"data": args.data, "num_images": args.num_images,
                "normalization": args.normalization,
                "eps": args.eps if args.eps is not None else
                (0.1 if args.normalization == "reference" else 0.5),
                "include_cls": not args.exclude_cls, "attention_layer": layer}
    autoencoders = decoder_summaries(measured_runs, summaries, images, args)
    layerwise = {"settings": settings, "runs": summaries}
    with open(os.path.join(args.out, "layerwise.json"), "w") as f:
        json.dump(layerwise, f, indent=1)
    plot_layerwise(summaries, os.path.join(args.out, "layerwise.png"),
                   normalization=args.normalization)
    if autoencoders:
        plot_autoencoder(autoencoders, os.path.join(args.out, "layerwise_autoencoder.png"),
                         normalization=args.normalization)
    return layerwise


def _maps(args: argparse.Namespace, primary: Run, first: dict[str, np.ndarray],
          images: np.ndarray, layer: int, show: int) -> None:
    """attention_layer{L}.png and pca.png of the first run, on the first `show` images."""
    cfg = primary.model.cfg
    plot_attention(images[:show], first["cls_attention"][:show], cfg.grid,
                   os.path.join(args.out, f"attention_layer{layer}.png"),
                   title=(f"{primary.name}: TSSA membership Π (attention's analogue), "
                          f"layer {layer} (rows: heads)" if cfg.block == "tost" else
                          f"{primary.name}: [CLS] → patch attention, layer {layer} "
                          "(rows: heads)"))
    plot_pca(images[:show], first["features"][:show], cfg.grid,
             os.path.join(args.out, "pca.png"),
             title=f"{primary.name}: PCA of the last layer's patch features")


def _segment_runs(args: argparse.Namespace, seg_runs: list[Run], measured: dict[str, dict],
                  data: dict, kw: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(the segmented images and masks, MaskCut's masks per run, their scores per run): the
    analysed images when they have masks (their measured features reused), else synthetic
    segmentation images."""
    if data["mask"] is not None and args.seg_images <= len(data["image"]):
        seg = {"image": data["image"][:args.seg_images], "mask": data["mask"][:args.seg_images]}
        features = {name: out["features"][:args.seg_images] for name, out in measured.items()}
    else:
        size = seg_runs[0].model.cfg.image_size
        seg = load_images("synthetic_segmentation", size, args.seg_images)
        features = {}
    predictions, scores = {}, {}
    for r in seg_runs:
        feats = features.get(r.name)
        if feats is None:
            feats = run_model(r, seg["image"], **kw)["features"]
        predictions[r.name] = segment(feats, r.model.cfg, args.num_objects, args.seg_center)
        scores[r.name] = segmentation.miou(predictions[r.name], list(seg["mask"]))
    return seg, predictions, scores


def _segmentation(args: argparse.Namespace, runs: list[Run], baseline: Run,
                  measured: dict[str, dict], data: dict, kw: dict[str, Any], layer: int,
                  show: int) -> tuple[dict[str, Any], dict[str, dict]]:
    """segmentation.json and segmentation.png of the runs and the random initialisation;
    returns the JSON document and the synthetic scores per run."""
    cfg = runs[0].model.cfg
    seg_runs = [*runs, baseline]
    seg, predictions, scores = _segment_runs(args, seg_runs, measured, data, kw)
    seg_doc = {"settings": {"images": len(seg["image"]), "num_objects": args.num_objects,
                            "tau": segmentation.TAU, "epsilon": segmentation.EPSILON,
                            "features": "last layer output, patch tokens",
                            "center": args.seg_center, "image_size": cfg.image_size},
               "synthetic_segmentation": scores,
               "synthetic_segmentation_patch_oracle": segmentation.miou(
                   segmentation.patch_oracle(list(seg["mask"]), cfg.patch_size),
                   list(seg["mask"]))}
    if args.coco == "auto":
        seg_doc["coco_val2017"] = coco_scores(seg_runs, args, args.batch, layer)
    with open(os.path.join(args.out, "segmentation.json"), "w") as f:
        json.dump(seg_doc, f, indent=1)
    plot_segmentation(seg["image"][:show], seg["mask"][:show],
                      {r.name: predictions[r.name][:show] for r in (runs[0], baseline)},
                      os.path.join(args.out, "segmentation.png"))
    return seg_doc, scores


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3g}" for v in values)


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `main` does, for a parsed namespace; returns the two JSON documents."""
    t0 = time.perf_counter()
    runs = _load_runs(args)
    baseline = random_init(runs[0])
    layer = _check_runs(args, runs)
    data = load_images(args.data, runs[0].model.cfg.image_size, args.num_images)
    measured_runs = runs + ([baseline] if args.random_init else [])
    kw = dict(batch=args.batch, layer=layer, normalization=args.normalization, eps=args.eps,
              include_cls=not args.exclude_cls)
    measured = {r.name: run_model(r, data["image"], **kw) for r in measured_runs}
    layerwise = _layerwise(args, measured_runs, measured, data["image"], layer)
    show = min(args.show, len(data["image"]))
    _maps(args, runs[0], measured[runs[0].name], data["image"], layer, show)
    seg_doc, scores = _segmentation(args, runs, baseline, measured, data, kw, layer, show)
    elapsed = time.perf_counter() - t0
    for s in layerwise["runs"]:
        print(f"{s['name']}: Rᶜ {_fmt(s['compression_mean'])} | sparsity "
              f"{_fmt(s['sparsity_mean'])}", flush=True)
    for name, sc in scores.items():
        print(f"segmentation {name}: miou {sc['miou']:.3f} fg_iou {sc['fg_iou']:.3f} "
              f"object_iou {sc['object_iou']:.3f}", flush=True)
    print(f"wrote {args.out} in {elapsed:.1f}s", flush=True)
    return {"layerwise": layerwise, "segmentation": seg_doc}


def language_run(args: argparse.Namespace) -> bool:
    """A language-model workdir (causal or masked) is analysed neuron by neuron
    (whitebox/neurons.py)."""
    if len(args.workdir) != 1 or args.checkpoint:
        return False
    workdir = args.workdir[0]
    path = epath.Path(workdir) / "config.json"  # a local folder or gs://...
    if not path.exists() or json.loads(path.read_text()).get("trainer") not in ("lm", "mlm"):
        return False
    if "://" in workdir:  # load_language_run reads local folders only
        raise ValueError(f"--workdir={workdir}: the neuron analysis of a language model reads "
                         "a local workdir only; copy the run to a local folder first")
    return True


def analyze_language(args: argparse.Namespace) -> int:
    """The neuron-level analysis of a language-model run (whitebox/neurons.py) into --out."""
    run = load_language_run(args.workdir[0], causal=False)
    summary = neurons.analyze_language_run(run, args.out, num_sequences=args.num_sequences,
                                           top_neurons=args.top_neurons,
                                           snippets=args.snippets)
    print(neurons.format_summary(summary))
    print(f"wrote {os.path.join(args.out, 'index.html')}", flush=True)
    return 0
