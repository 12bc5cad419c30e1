"""Flickr30k with Karpathy's splits (train 29,000, val 1,014, test 1,000 images, 5 captions
each): the 1k test split CLIP papers report retrieval on. The TFDS catalog has no Flickr30k
builder; this one stores what `coco_captions` stores for its Karpathy splits, so one reader
serves both:

    image            the JPEG as distributed
    image/filename   e.g. '1000092795.jpg'
    image/id         Karpathy's imgid
    captions         Sequence of {'text': the raw sentence, 'id': Karpathy's sentid}

The images cannot be downloaded by a script (the University of Illinois hands them out after a
form), so they come from a manual directory, with Karpathy's split file:

    tfds build crate_jax/data/tfds_builders/flickr30k --manual_dir=DIR \\
        --file_format=array_record --data_dir=$TFDS_DATA_DIR

DIR holds flickr30k-images/ (the 31,783 JPEGs, from flickr30k-images.tar.gz) and
dataset_flickr30k.json (in Karpathy's caption_datasets.zip, whose dataset_coco.json gives
coco_captions its splits). Only tensorflow_datasets is imported: the tfds command of
requirements-prepare.txt builds it without crate_jax's dependencies.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SPLITS = ("train", "val", "test")
IMAGES, ANNOTATIONS = "flickr30k-images", "dataset_flickr30k.json"


class Flickr30k(tfds.core.GeneratorBasedBuilder):
    """Flickr30k images with their five captions, in Karpathy's train / val / test splits."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {IMAGES}/ (the JPEGs of flickr30k-images.tar.gz, from "
        "https://shannon.cs.illinois.edu/DenotationGraph/) and "
        f"{ANNOTATIONS} (from Karpathy's caption_datasets.zip, "
        "https://cs.stanford.edu/people/karpathy/deepimagesent/) in the manual_dir.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS' own lookup, for a builder inside a package, touches importlib_resources,
        # which TFDS installs only for Python < 3.9
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Flickr30k (Young et al., 2014) with Karpathy & Fei-Fei's splits.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "image/id": np.int64,
                "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
            }),
            homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual = dl_manager.manual_dir
        for needed in (manual / IMAGES, manual / ANNOTATIONS):
            if not needed.exists():
                raise FileNotFoundError(f"flickr30k: no {needed}. "
                                        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        images = json.loads((manual / ANNOTATIONS).read_text())["images"]
        by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
        for image in images:
            if image["split"] in by_split:
                by_split[image["split"]].append(image)
        return {split: self._generate_examples(manual / IMAGES, by_split[split])
                for split in SPLITS}

    def _generate_examples(self, image_dir, annotations: list[dict]):
        for image in annotations:
            path = image_dir / image["filename"]
            if not path.exists():
                raise FileNotFoundError(f"flickr30k: {ANNOTATIONS} names {image['filename']}, "
                                        f"which {image_dir} does not hold")
            yield image["filename"], {
                "image": path,
                "image/filename": image["filename"],
                "image/id": int(image["imgid"]),
                "captions": [{"text": s["raw"], "id": int(s["sentid"])}
                             for s in image["sentences"]],
            }
