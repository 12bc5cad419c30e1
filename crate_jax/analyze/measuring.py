"""The white-box measurements of a run on images: the coding rate, sparsity and objective of
every layer (crate_jax/whitebox/coding_rate.py), the attention maps and last-layer features the
figures show, Rᶜ through a masked autoencoder's CRATE decoder, and MaskCut segmentation of the
features with its scores (crate_jax/whitebox/segmentation.py)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.analyze.loading import Run, normalization_constants
from crate_jax.whitebox import segmentation
from crate_jax.whitebox.autoencoder import decoder_summary, has_crate_decoder, measure_decoder
from crate_jax.whitebox.coding_rate import measure, summarize


@functools.lru_cache(maxsize=16)
def _forward_fn(graphdef, mean: tuple, std: tuple, layer: int, normalization: str,
                eps: float | None, include_cls: bool):
    """One jitted forward per (graph, settings): the trained model and its random
    initialisation share the compiled function."""

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        x = (x.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
        _, inter = model(x, collect=True)
        out = measure(model, x, normalization=normalization, eps=eps, include_cls=include_cls,
                      inter=inter)
        if model.cfg.block == "tost":  # Π (B, K, N): each patch's membership of head k
            out["cls_attention"] = inter["attention"][layer]
            out["features"] = inter["tokens_out"][-1].astype(jnp.float32)  # patches only
        else:
            out["cls_attention"] = inter["attention"][layer, :, :, 0, 1:]
            out["features"] = inter["tokens_out"][-1][:, 1:].astype(jnp.float32)
        return out

    return jax.jit(forward)


def run_model(run: Run, images: np.ndarray, *, batch: int, layer: int, normalization: str,
              eps: float | None, include_cls: bool) -> dict[str, np.ndarray]:
    """Measurements per image plus, for the figures, the [CLS]→patch attention of `layer`
    (n, K, N) and the last layer's patch features (n, N, d). Batches of `batch` images (fewer
    when there are fewer images), the last one padded so that one compilation serves all."""
    mean, std = normalization_constants(run.config)
    graphdef, state = nnx.split(run.model)
    forward = _forward_fn(graphdef, tuple(mean.tolist()), tuple(std.tolist()), layer,
                          normalization, eps, include_cls)
    n = len(images)
    chunk = min(batch, n)
    parts: dict[str, list] = {}
    for i in range(0, n, chunk):
        x = images[i:i + chunk]
        real = len(x)
        if real < chunk:
            x = np.concatenate([x, np.repeat(x[-1:], chunk - real, axis=0)])
        out = jax.device_get(forward(state, x))
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[:real])
    return {k: np.concatenate(v) for k, v in parts.items()}


def decoder_summaries(runs: list[Run], summaries: list[dict], images: np.ndarray,
                      args: argparse.Namespace) -> list[dict]:
    """Adds 'decoder' (Rᶜ through the CRATE decoder) to the summary of every masked
    autoencoder run; returns those summaries."""
    out = []
    for run, summary in zip(runs, summaries, strict=True):
        if not has_crate_decoder(run.full):
            continue
        mean, std = normalization_constants(run.config)
        graphdef, state = nnx.split(run.full)

        @jax.jit
        def forward(state, x, graphdef=graphdef, mean=mean, std=std):
            x = (x.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
            return measure_decoder(nnx.merge(graphdef, state), x,
                                   normalization=args.normalization, eps=args.eps)

        parts = [jax.device_get(forward(state, images[i:i + args.batch]))
                 for i in range(0, len(images), args.batch)]
        summary["decoder"] = decoder_summary(
            {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        out.append(summary)
    return out


def run_summary(run: Run, measured: dict[str, np.ndarray]) -> dict[str, Any]:
    cfg = run.model.cfg
    keys = ("compression", "compression_heads", "rate", "sparsity", "l0", "objective")
    summary = summarize({k: measured[k] for k in keys})
    return {"name": run.name, "source": run.source, "step": run.step,
            "model": run.config.model.get("name") or run.config.model.get("image"),
            "block": cfg.block, "width": cfg.width, "depth": cfg.depth, "heads": cfg.heads,
            "patch_size": cfg.patch_size, "image_size": cfg.image_size, "lam": float(cfg.lam),
            "points": list(range(cfg.depth + 1)), "layers": list(range(1, cfg.depth + 1)),
            **summary}


def segment(features: np.ndarray, cfg, num_objects: int,
            center: bool = False) -> list[list[np.ndarray]]:
    return segmentation.segment_images(features, cfg.grid, cfg.patch_size,
                                       num_objects=num_objects, center=center)


def coco_scores(runs: list[Run], args: argparse.Namespace, batch: int,
                layer: int) -> dict[str, Any]:
    """MaskCut scores of each run on COCO val2017 when TFDS coco/2017_panoptic is prepared
    locally; {'skipped': why} otherwise."""
    size = runs[0].model.cfg.image_size
    try:
        examples = list(segmentation.coco_panoptic_val(size, args.coco_images,
                                                       data_dir=args.coco_data_dir))
    except segmentation.DatasetUnavailable as e:
        print(f"segmentation: skipping COCO val2017: {e}", flush=True)
        return {"skipped": str(e)}
    images = np.stack([e["image"] for e in examples])
    masks = [e["mask"] for e in examples]
    out = {}
    for run in runs:
        feats = run_model(run, images, batch=batch, layer=layer, normalization="reference",
                          eps=None, include_cls=True)["features"]
        out[run.name] = segmentation.miou(
            segment(feats, run.model.cfg, args.num_objects, args.seg_center), masks)
    return out
