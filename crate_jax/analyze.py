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
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import numpy as np

from crate_jax.whitebox.plots import pyplot

DATA_CHOICES = ("synthetic_shapes", "synthetic_segmentation", "synthetic_scenes")
SHOW_IMAGES = 8


@dataclasses.dataclass
class Run:
    name: str
    source: str
    config: Any  # ml_collections.ConfigDict
    model: Any  # VisionTransformer (the image tower of a CLIP model, an MAE's encoder, ...)
    step: int | None = None
    full: Any = None  # the task's whole model (an MAE with its decoder, SimDINO's pair)


# --- loading ---------------------------------------------------------------------------------

def _read_config(path: str, flag: str):
    import ml_collections
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag}: no config.json at {path} (a run's workdir holds the "
                                "resolved config the model is built from)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _image_tower(model, config, flag: str):
    """The image model inside a task's model: CLIP's image tower, a masked autoencoder's
    encoder ('backbone'), SimDINO's teacher backbone, or the model itself."""
    from crate_jax.models.tost import ToSTVision
    from crate_jax.models.vision import VisionTransformer
    teacher = getattr(model, "teacher", None)
    tower = (getattr(model, "image", None) or getattr(model, "backbone", None)
             or getattr(teacher, "backbone", None) or model)
    if not isinstance(tower, VisionTransformer | ToSTVision):
        raise ValueError(f"{flag}: config trainer {config.get('trainer')!r} builds "
                         f"{type(model).__name__}, not an image model")
    if tower.cfg.block not in ("crate", "crate_alpha", "tost", "vit"):
        raise ValueError(f"{flag}: model block {tower.cfg.block!r} is not CRATE, CRATE-α, "
                         "ToST or ViT (the baseline, measured on its value projections); "
                         "the white-box measurements need attention subspaces and codes")
    return tower


def _task(config, flag: str):
    from crate_jax import tasks
    try:
        return tasks.get(config.trainer)(config)
    except (ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"{flag}: the run's config does not describe an image model ({e})") \
            from e


@functools.lru_cache(maxsize=8)
def _initial_state(config_json: str, seed: int, flag: str):
    """(graphdef, state) of the task's freshly initialised model, initialised under one jit
    (much faster than op by op) and cached per config: a run and its random initialisation
    share it."""
    import jax
    import ml_collections
    from flax import nnx
    task = _task(ml_collections.ConfigDict(json.loads(config_json)), flag)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(params=0, dropout=1)))
    graphdef, _ = nnx.split(abstract)

    def init():
        model = task.build_model(nnx.Rngs(params=seed, dropout=seed + 1))
        return nnx.state(model)

    return graphdef, jax.jit(init)()


def build_model(config, *, seed: int = 0, flag: str = "--workdir"):
    """The task's model for a run config (fresh parameters from `seed`), and its image tower."""
    from flax import nnx
    graphdef, state = _initial_state(config.to_json(sort_keys=True), seed, flag)
    model = nnx.merge(graphdef, state, copy=True)  # never share Variables with the cache
    return model, _image_tower(model, config, flag)


def _with_params(model, params: dict, batch_stats: dict | None = None):
    """`model` with the checkpoint's parameters and, for models with BatchNorm (ToST), its
    running statistics (without them eval mode would use the initial 0 / 1)."""
    from flax import nnx

    from crate_jax.models.state import set_batch_stats
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return set_batch_stats(model, batch_stats)


def _batch_stats(directory: str, step: int | None) -> dict:
    import jax
    from etils import epath

    from crate_jax.train.checkpoint import Checkpointer
    checkpointer = Checkpointer(epath.Path(os.path.abspath(directory)), async_save=False)
    try:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.device_get(checkpointer.restore_batch_stats(step, sharding))
    finally:
        checkpointer.close()


