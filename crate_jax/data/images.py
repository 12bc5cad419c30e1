"""Image-classification sources and their host-side transforms.

Sources (random access, `source[i] -> {'image': uint8 HWC or encoded bytes, 'label': int}`):
    synthetic_shapes   procedurally generated shapes (crate_jax.data.synthetic), no files
    synthetic_scenes   cluttered multi-object scenes labelled by their largest object
                       (crate_jax.data.synthetic_scenes), no files
    tfds               any TFDS image dataset prepared in ArrayRecord format (imagenet2012,
                       cifar10, an ImageNet-21K builder ...), read from its files through
                       crate_jax.data.tfds_source without tensorflow
    folder             ROOT/SPLIT/CLASS_NAME/*.{jpg,jpeg,png,webp}, classes sorted by name
Images leave the host as uint8; normalisation happens on the device.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from crate_jax.data.decode import sample_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class ImageFolder:
    """ROOT/SPLIT/CLASS/*.jpg as a random-access source of {'image': bytes, 'label': int}."""

    def __init__(self, root: str, split: str):
        directory = epath.Path(root) / split
        if not directory.is_dir():
            raise FileNotFoundError(f"data.data_dir: no split directory {directory}")
        self.class_names = sorted(p.name for p in directory.iterdir() if p.is_dir())
        if not self.class_names:
            raise FileNotFoundError(f"data.data_dir: {directory} has no class sub-directories")
        self.files: list[tuple[epath.Path, int]] = [
            (f, label) for label, name in enumerate(self.class_names)
            for f in sorted((directory / name).iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.files:
            raise FileNotFoundError(f"data.data_dir: no images under {directory}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.files[index]
        return {"image": path.read_bytes(), "label": np.int32(label)}


def image_source(data: Any, split: str):
    """The source named by the `data` config section for `split`."""
    kind = data.source
    if kind == "synthetic_shapes":
        from crate_jax.data.synthetic import ShapesClassification
        num = data.get("num_train_examples" if split == "train" else "num_eval_examples")
        return ShapesClassification(split, num_examples=num, image_size=data.image_size,
                                    num_classes=data.num_classes, seed=data.get("seed", 0),
                                    background=data.get("background", "texture"))
    if kind == "synthetic_scenes":
        from crate_jax.data.synthetic_scenes import ShapesScenes
        num = data.get("num_train_examples" if split == "train" else "num_eval_examples")
        return ShapesScenes(split, num_examples=num, image_size=data.image_size,
                            num_classes=data.num_classes, seed=data.get("seed", 0),
                            min_objects=data.get("min_objects", 2),
                            max_objects=data.get("max_objects", 4))
    if kind == "tfds":
        from crate_jax.data.tfds_source import open_data_source
        return open_data_source(data.name, split, data.get("data_dir"), setting="data")
    if kind == "folder":
        return ImageFolder(data.data_dir, split)
    raise ValueError(f"data.source: unknown source {kind!r}; "
                     "use 'synthetic_shapes', 'synthetic_scenes', 'tfds' or 'folder'")


def to_pil(image: Any) -> Image.Image:
    if isinstance(image, bytes | bytearray):
        return Image.open(io.BytesIO(image)).convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2 or array.shape[-1] == 1:
        array = np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def inception_crop(image: Image.Image, rng: np.random.Generator, size: int, *,
                   area: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A random crop of `area` × the image area and aspect ratio in `ratio` (log-uniform),
    resized to size × size; falls back to a centre crop after 10 failed draws."""
    x, y, w, h = sample_crop(*image.size, rng, area, ratio)
    return image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))


INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
DEFAULT_EVAL_CROP = 0.875  # image classification's; contrastive runs default to 1.0


def resize_center_crop(image: Image.Image, size: int, crop_fraction: float = DEFAULT_EVAL_CROP,
                       interpolation: str = "bicubic") -> Image.Image:
    """torchvision's Resize(S) + CenterCrop(size) with S = floor(size / crop_fraction): the
    short side becomes S and the long side floor(S · long / short) (torchvision truncates),
    then the centre size × size is cut at offset round((side − size) / 2), Python's round
    as torchvision uses it. crop_fraction 1.0 with 'bilinear' is the CRATE-α-CLIPA release's
    eval_in1k.py; 0.875 with 'bicubic' is DINO's and timm's ImageNet evaluation."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"eval_interpolation: {interpolation!r}; use one of "
                         f"{sorted(INTERPOLATIONS)}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"eval_crop_fraction: {crop_fraction!r}; must be in (0, 1]")
    width, height = image.size
    short_target = int(size / crop_fraction + 1e-6)  # 224 / 0.875 is 256, not 255.99...
    if width <= height:
        w, h = short_target, int(short_target * height / width)
    else:
        w, h = int(short_target * width / height), short_target
    if (w, h) != (width, height):
        image = image.resize((w, h), INTERPOLATIONS[interpolation])
    x, y = round((w - size) / 2.0), round((h - size) / 2.0)  # half to even, as torchvision
    return image.crop((x, y, x + size, y + size))


def eval_resize_settings(data: Any, default_crop: float = DEFAULT_EVAL_CROP
                         ) -> tuple[float, str]:
    """(crop fraction, interpolation) of a run's evaluation images: data.eval_crop_fraction
    (default `default_crop`) and data.eval_interpolation (default 'bicubic')."""
    crop = data.get("eval_crop_fraction", None)
    return (default_crop if crop is None else float(crop),
            data.get("eval_interpolation", None) or "bicubic")


def train_transform(data: Any):
    """example, rng -> {'image': uint8 (S, S, 3), 'label'}: data.train_augment ('inception_crop',
    'flip' or 'none'), then data.randaugment = (num_ops, magnitude) and data.color_jitter =
    strength when set, then a random horizontal flip (unless 'none')."""
    from crate_jax.data import augment as aug

    size, augment = data.image_size, data.get("train_augment", "inception_crop")
    if augment not in ("inception_crop", "flip", "none"):
        raise ValueError(f"data.train_augment: {augment!r}; use 'inception_crop', 'flip' "
                         "or 'none'")
    randaugment = data.get("randaugment")
    if randaugment is not None and len(randaugment) != 2:
        raise ValueError(f"data.randaugment: (num_ops, magnitude), got {randaugment!r}")
    jitter = data.get("color_jitter", 0.0) or 0.0

    def transform(example: dict, rng: np.random.Generator) -> dict:
        image = to_pil(example["image"])
        if augment == "inception_crop":
            image = inception_crop(image, rng, size)
        elif image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        if randaugment is not None:
            image = aug.randaugment(image, rng, *randaugment)
        if jitter:
            image = aug.color_jitter(image, rng, brightness=jitter, contrast=jitter,
                                     saturation=jitter)
        array = np.asarray(image, np.uint8)
        if augment != "none" and rng.random() < 0.5:
            array = array[:, ::-1]
        return {"image": np.ascontiguousarray(array), "label": np.int32(example["label"])}

    return transform


def eval_transform(data: Any):
    """example -> {'image': uint8 (S, S, 3), 'label'}: resize and centre crop."""
    size = data.image_size
    crop, interpolation = eval_resize_settings(data)

    def transform(example: dict) -> dict:
        image = to_pil(example["image"])
        if image.size != (size, size):
            image = resize_center_crop(image, size, crop, interpolation)
        return {"image": np.asarray(image, np.uint8), "label": np.int32(example["label"])}

    return transform
