"""A multi-run study: several models trained on one task, then the white-box analysis of each
against its random initialisation (configs/whitebox_claims.py). `crate_jax.main` runs it when
the config has a `study` section:

    python -m crate_jax.main --config=configs/whitebox_claims.py[:smoke|:gpu] [--workdir=DIR]

config.study:
    models      {name: {name: registry model name, overrides: {...}, optim: {...}}}: each is
                trained in WORKDIR/<name> with the config's schedule (optim entries override
                the shared optimizer settings for that model)
    analysis    data (an analyze --data choice), num_images, batch, num_objects (MaskCut),
                show (images in the figures)
    docs_dir    where the figures and the JSON are copied, relative to the working directory
                ('' = nowhere)

Writes WORKDIR/analysis/: whitebox_claims.json (every number), layerwise_<name>.png (Rᶜ and
sparsity per layer, ±std over evaluation batches, trained and random init), layerwise.png (the
trained models together), attention_<name>.png
([CLS] → patch attention of the last layer: the trained model's heads, then the random
initialisation's), segmentation.png (ground truth and every model's MaskCut).

The std bands are the sample std (ddof 1) of the per-batch means over the evaluation batches
(num_images / batch of them), not the per-image std that `python -m crate_jax.analyze` reports.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from crate_jax import analyze
from crate_jax.train.loop import train_and_evaluate
from crate_jax.whitebox import segmentation

BATCH_KEYS = ("compression", "rate", "sparsity", "objective")
JSON_NAME = "whitebox_claims.json"


def check_study(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first study setting that cannot run (before any training)."""
    study = config.study
    if not study.get("models"):
        raise ValueError("config study.models: give at least one model to train")
    if study.get("analysis"):
        _check_analysis(study.analysis)
    for name, spec in study.models.items():
        if not spec.get("name"):
            raise ValueError(f"config study.models.{name}.name: a registry model name is needed")


def _check_analysis(a: ml_collections.ConfigDict) -> None:
    if a.data not in analyze.DATA_CHOICES:
        raise ValueError(f"config study.analysis.data={a.data!r}: must be one of "
                         f"{', '.join(analyze.DATA_CHOICES)}")
    if a.batch < 1 or a.num_images % a.batch or a.num_images // a.batch < 2:
        raise ValueError(f"config study.analysis: num_images={a.num_images} must be a multiple "
                         f"of batch={a.batch} with at least two batches (the std over batches "
                         "has ddof 1)")
    for key in ("num_objects", "show"):
        if a[key] < 1:
            raise ValueError(f"config study.analysis.{key}={a[key]}: must be at least 1")