def load_workdir(workdir: str) -> Run:
    from crate_jax.train.loop import final_params
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir: {workdir} does not exist")
    config = _read_config(os.path.join(workdir, "config.json"), "--workdir")
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
    if not steps:
        raise FileNotFoundError(f"--workdir: {workdir} has no checkpoint in {ckpt}")
    model, tower = build_model(config, seed=int(config.get("seed", 0)), flag="--workdir")
    _with_params(model, final_params(workdir), _batch_stats(ckpt, None))
    model.eval()
    return Run(os.path.basename(os.path.normpath(workdir)), workdir, config, tower, max(steps),
               model)


def load_checkpoint(path: str) -> Run:
    """A run from a checkpoints directory (WORKDIR/checkpoints, latest step), a step directory
    (WORKDIR/checkpoints/STEP) or a workdir; the config is the workdir's config.json."""
    from etils import epath

    from crate_jax.train.checkpoint import Checkpointer
    path = os.path.abspath(path)  # orbax takes absolute paths only
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint: {path} does not exist")
    step = None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        directory, workdir = os.path.join(path, "checkpoints"), path
    elif os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
        workdir = os.path.dirname(directory)
    else:
        directory, workdir = path, os.path.dirname(path)
    config = _read_config(os.path.join(workdir, "config.json"), "--checkpoint")
    import jax
    checkpointer = Checkpointer(epath.Path(directory), async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.manager.all_steps():
            raise FileNotFoundError(f"--checkpoint: no checkpoint step in {path}")
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = jax.device_get(checkpointer.restore_params(step, sharding))
        stats = jax.device_get(checkpointer.restore_batch_stats(step, sharding))
    finally:
        checkpointer.close()
    model, tower = build_model(config, seed=int(config.get("seed", 0)), flag="--checkpoint")
    _with_params(model, params, stats)
    model.eval()
    name = f"{os.path.basename(workdir)}@{step}"
    return Run(name, path, config, tower, step, model)


def random_init(run: Run) -> Run:
    """The run's model at initialisation (its config's seed: the trained run's start point)."""
    model, tower = build_model(run.config, seed=int(run.config.get("seed", 0)))
    model.eval()
    return Run("random init", f"random init of {run.name}", run.config, tower, 0, model)


def normalization_constants(config) -> tuple[np.ndarray, np.ndarray]:
    from crate_jax.tasks.classification import IMAGENET_MEAN, IMAGENET_STD
    from crate_jax.tasks.contrastive import CLIP_MEAN, CLIP_STD
    clip = config.get("trainer") == "contrastive"
    data = config.get("data") or {}
    mean = data.get("mean") or (CLIP_MEAN if clip else IMAGENET_MEAN)
    std = data.get("std") or (CLIP_STD if clip else IMAGENET_STD)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def load_images(data: str, image_size: int, num_images: int, seed: int = 0) -> dict:
    """{'image': uint8 (n, S, S, 3), 'mask': uint8 (n, S, S) or None} from the test split."""
    from crate_jax.data import synthetic
    if data == "synthetic_shapes":
        source = synthetic.ShapesClassification("test", num_examples=num_images,
                                                image_size=image_size, num_classes=8, seed=seed)
    elif data == "synthetic_segmentation":
        source = synthetic.ShapesSegmentation("test", num_examples=num_images,
                                              image_size=image_size, max_objects=2, seed=seed)
    elif data == "synthetic_scenes":  # cluttered multi-object scenes (whitebox_claims)
        from crate_jax.data.synthetic_scenes import ShapesScenes
        source = ShapesScenes("test", num_examples=num_images, image_size=image_size, seed=seed)
    else:
        raise ValueError(f"--data: unknown data {data!r}; use one of {', '.join(DATA_CHOICES)}")
    examples = [source[i] for i in range(num_images)]
    images = np.stack([e["image"] for e in examples])
    masks = np.stack([e["mask"] for e in examples]) if "mask" in examples[0] else None
    return {"image": images, "mask": masks}


# --- measuring -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _forward_fn(graphdef, mean: tuple, std: tuple, layer: int, normalization: str,
                eps: float | None, include_cls: bool):
    """One jitted forward per (graph, settings): the trained model and its random
    initialisation share the compiled function."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from crate_jax.whitebox.coding_rate import measure

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
    import jax
    from flax import nnx

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


def _decoder_summaries(runs: list[Run], summaries: list[dict], images: np.ndarray,
                       args) -> list[dict]:
    """Adds 'decoder' (Rᶜ through the CRATE decoder) to the summary of every masked
    autoencoder run; returns those summaries."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from crate_jax.whitebox.autoencoder import decoder_summary, has_crate_decoder, measure_decoder
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
    from crate_jax.whitebox.coding_rate import summarize
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
    from crate_jax.whitebox.segmentation import segment_images
    return segment_images(features, cfg.grid, cfg.patch_size, num_objects=num_objects,
                          center=center)


