"""Emergent segmentation: MaskCut-style normalised cuts on patch features, and their scores.

**The cut** (TokenCut / MaskCut, Shi & Malik's normalised cut on a patch graph):

    S_ij = cos(f_i, f_j)                      f = the last layer's patch features
    W_ij = 1 if S_ij > τ else ε               τ = 0.2, ε = 1e-5 (keeps the graph connected)
    (D − W) x = λ D x,  D = diag(W·1)         x = the second-smallest generalised eigenvector
    bipartition: x > mean(x)

The foreground is the side holding the element of largest |x| (the most salient patch, MaskCut's
rule; the sign of an eigenvector is arbitrary, its largest-magnitude entry is not). The
eigenproblem is solved densely with scipy.linalg.eigh (N is the patch count: hundreds).

The features are used as they are (MaskCut's convention); `center=True` (`--seg-center` on the
command line) subtracts each image's mean patch feature first, which removes a component that
all patches share and that otherwise links every pair of patches above τ.

**Several objects.** After a cut the found patches are removed from the graph and the cut runs
again on the remaining ones, up to `num_objects` times (MaskCut masks the found patches out of
the affinity; removing their nodes is the same graph). A cut stops early when fewer than two
patches remain or the remaining graph has no edge above τ.

**Scores** (`miou`), per image against an integer ground-truth mask (0 background, 1…n objects):

- ``fg_iou``: IoU of the predicted foreground (union of the predicted masks) with the ground
  truth foreground (mask > 0).
- ``miou``: the two-class mean IoU, ½(IoU_fg + IoU_bg), the usual figure for a
  foreground/background segmentation (an empty prediction scores IoU_bg, not 0).
- ``object_iou``: each ground-truth object matched to its best predicted mask (max IoU; one
  predicted mask may serve several objects), averaged over objects.

Every score is averaged over images (``object_iou`` over objects); an image whose union of
prediction and truth is empty counts IoU 1. Masks are made of whole patches, so `patch_oracle`
(the ground truth rounded to patches) gives the ceiling of these scores at a model's patch size.

`coco_panoptic_val` reads COCO val2017 with masks from a prepared TFDS ``coco/2017_panoptic``
(the TFDS config of COCO that carries masks); it raises `DatasetUnavailable` with a message when
the dataset is not available locally, and callers skip the score.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.linalg

TAU = 0.2
EPSILON = 1e-5


def affinity(features: np.ndarray, tau: float = TAU, eps: float = EPSILON) -> np.ndarray:
    """Binary cosine affinity (N, N): 1 where cos(f_i, f_j) > τ, else ε."""
    f = np.asarray(features, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    sim = f @ f.T
    return np.where(sim > tau, 1.0, eps)


def second_eigenvector(w: np.ndarray) -> np.ndarray:
    """The generalised eigenvector of (D − W) x = λ D x with the second-smallest λ."""
    w = np.asarray(w, np.float64)
    d = np.diag(w.sum(1))
    _, vecs = scipy.linalg.eigh(d - w, d, subset_by_index=[1, 1])
    return vecs[:, 0]


def bipartition(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground mask (N,) bool, eigenvector) of one normalised cut of the graph `w`."""
    vec = second_eigenvector(w)
    part = vec > vec.mean()
    seed = int(np.argmax(np.abs(vec)))
    if not part[seed]:
        part = ~part
    return part, vec


def maskcut(features: np.ndarray, num_objects: int = 2, tau: float = TAU,
            eps: float = EPSILON, center: bool = False) -> list[np.ndarray]:
    """Up to `num_objects` disjoint foreground masks (each (N,) bool) of one image's patch
    features (N, d), found by repeated normalised cuts. `center` subtracts the image's mean
    feature first (off by default, as in MaskCut)."""
    features = np.asarray(features, np.float64)
    if center:
        features = features - features.mean(0)
    n = features.shape[0]
    remaining = np.ones(n, bool)
    masks = []
    w_full = affinity(features, tau, eps)
    for _ in range(num_objects):
        idx = np.flatnonzero(remaining)
        if idx.size < 2:
            break
        w = w_full[np.ix_(idx, idx)]
        if not (w > eps).any():
            break
        part, _ = bipartition(w)
        mask = np.zeros(n, bool)
        mask[idx[part]] = True
        masks.append(mask)
        remaining &= ~mask
    return masks