def model_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The plain training config of study model `name` (the study section removed)."""
    spec = config.study.models[name]
    plain = config.to_dict()
    plain.pop("study")
    out = ml_collections.ConfigDict(plain)
    out.model.name = spec.name
    out.model.overrides = ml_collections.ConfigDict(dict(spec.get("overrides") or {}))
    for key, value in dict(spec.get("optim") or {}).items():
        out.optim[key] = value
    return out


def batch_summary(measured: dict[str, np.ndarray], batch: int) -> dict[str, list]:
    """Mean over images and sample std (ddof 1) over the per-batch means of every key of
    BATCH_KEYS: per-image arrays (n, ...) with n a multiple of `batch`."""
    out: dict[str, list] = {}
    for key in BATCH_KEYS:
        values = np.asarray(measured[key], np.float64)
        per_batch = values.reshape(-1, batch, *values.shape[1:]).mean(1)
        out[f"{key}_mean"] = values.mean(0).tolist()
        out[f"{key}_std"] = per_batch.std(0, ddof=1).tolist()
    out["num_batches"] = int(len(values) // batch)
    return out


def _measure(run: analyze.Run, data: dict, a) -> tuple[dict, dict, list]:
    """One model on the images: (layer-wise summary, MaskCut scores, [its MaskCut masks, its
    last layer's [CLS] → patch attention])."""
    cfg = run.model.cfg
    measured = analyze.run_model(run, data["image"], batch=a.batch, layer=cfg.depth - 1,
                                 normalization="reference", eps=None, include_cls=True)
    summary = {"name": run.name, "points": list(range(cfg.depth + 1)),
               "layers": list(range(1, cfg.depth + 1)), **batch_summary(measured, a.batch)}
    predictions = analyze.segment(measured["features"], cfg, a.num_objects)
    scores = segmentation.miou(predictions, list(data["mask"]))
    return summary, scores, [predictions, measured["cls_attention"]]


def _figures(name: str, run: analyze.Run, out: str, data: dict, summaries: list,
             attention: list, a) -> None:
    analyze.plot_layerwise(summaries, os.path.join(out, f"layerwise_{name}.png"),
                           normalization="reference")
    show = min(a.show, len(data["image"]))
    analyze.plot_attention_rows(
        data["image"][:show], [("trained h", attention[0][:show]),
                               ("random h", attention[1][:show])],
        run.model.cfg.grid, os.path.join(out, f"attention_{name}.png"),
        title=f"{name}: [CLS] → patch attention of the last layer")


def analyze_model(name: str, run_dir: str, data: dict, a, out: str) -> tuple[dict, dict]:
    """The JSON entry of one trained model and its MaskCut predictions (trained, random)."""
    run = analyze.load_workdir(run_dir)
    run.name = name
    base = analyze.random_init(run)
    base.name = f"random init ({name})"
    trained, seg_trained, (pred_t, attn_t) = _measure(run, data, a)
    initial, seg_initial, (pred_r, attn_r) = _measure(base, data, a)
    _figures(name, run, out, data, [trained, initial], [attn_t, attn_r], a)
    cfg = run.model.cfg
    entry = {"model": run.config.model.name, "block": cfg.block, "width": cfg.width,
             "depth": cfg.depth, "heads": cfg.heads, "patch_size": cfg.patch_size,
             "image_size": cfg.image_size, "step": run.step,
             # models of one study may train at different rates (a per-model optim entry)
             "optimizer": run.config.optim.name, "lr": float(run.config.optim.lr),
             "layerwise": {"trained": trained, "random_init": initial},
             "segmentation": {"trained": seg_trained, "random_init": seg_initial}}
    return entry, {"trained": pred_t, "random_init": pred_r}


def claims(models: dict[str, dict]) -> dict[str, Any]:
    """The papers' claims, each as the numbers it rests on and whether it holds here."""
    out: dict[str, Any] = {}
    for name, m in models.items():
        lw = {k: m["layerwise"][k] for k in ("trained", "random_init")}
        rc = {k: (v["compression_mean"][0], v["compression_mean"][-1]) for k, v in lw.items()}
        sp = {k: (v["sparsity_mean"][0], v["sparsity_mean"][-1]) for k, v in lw.items()}
        drop = {k: a - b for k, (a, b) in rc.items()}
        rise = {k: b - a for k, (a, b) in sp.items()}
        seg = {k: m["segmentation"][k]["miou"] for k in ("trained", "random_init")}
        out[name] = {
            "compression_first_last": rc, "compression_drop": drop,
            "compression_falls_more_than_random": bool(drop["trained"] > max(
                drop["random_init"], 0.0)),
            "sparsity_first_last": sp, "sparsity_rise": rise,
            "sparsity_rises_more_than_random": bool(rise["trained"] > max(
                rise["random_init"], 0.0)),
            "miou": seg, "segments_better_than_random": bool(seg["trained"] > seg["random_init"])}
    vit = next((n for n, m in models.items() if m["block"] == "vit"), None)
    for name, m in models.items():
        if vit is not None and m["block"] != "vit":
            out[name]["miou_minus_vit"] = (m["segmentation"]["trained"]["miou"]
                                           - models[vit]["segmentation"]["trained"]["miou"])
    return out


def _segmentation_figure(data: dict, predictions: dict, out: str, show: int) -> None:
    first = next(iter(predictions))
    rows = {name: p["trained"][:show] for name, p in predictions.items()}
    rows[f"random init ({first})"] = predictions[first]["random_init"][:show]
    analyze.plot_segmentation(data["image"][:show], data["mask"][:show], rows,
                              os.path.join(out, "segmentation.png"))


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train every study model (resuming finished ones), analyse them, write the JSON and the
    figures; returns the headline numbers for main's 'final:' line."""
    check_study(config)
    study, a = config.study, config.study.get("analysis")
    t0 = time.perf_counter()
    accuracy: dict[str, dict] = {}
    for name in study.models:
        print(f"study: training {name} ({study.models[name].name})", flush=True)
        final = train_and_evaluate(model_config(config, name), os.path.join(workdir, name))
        accuracy[name] = {k: v for k, v in final.items() if not k.endswith("/count")}
    train_s = time.perf_counter() - t0
    comparison = compare_runs(config, workdir, accuracy)
    if not a:  # a comparison only (configs/demo_tost.py): no white-box analysis
        return comparison
    out = os.path.join(workdir, "analysis")
    os.makedirs(out, exist_ok=True)
    image_size = config.data.image_size
    data = analyze.load_images(a.data, image_size, a.num_images, seed=int(a.get("seed", 0)))
    models, predictions = {}, {}
    for name in study.models:
        print(f"study: analysing {name} and its random initialisation", flush=True)
        models[name], predictions[name] = analyze_model(name, os.path.join(workdir, name),
                                                        data, a, out)
        models[name]["accuracy"] = accuracy[name]
    _segmentation_figure(data, predictions, out, min(a.show, a.num_images))
    analyze.plot_layerwise([m["layerwise"]["trained"] for m in models.values()],
                           os.path.join(out, "layerwise.png"), normalization="reference")
    doc = {"settings": {**a.to_dict(), "image_size": image_size, "normalization": "reference",
                        "features": "last layer output, patch tokens",
                        "std": "sample std (ddof 1) of the per-batch means",
                        "total_steps": config.total_steps, "batch_size": config.batch_size,
                        "train_seconds": train_s,
                        "seconds": time.perf_counter() - t0},
           "patch_oracle": segmentation.miou(segmentation.patch_oracle(
               list(data["mask"]), next(iter(models.values()))["patch_size"]),
               list(data["mask"])),
           "models": models, "claims": claims(models)}
    with open(os.path.join(out, JSON_NAME), "w") as f:
        json.dump(doc, f, indent=1)
    _copy_to_docs(out, study.get("docs_dir") or "")
    _print_table(doc)
    return {f"{n}/{k}": float(v) for n, m in models.items()
            for k, v in (("top1", m["accuracy"].get("val/top1", float("nan"))),
                         ("miou", m["segmentation"]["trained"]["miou"]))}


def run_figures(workdir: str, top1: float | None) -> dict[str, float | None]:
    """One trained model's row: validation top-1, the median logged step time and XLA's
    planned step memory per device (both from its metrics.jsonl)."""
    text = epath.Path(workdir, "metrics.jsonl").read_text()  # local or gs://
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]
    memory = [r["perf/step_memory_mib"] for r in rows if "perf/step_memory_mib" in r]
    return {"top1": top1, "step_s": float(np.median(times)) if times else None,
            "step_memory_mib": memory[-1] if memory else None}


def compare_runs(config: ml_collections.ConfigDict, workdir: str,
                 finals: dict[str, dict]) -> dict[str, float]:
    """Print and write (WORKDIR/comparison.json) every study model's accuracy, step time and
    step memory side by side; returns them flat ('tost/step_s', ...) for main's final line."""
    rows = {name: {"model": config.study.models[name].name, **run_figures(
        os.path.join(workdir, name), finals[name].get("val/top1"))} for name in finals}
    flat = {f"{name}/{k}": float(v) for name, r in rows.items()
            for k, v in r.items() if k != "model" and v is not None}
    if jax.process_index() != 0:  # one table and one file, however many processes
        return flat
    print(f"{'model':<12} {'registry name':<18} {'val top1':>8} {'step s':>8} "
          f"{'step MiB':>9}", flush=True)
    for name, r in rows.items():
        cells = [("-" if r[k] is None else fmt.format(r[k])) for k, fmt in
                 (("top1", "{:.3f}"), ("step_s", "{:.3f}"), ("step_memory_mib", "{:,.1f}"))]
        print(f"{name:<12} {r['model']:<18} {cells[0]:>8} {cells[1]:>8} {cells[2]:>9}",
              flush=True)
    doc = {"settings": {"image_size": config.data.get("image_size"),
                        "batch_size": config.batch_size, "total_steps": config.total_steps,
                        "step_s": "median of the logged step times",
                        "step_memory_mib": "XLA's planned peak per device"},
           "models": rows}
    epath.Path(workdir, "comparison.json").write_text(json.dumps(doc, indent=1))
    return flat


def _copy_to_docs(out: str, docs_dir: str) -> None:
    if not docs_dir:
        return
    os.makedirs(docs_dir, exist_ok=True)
    for f in sorted(os.listdir(out)):
        if f.endswith((".png", ".json")):
            shutil.copy2(os.path.join(out, f), os.path.join(docs_dir, f))
    print(f"study: figures and {JSON_NAME} copied to {docs_dir}", flush=True)


def _print_table(doc: dict) -> None:
    print("model        top1   Rᶜ first→last (random)      sparsity first→last (random)  "
          "mIoU (random)", flush=True)
    for name, c in doc["claims"].items():
        m = doc["models"][name]
        rc, sp, seg = c["compression_first_last"], c["sparsity_first_last"], c["miou"]
        print(f"{name:<12} {m['accuracy'].get('val/top1', float('nan')):.3f}  "
              f"{rc['trained'][0]:.1f}→{rc['trained'][1]:.1f} "
              f"({rc['random_init'][0]:.1f}→{rc['random_init'][1]:.1f})   "
              f"{sp['trained'][0]:.3f}→{sp['trained'][1]:.3f} "
              f"({sp['random_init'][0]:.3f}→{sp['random_init'][1]:.3f})   "
              f"{seg['trained']:.3f} ({seg['random_init']:.3f})", flush=True)