def _coco_scores(runs: list[Run], args, batch: int, layer: int) -> dict[str, Any]:
    from crate_jax.whitebox import segmentation
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


# --- figures ---------------------------------------------------------------------------------

def _plt():
    return pyplot()


def plot_layerwise(summaries: list[dict], path: str, *, normalization: str) -> None:
    plt = _plt()
    fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        is_random = s["name"].startswith("random init")
        style = dict(color="0.45" if is_random else colors[i % len(colors)],
                     linestyle="--" if is_random else "-", marker="o", markersize=3.5)
        for ax, x, key in ((ax_c, s["points"], "compression"), (ax_s, s["layers"], "sparsity")):
            mean, std = np.asarray(s[f"{key}_mean"]), np.asarray(s[f"{key}_std"])
            ax.plot(x, mean, label=s["name"], **style)
            ax.fill_between(x, mean - std, mean + std, color=style["color"], alpha=0.2,
                            linewidth=0)
    ax_c.set_title(f"Compression $R^c(Z^\\ell; U^\\ell)$ ({normalization})")
    ax_c.set_xlabel("layer index ℓ (0 = embedding)")
    ax_c.set_ylabel("$R^c$")
    ax_s.set_title("Sparsity of the codes (fraction of zeros)")
    ax_s.set_xlabel("layer index ℓ")
    ax_s.set_ylabel("sparsity")
    for ax in (ax_c, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _resize_map(values: np.ndarray, size: int, bilinear: bool = True) -> np.ndarray:
    from PIL import Image
    img = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.BILINEAR if bilinear else Image.NEAREST))


def plot_attention(images: np.ndarray, cls_attention: np.ndarray, grid: tuple[int, int],
                   path: str, *, title: str) -> None:
    """cls_attention (n, K, N): rows = heads, columns = images."""
    plot_attention_rows(images, [("head ", cls_attention)], grid, path, title=title)