def upsample(mask: np.ndarray, grid: tuple[int, int], factor: int) -> np.ndarray:
    """A patch mask (N,) on a (gh, gw) grid → a pixel mask (gh·factor, gw·factor), nearest."""
    m = np.asarray(mask).reshape(grid)
    return np.repeat(np.repeat(m, factor, axis=0), factor, axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def image_scores(pred_masks: list[np.ndarray], gt_mask: np.ndarray) -> dict[str, object]:
    """Scores of one image: pred_masks (pixel masks, bool (H, W)), gt_mask int (H, W)."""
    gt_mask = np.asarray(gt_mask)
    pred_fg = np.zeros(gt_mask.shape, bool)
    for m in pred_masks:
        pred_fg |= np.asarray(m, bool)
    gt_fg = gt_mask > 0
    fg = _iou(pred_fg, gt_fg)
    bg = _iou(~pred_fg, ~gt_fg)
    objects = [max((_iou(m, gt_mask == k) for m in pred_masks), default=0.0)
               for k in np.unique(gt_mask) if k != 0]
    return {"fg_iou": fg, "miou": 0.5 * (fg + bg), "object_ious": objects}


def miou(pred_masks: list[list[np.ndarray]], gt_masks: list[np.ndarray]) -> dict[str, float]:
    """Scores averaged over images: per image a list of predicted pixel masks and the integer
    ground-truth mask. Returns miou, fg_iou, object_iou, num_images, num_objects."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"miou: {len(pred_masks)} predictions for {len(gt_masks)} masks")
    if not gt_masks:
        raise ValueError("miou: no images")
    scores = [image_scores(p, g) for p, g in zip(pred_masks, gt_masks, strict=True)]
    objects = [v for s in scores for v in s["object_ious"]]
    return {"miou": float(np.mean([s["miou"] for s in scores])),
            "fg_iou": float(np.mean([s["fg_iou"] for s in scores])),
            "object_iou": float(np.mean(objects)) if objects else float("nan"),
            "num_images": len(scores), "num_objects": len(objects)}


def segment_images(features: np.ndarray, grid: tuple[int, int], patch_size: int,
                   num_objects: int = 2, tau: float = TAU,
                   center: bool = False) -> list[list[np.ndarray]]:
    """MaskCut on a batch of patch features (B, N, d): per image its pixel masks."""
    out = []
    for f in np.asarray(features):
        masks = maskcut(f, num_objects, tau, center=center)
        out.append([upsample(m, grid, patch_size) for m in masks])
    return out


def patch_oracle(gt_masks: list[np.ndarray], patch_size: int) -> list[list[np.ndarray]]:
    """The ground truth at patch resolution (a patch takes the label covering most of its
    pixels), upsampled back: what a perfect patch-level segmentation could score, the ceiling
    for masks made of whole patches."""
    out = []
    for gt in gt_masks:
        gt = np.asarray(gt)
        gh, gw = gt.shape[0] // patch_size, gt.shape[1] // patch_size
        blocks = gt[:gh * patch_size, :gw * patch_size].reshape(gh, patch_size, gw, patch_size)
        blocks = blocks.transpose(0, 2, 1, 3).reshape(gh, gw, -1)
        labels = np.array([[np.bincount(b).argmax() for b in row] for row in blocks])
        out.append([upsample(labels.ravel() == k, (gh, gw), patch_size)
                    for k in np.unique(labels) if k != 0])
    return out


# --- COCO val2017 with masks (TFDS coco/2017_panoptic) ----------------------------------------

class DatasetUnavailable(RuntimeError):
    """The dataset is not prepared locally; the message says what was tried."""


COCO_NUM_THING_CLASSES = 80  # panoptic labels 0…79 are 'things' (objects), the rest 'stuff'


def _panoptic_ids(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _center_crop_resize(image: np.ndarray, size: int, resample) -> np.ndarray:
    from PIL import Image
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.ascontiguousarray(image[top:top + s, left:left + s])
    return np.asarray(Image.fromarray(crop).resize((size, size), resample))


def coco_panoptic_val(image_size: int, num_images: int, data_dir: str | None = None
                      ) -> Iterator[dict[str, np.ndarray]]:
    """COCO val2017 images center-cropped and resized to `image_size`, with an instance mask
    (0 background and 'stuff', 1…n the non-crowd 'thing' segments), from a prepared TFDS
    coco/2017_panoptic (ArrayRecord format). Raises DatasetUnavailable, with the command that
    prepares it, when it is not there or only as TFRecord (nothing is downloaded)."""
    from crate_jax.data.tfds_source import TFDSFormatError, open_data_source
    try:  # from the prepared files: the COCO builder's code itself needs tensorflow
        source = open_data_source("coco/2017_panoptic", "validation", data_dir)
    except (FileNotFoundError, TFDSFormatError) as e:
        raise DatasetUnavailable(f"COCO val2017 with masks: {e}") from e
    from PIL import Image
    count = 0
    for i in range(len(source)):
        if count >= num_images:
            break
        ex = source[i]
        ids = _panoptic_ids(ex["panoptic_image"])
        objs = ex["panoptic_objects"]
        mask = np.zeros(ids.shape, np.int32)
        k = 0
        for seg_id, label, crowd in zip(objs["id"], objs["label"], objs["is_crowd"],
                                        strict=True):
            if label < COCO_NUM_THING_CLASSES and not crowd:
                k += 1
                mask[ids == seg_id] = k
        if k == 0 or k > 255:
            continue
        image = np.asarray(ex["image"])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        image = _center_crop_resize(image[..., :3], image_size, Image.BICUBIC)
        mask = _center_crop_resize(mask.astype(np.uint8), image_size, Image.NEAREST)
        count += 1
        yield {"image": image.astype(np.uint8), "mask": mask}
