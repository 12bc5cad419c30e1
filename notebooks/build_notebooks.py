"""Writes the notebooks of this directory from the cell sources below (outputs cleared):

    python notebooks/build_notebooks.py

quickstart.ipynb       build a model, train the demo classifier briefly, classify a few images
whitebox.ipynb         the layer-wise compression / sparsity figure, attention maps, PCA and
                       MaskCut segmentation of a (briefly) trained demo model
clipa_zero_shot.ipynb  train the CLIPA demo in smoke mode and classify held-out (colour, shape)
                       pairs zero-shot

Every notebook runs top to bottom on a CPU in well under two minutes, from any folder: it needs
only the installed package (the configs it trains come with it, as crate_jax.configs), and its
first cell installs the package from CRATE_JAX_SOURCE when it is missing. tests/test_notebooks.py
runs each one in a fresh folder, against a non-editable install. Edit the cells here, not the
.ipynb.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL_SOURCE = "CRATE_JAX_SOURCE = "
INSTALL = f'''\
# ▶ Where to install crate_jax from when it is not installed yet (e.g. a fresh Colab runtime):
#   a git URL such as "git+https://github.com/<owner>/<repo>.git", or the path of a checkout
#   ("..": the repository this notebook sits in). Nothing is installed when it is importable.
{INSTALL_SOURCE}".."

import importlib

try:
    import crate_jax
except ImportError:
    %pip install -q {{CRATE_JAX_SOURCE}}
    importlib.invalidate_caches()
    import crate_jax
print("crate_jax from", crate_jax.__path__[0])
'''

QUIET = '''\
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from absl import logging

logging.set_verbosity("warning")  # orbax logs every checkpoint step at INFO
print("jax", jax.__version__, "on", jax.devices())
'''

# A finished demo run: $CRATE_JAX_DEMO_RUN, or runs/demo_classification where the README's
# command writes it (this folder, or the repository root above notebooks/).
FIND_DEMO_RUN = '''\
candidates = [os.environ.get("CRATE_JAX_DEMO_RUN", ""), "runs/demo_classification",
              "../runs/demo_classification"]
RUN_DIR = next((d for d in candidates if d and os.path.isdir(os.path.join(d, "checkpoints"))),
               None)
'''


def _nb(cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    return nb


def quickstart() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# crate_jax quickstart\n\n"
            "Build a CRATE-α model, train the demo classifier on the built-in synthetic shapes "
            "for a few seconds, and classify test images. Nothing is downloaded; everything "
            "runs on a CPU."),
        new_code_cell(INSTALL),
        new_code_cell(QUIET),
        new_markdown_cell(
            "## Models\n\n"
            "`models.create(name, **overrides)` builds any registry model; every field of the "
            "config can be overridden. `collect=True` also returns the per-layer intermediates "
            "the white-box analysis reads."),
        new_code_cell('''\
from crate_jax import models

model = models.create("crate-alpha-ti/8", width=64, depth=4, heads=2, image_size=32,
                      num_classes=8)
print(f"{models.count_params(model):,} parameters")
logits, inter = model(jnp.zeros((2, 32, 32, 3)), collect=True)
print("logits", logits.shape)
for key, value in inter.items():
    print(f"{key:12s} {tuple(value.shape)}")
'''),
        new_markdown_cell(
            "## Train the demo classifier\n\n"
            "`configs/demo_classification.py` in smoke mode (a toy CRATE-α at 16 px, 4 "
            "classes), for a few dozen steps into a temporary directory: enough to run every "
            "piece, not to learn the task (expect chance-level accuracy). The full demo, "
            "`python -m crate_jax.main --config=configs/demo_classification.py "
            "--workdir=runs/demo_classification`, reaches about 85 % top-1 on 8 classes in "
            "about two minutes on a CPU; when that run exists (or `$CRATE_JAX_DEMO_RUN` names "
            "one) it is used instead. The configs come with the package: "
            "`crate_jax.configs.demo_classification` is `configs/demo_classification.py`."),
        new_code_cell('''\
from crate_jax.configs import demo_classification
from crate_jax.train.loop import train_and_evaluate

''' + FIND_DEMO_RUN + '''if RUN_DIR is None:
    config = demo_classification.get_config("smoke")
    config.total_steps = config.optim.total_steps = 60
    config.optim.warmup_steps = 5
    config.log_every = 20
    config.checkpoint.every = 60
    config.checkpoint.async_save = False
    config.tensorboard = False
    RUN_DIR = tempfile.mkdtemp(prefix="crate_quickstart_")
    final = train_and_evaluate(config, RUN_DIR)
    print({k: round(v, 3) for k, v in final.items()})
print("run:", RUN_DIR)
'''),
        new_markdown_cell(
            "## Classify test images\n\n"
            "`crate_jax.analyze.load_workdir` rebuilds a run's model from its `config.json` and "
            "loads its latest checkpoint."),
        new_code_cell('''\
from crate_jax import analyze
from crate_jax.data.synthetic import ShapesClassification

run = analyze.load_workdir(RUN_DIR)
data = run.config.data
test = ShapesClassification("test", image_size=data.image_size, num_classes=data.num_classes,
                            num_examples=8)
images = np.stack([test[i]["image"] for i in range(len(test))])
labels = np.array([test[i]["label"] for i in range(len(test))])
mean, std = analyze.normalization_constants(run.config)
logits = run.model(jnp.asarray((images / 255.0 - mean) / std, jnp.float32))
pred = np.asarray(logits.argmax(-1))
print(f"{(pred == labels).mean():.0%} of {len(labels)} correct")

fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 2.1))
for ax, image, p, t in zip(axes, images, pred, labels):
    ax.imshow(image)
    ax.set_title(f"{test.class_names[p]}\\n(true: {test.class_names[t]})", fontsize=7,
                 color="green" if p == t else "red")
    ax.axis("off")
plt.show()
'''),
    ])


def whitebox() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# White-box measurements\n\n"
            "Each CRATE layer is one step of alternating minimisation of the sparse rate "
            "reduction objective: MSSA compresses the tokens against K subspaces, ISTA / ODL "
            "sparsifies them. This notebook measures both terms layer by layer — the "
            "compression term Rᶜ(Z; U) = Σ_k R(Z U_k) and the sparsity of the codes — for a "
            "trained model and its random initialisation, and shows the [CLS] attention maps, "
            "a PCA of the patch features and MaskCut segmentation.\n\n"
            "The same outputs come from the command line:\n\n"
            "```\npython -m crate_jax.analyze --workdir=runs/demo_classification --random-init "
            "--data=synthetic_shapes --out=analysis\n```"),
        new_code_cell(INSTALL),
        new_code_cell(QUIET + '''
from IPython.display import Image, display

OUT = tempfile.mkdtemp(prefix="crate_whitebox_")
'''),
        new_markdown_cell(
            "## A trained demo model\n\n"
            "A finished `demo_classification` run is used when one exists (the command above "
            "trains it in about two minutes, to about 85 % top-1); otherwise a short version "
            "(a small CRATE-α at 32 px, 4×4 patches, depth 4) is trained here for a few "
            "seconds, which is enough to see the code path but not the trained behaviour."),
        new_code_cell('''\
from crate_jax.configs import demo_classification
from crate_jax.train.loop import train_and_evaluate

''' + FIND_DEMO_RUN + '''if RUN_DIR is None:
    config = demo_classification.get_config("smoke")
    config.data.image_size = 32
    config.data.num_classes = 8
    config.model.overrides.depth = 4
    config.total_steps = config.optim.total_steps = 80
    config.optim.warmup_steps = 5
    config.log_every = 40
    config.checkpoint.every = 80
    config.checkpoint.async_save = False
    config.tensorboard = False
    RUN_DIR = tempfile.mkdtemp(prefix="crate_whitebox_run_")
    train_and_evaluate(config, RUN_DIR)
print("run:", RUN_DIR)
'''),
        new_markdown_cell(
            "## Compression and sparsity, layer by layer\n\n"
            "Rᶜ at layer ℓ is measured on the tokens entering layer ℓ's MSSA, projected by that "
            "layer's LayerNorm and U (point 0 is the embedding, the last point the output of the "
            "last layer), with every head vector scaled to unit length and ε² = 0.01 (the "
            "reference measurement; `normalization='paper'` uses the raw projections and "
            "ε = 0.5). Sparsity is the fraction of zeros of each layer's sparse code. "
            "Conventions: `crate_jax/whitebox/coding_rate.py`."),
        new_code_cell('''\
from crate_jax import analyze

run = analyze.load_workdir(RUN_DIR)
baseline = analyze.random_init(run)
cfg = run.model.cfg
images = analyze.load_images("synthetic_shapes", cfg.image_size, 64)["image"]
settings = dict(batch=64, layer=cfg.depth - 1, normalization="reference", eps=None,
                include_cls=True)
measured = {r.name: analyze.run_model(r, images, **settings) for r in (run, baseline)}
summaries = [analyze.run_summary(r, measured[r.name]) for r in (run, baseline)]
for s in summaries:
    print(f"{s['name']:>20s}  Rᶜ:", np.round(s["compression_mean"], 1),
          " sparsity:", np.round(s["sparsity_mean"], 3))
analyze.plot_layerwise(summaries, f"{OUT}/layerwise.png", normalization="reference")
display(Image(f"{OUT}/layerwise.png"))
'''),
        new_markdown_cell(
            "The coding rate itself is a function of any token set: "
            "R(Z) = ½ logdet(I + p/(N ε²) ZᵀZ), computed on the smaller Gram side."),
        new_code_cell('''\
from crate_jax.whitebox.coding_rate import coding_rate

rng = np.random.default_rng(0)
full = rng.normal(size=(64, 16)).astype(np.float32)
low_rank = (rng.normal(size=(64, 2)) @ rng.normal(size=(2, 16))).astype(np.float32)
print("R(full rank) =", float(coding_rate(full, 0.25)),
      " R(rank 2) =", float(coding_rate(low_rank, 0.25)))
'''),
        new_markdown_cell("## [CLS] attention of the last layer (rows: heads)"),
        new_code_cell('''\
show = 8
path = f"{OUT}/attention_layer{cfg.depth - 1}.png"
analyze.plot_attention(images[:show], measured[run.name]["cls_attention"][:show], cfg.grid,
                       path, title=f"[CLS] → patch attention, layer {cfg.depth - 1}")
display(Image(path))
'''),
        new_markdown_cell("## PCA of the last layer's patch features, and MaskCut segmentation"),
        new_code_cell('''\
from crate_jax.whitebox import segmentation

analyze.plot_pca(images[:show], measured[run.name]["features"][:show], cfg.grid,
                 f"{OUT}/pca.png", title="first three principal components as RGB")
display(Image(f"{OUT}/pca.png"))

seg = analyze.load_images("synthetic_segmentation", cfg.image_size, 32)
predictions = {}
for r in (run, baseline):
    features = analyze.run_model(r, seg["image"], **settings)["features"]
    predictions[r.name] = analyze.segment(features, r.model.cfg, num_objects=2)
    scores = segmentation.miou(predictions[r.name], list(seg["mask"]))
    print(f"{r.name:>20s}  mIoU {scores['miou']:.3f}  foreground IoU {scores['fg_iou']:.3f}")
analyze.plot_segmentation(seg["image"][:show], seg["mask"][:show],
                          {k: v[:show] for k, v in predictions.items()},
                          f"{OUT}/segmentation.png")
display(Image(f"{OUT}/segmentation.png"))
'''),
    ])


def clipa_zero_shot() -> nbformat.NotebookNode:
    return _nb([
        new_markdown_cell(
            "# CLIPA zero-shot classification\n\n"
            "Train the CLIPA demo (`configs/demo.py`: a CRATE-α image tower and a text tower "
            "on synthetic shapes with captions) in smoke mode, then classify test images of "
            "(colour, shape) pairs that never appear in training by comparing their embeddings "
            "with those of prompts such as 'a photo of a red star.'. Chance is 1 / (number of "
            "held-out pairs). A smoke run is far too short to learn the task; the full demo "
            "(`python -m crate_jax.main --config=configs/demo.py`) takes a few minutes."),
        new_code_cell(INSTALL),
        new_code_cell(QUIET),
        new_code_cell('''\
import ml_collections

from crate_jax.configs import demo
from crate_jax.train.loop import train_and_evaluate

config = demo.get_config("smoke")
config.evals = ml_collections.ConfigDict({"zeroshot": config.evals.zeroshot.to_dict()})
config.total_steps = config.optim.total_steps = 40
config.log_every = 20
config.checkpoint.every = 40
config.checkpoint.async_save = False
config.tensorboard = False
RUN_DIR = tempfile.mkdtemp(prefix="crate_clipa_")
final = train_and_evaluate(config, RUN_DIR)
print({k: round(v, 3) for k, v in final.items()})
'''),
        new_markdown_cell(
            "## Zero-shot by hand\n\n"
            "Class embedding = the normalised mean of the normalised text embeddings of every "
            "prompt template filled with the class name; an image is assigned the class whose "
            "embedding is closest (cosine) to its image embedding. "
            "(`crate_jax.evals.clip.ZeroShotEvaluator` does the same over a whole split.)"),
        new_code_cell('''\
from flax import nnx

from crate_jax import tasks
from crate_jax.data import image_text
from crate_jax.data.synthetic import ShapesCaptions
from crate_jax.data.tokenizer import tokenize
from crate_jax.evals.clip import read_templates
from crate_jax.train.loop import final_params

task = tasks.get(config.trainer)(config)
graphdef, _, rest = nnx.split(task.build_model(nnx.Rngs(0)), nnx.Param, ...)
model = nnx.merge(graphdef, final_params(RUN_DIR), rest)
model.eval()

spec = config.evals.zeroshot
class_names, heldout = image_text.class_names(spec)
templates = read_templates()
tokenizer = image_text.tokenizer_for(config.data)
prompts = [t.format(class_names[c]) for c in heldout for t in templates]
text = model.encode_text(jnp.asarray(tokenize(tokenizer, prompts, config.data.context_length)))
text = np.array(text).reshape(len(heldout), len(templates), -1)
text /= np.linalg.norm(text, axis=-1, keepdims=True)
classes = text.mean(1)
classes /= np.linalg.norm(classes, axis=-1, keepdims=True)

test = ShapesCaptions("test", image_size=config.data.image_size, num_examples=48,
                      holdout_pairs=spec.holdout_pairs, seed=config.data.get("seed", 0))
images = np.stack([test[i]["image"] for i in range(len(test))])
labels = np.array([heldout.index(int(test[i]["label"])) for i in range(len(test))])
emb = np.asarray(model.encode_image(task.preprocess({"image": jnp.asarray(images)})))
pred = (emb @ classes.T).argmax(-1)
print(f"held-out pairs: {[class_names[c] for c in heldout]}")
print(f"zero-shot top-1 on {len(labels)} test images: {(pred == labels).mean():.1%} "
      f"(chance {1 / len(heldout):.1%})")

fig, axes = plt.subplots(1, 8, figsize=(13, 2.2))
for ax, image, p, t in zip(axes, images, pred, labels):
    ax.imshow(image)
    ax.set_title(f"{class_names[heldout[p]]}\\n(true: {class_names[heldout[t]]})", fontsize=7,
                 color="green" if p == t else "red")
    ax.axis("off")
plt.show()
'''),
    ])


NOTEBOOKS = {"quickstart.ipynb": quickstart, "whitebox.ipynb": whitebox,
             "clipa_zero_shot.ipynb": clipa_zero_shot}


def main() -> None:
    for name, build in NOTEBOOKS.items():
        nb = build()
        nbformat.validate(nb)
        nbformat.write(nb, os.path.join(HERE, name))
        print("wrote", os.path.join(HERE, name))


if __name__ == "__main__":
    main()