def plot_attention_rows(images: np.ndarray, groups: list[tuple[str, np.ndarray]],
                        grid: tuple[int, int], path: str, *, title: str) -> None:
    """One row per head of every (label, maps (n, K, N)) group, labelled label + head index,
    one column per image; each map min-max scaled and upsampled over its image."""
    plt = _plt()
    n, size = len(images), images.shape[1]
    rows = [(f"{label}{k}", maps[:, k]) for label, maps in groups for k in range(maps.shape[1])]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.4 * len(rows) + 0.4),
                             squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for j in range(n):
            amap = maps[j].reshape(grid)
            amap = (amap - amap.min()) / max(float(np.ptp(amap)), 1e-12)
            ax = axes[r, j]
            ax.imshow(images[j])
            ax.imshow(_resize_map(amap, size), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """Features (n, N, d) → the first three principal components (fitted jointly on every
    patch) scaled to [0, 1] per component: (n, N, 3)."""
    n, m, d = features.shape
    x = features.reshape(-1, d).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(0), comps.max(0)
    rgb = (comps - lo) / np.maximum(hi - lo, 1e-12)
    return rgb.reshape(n, m, 3)


def plot_pca(images: np.ndarray, features: np.ndarray, grid: tuple[int, int], path: str, *,
             title: str) -> None:
    plt = _plt()
    n, size = len(images), images.shape[1]
    rgb = pca_rgb(features).reshape(n, *grid, 3)
    factor = size // grid[0]
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        axes[1, j].imshow(np.repeat(np.repeat(rgb[j], factor, 0), factor, 1))
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("PCA 1-3", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    palette = np.array([[0, 0, 0], [255, 64, 64], [64, 160, 255], [255, 220, 0], [0, 220, 120],
                        [220, 80, 255], [255, 140, 0], [0, 230, 230]], np.float32)
    out = image.astype(np.float32).copy()
    fg = label > 0
    colour = palette[1 + (label[fg] - 1) % (len(palette) - 1)]
    out[fg] = 0.45 * out[fg] + 0.55 * colour
    return out.astype(np.uint8)


def _label_map(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    label = np.zeros(shape, np.int32)
    for i, m in enumerate(masks, start=1):
        label[np.asarray(m, bool) & (label == 0)] = i
    return label


def plot_segmentation(images: np.ndarray, gt: np.ndarray, predictions: dict[str, list],
                      path: str) -> None:
    plt = _plt()
    n = len(images)
    rows = [("image", None), ("ground truth", None), *predictions.items()]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.45 * len(rows)), squeeze=False)
    for j in range(n):
        shape = images[j].shape[:2]
        panels = [images[j], _overlay(images[j], gt[j])]
        panels += [_overlay(images[j], _label_map(p[j], shape)) for p in predictions.values()]
        for i, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, (name, _) in enumerate(rows):
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("MaskCut on the last layer's patch features", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command -----------------------------------------------------------------------------

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
        args.out = os.path.join(args.workdir[0], "analysis")
    if args.data not in DATA_CHOICES:
        p.error(f"--data: unknown data {args.data!r}; use one of {', '.join(DATA_CHOICES)}")
    if args.seg_images is None:
        args.seg_images = min(args.num_images, 64)
    for flag in ("num_images", "batch", "seg_images", "show", "num_objects"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `main` does, for a parsed namespace; returns the two JSON documents."""
    from crate_jax.whitebox import segmentation
    t0 = time.perf_counter()
    runs = [load_workdir(w) for w in args.workdir] + [load_checkpoint(c) for c in args.checkpoint]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # distinct names for the legend and the JSON
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({i})"
    primary = runs[0]
    baseline = random_init(primary)
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
    data = load_images(args.data, cfg.image_size, args.num_images)
    measured_runs = runs + ([baseline] if args.random_init else [])
    kw = dict(batch=args.batch, layer=layer, normalization=args.normalization, eps=args.eps,
              include_cls=not args.exclude_cls)
    measured = {r.name: run_model(r, data["image"], **kw) for r in measured_runs}
    summaries = [run_summary(r, measured[r.name]) for r in measured_runs]
    settings = {"data": args.data, "num_images": args.num_images,
                "normalization": args.normalization,
                "eps": args.eps if args.eps is not None else
                (0.1 if args.normalization == "reference" else 0.5),
                "include_cls": not args.exclude_cls, "attention_layer": layer}
    autoencoders = _decoder_summaries(measured_runs, summaries, data["image"], args)
    layerwise = {"settings": settings, "runs": summaries}
    with open(os.path.join(args.out, "layerwise.json"), "w") as f:
        json.dump(layerwise, f, indent=1)
    plot_layerwise(summaries, os.path.join(args.out, "layerwise.png"),
                   normalization=args.normalization)
    if autoencoders:
        from crate_jax.whitebox.autoencoder import plot_autoencoder
        plot_autoencoder(autoencoders, os.path.join(args.out, "layerwise_autoencoder.png"),
                         normalization=args.normalization)

    first = measured[primary.name]
    show = min(args.show, len(data["image"]))
    plot_attention(data["image"][:show], first["cls_attention"][:show], cfg.grid,
                   os.path.join(args.out, f"attention_layer{layer}.png"),
                   title=(f"{primary.name}: TSSA membership Π (attention's analogue), "
                          f"layer {layer} (rows: heads)" if cfg.block == "tost" else
                          f"{primary.name}: [CLS] → patch attention, layer {layer} "
                          "(rows: heads)"))
    plot_pca(data["image"][:show], first["features"][:show], cfg.grid,
             os.path.join(args.out, "pca.png"),
             title=f"{primary.name}: PCA of the last layer's patch features")

    # Segmentation: the analysed images when they have masks, else synthetic segmentation.
    if data["mask"] is not None and args.seg_images <= len(data["image"]):
        seg = {"image": data["image"][:args.seg_images], "mask": data["mask"][:args.seg_images]}
        features = {r.name: measured[r.name]["features"][:args.seg_images]
                    for r in measured_runs}
    else:
        seg = load_images("synthetic_segmentation", cfg.image_size, args.seg_images)
        features = {}
    seg_runs = [*runs, baseline]
    predictions, scores = {}, {}
    for r in seg_runs:
        feats = features.get(r.name)
        if feats is None:
            feats = run_model(r, seg["image"], **kw)["features"]
        predictions[r.name] = segment(feats, r.model.cfg, args.num_objects, args.seg_center)
        scores[r.name] = segmentation.miou(predictions[r.name], list(seg["mask"]))
    seg_doc = {"settings": {"images": len(seg["image"]), "num_objects": args.num_objects,
                            "tau": segmentation.TAU, "epsilon": segmentation.EPSILON,
                            "features": "last layer output, patch tokens",
                            "center": args.seg_center, "image_size": cfg.image_size},
               "synthetic_segmentation": scores,
               "synthetic_segmentation_patch_oracle": segmentation.miou(
                   segmentation.patch_oracle(list(seg["mask"]), cfg.patch_size),
                   list(seg["mask"]))}
    if args.coco == "auto":
        seg_doc["coco_val2017"] = _coco_scores(seg_runs, args, args.batch, layer)
    with open(os.path.join(args.out, "segmentation.json"), "w") as f:
        json.dump(seg_doc, f, indent=1)
    plot_segmentation(seg["image"][:show], seg["mask"][:show],
                      {r.name: predictions[r.name][:show] for r in (primary, baseline)},
                      os.path.join(args.out, "segmentation.png"))
    elapsed = time.perf_counter() - t0
    for s in summaries:
        print(f"{s['name']}: Rᶜ {_fmt(s['compression_mean'])} | sparsity "
              f"{_fmt(s['sparsity_mean'])}", flush=True)
    for name, sc in scores.items():
        print(f"segmentation {name}: miou {sc['miou']:.3f} fg_iou {sc['fg_iou']:.3f} "
              f"object_iou {sc['object_iou']:.3f}", flush=True)
    print(f"wrote {args.out} in {elapsed:.1f}s", flush=True)
    return {"layerwise": layerwise, "segmentation": seg_doc}


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3g}" for v in values)


def _language_run(args: argparse.Namespace) -> bool:
    """A language-model workdir (causal or masked) is analysed neuron by neuron
    (whitebox/neurons.py)."""
    if len(args.workdir) != 1 or args.checkpoint:
        return False
    path = os.path.join(args.workdir[0], "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("trainer") in ("lm", "mlm")


def analyze_language(args: argparse.Namespace) -> int:
    """The neuron-level analysis of a language-model run (whitebox/neurons.py) into --out."""
    from crate_jax.generate import load_language_run
    from crate_jax.whitebox import neurons

    run = load_language_run(args.workdir[0], causal=False)
    summary = neurons.analyze_language_run(run, args.out, num_sequences=args.num_sequences,
                                           top_neurons=args.top_neurons,
                                           snippets=args.snippets)
    print(neurons.format_summary(summary))
    print(f"wrote {os.path.join(args.out, 'index.html')}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if _language_run(args):
            return analyze_language(args)
        analyze(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
