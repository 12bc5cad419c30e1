"""TFDS datasets as users prepare them: a small image-classification dataset built by TFDS's own
builder machinery (no mock_data) in ArrayRecord format trains and evaluates the classification
task through `python -m crate_jax.main`, in a process that has never seen the builder's code; the
same dataset prepared only as TFRecord, a missing dataset and a missing split give errors that
name the dataset, the data_dir and the `tfds build` command."""

import json
import os
import shlex
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from multiprocess_utils import FAST_COMPILE
from PIL import Image

from crate_jax.data import images
from crate_jax.data.tfds_source import TFDSFormatError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "crate_tiny_shapes"  # TFDS names a builder after its class, in snake case
SPLITS = {"train": (32, 0), "test": (16, 1)}  # split: (examples, seed)
NUM_CLASSES = 4


def _examples(num: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """Images whose mean colour is their class (a square of the class colour on noise)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    out = []
    for i in range(num):
        label = i % NUM_CLASSES
        image = rng.integers(0, 64, (20, 24, 3), dtype=np.uint8)
        image[4:16, 6:18] = colours[label]
        out.append((image, label))
    return out


class CrateTinyShapes(tfds.core.GeneratorBasedBuilder):
    """A few dozen 20×24 PNG images in 4 classes, 'train' and 'test' splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(20, 24, 3)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*spec) for split, spec in SPLITS.items()}

    def _generate_examples(self, num, seed):
        # PIL images: TFDS encodes those to PNG without tensorflow (numpy arrays need it).
        for i, (image, label) in enumerate(_examples(num, seed)):
            yield i, {"image": Image.fromarray(image), "label": label}


def _prepare(data_dir, file_format: str) -> str:
    """The dataset prepared by TFDS under data_dir, as `tfds build --file_format=...` does it
    (the CLI passes file_format to the builder); returns the version directory."""
    builder = CrateTinyShapes(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare()
    return str(builder.data_dir)


# --- TFRecord without tensorflow -------------------------------------------------------------
# TFDS writes TFRecord through tf.io.TFRecordWriter only, and tensorflow is not a dependency
# (requirements-prepare.txt). The framing is small enough to write here: per record the length
# (uint64 LE), its masked CRC32-C, the bytes, their masked CRC32-C.

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc(data: bytes) -> bytes:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _write_tfrecord(cls, path, iterator):
    with open(os.fspath(path), "wb") as f:
        for _, record in iterator:
            length = struct.pack("<Q", len(record))
            f.write(length + _masked_crc(length) + record + _masked_crc(record))


def _read_tfrecord(path) -> list[bytes]:
    data, records, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        length = data[pos:pos + 8]
        assert data[pos + 8:pos + 12] == _masked_crc(length)
        (n,) = struct.unpack("<Q", length)
        record = data[pos + 12:pos + 12 + n]
        assert data[pos + 12 + n:pos + 16 + n] == _masked_crc(record)
        records.append(record)
        pos += 16 + n
    return records


@pytest.fixture
def tfrecord_only(tmp_path, monkeypatch):
    """(data_dir, version dir) of the dataset prepared by TFDS in TFRecord format only."""
    from tensorflow_datasets.core import file_adapters
    monkeypatch.setattr(file_adapters.TfRecordFileAdapter, "write_examples",
                        classmethod(_write_tfrecord))
    data_dir = tmp_path / "tfrecord"
    version_dir = _prepare(data_dir, "tfrecord")
    files = sorted(os.listdir(version_dir))
    assert json.load(open(os.path.join(version_dir, "dataset_info.json")))["fileFormat"] == \
        "tfrecord"
    shard = os.path.join(version_dir, f"{NAME}-train.tfrecord-00000-of-00001")
    assert shard[len(version_dir) + 1:] in files and len(_read_tfrecord(shard)) == 32
    assert not any("array_record" in f for f in files)
    return str(data_dir), version_dir


def _data(name: str, data_dir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(source="tfds", name=name, data_dir=data_dir))


def _build_command(message: str) -> str:
    """The `tfds build ...` command quoted in an error message."""
    return next(part for part in message.split("`") if part.startswith("tfds build"))


def _check_build_command(command: str, name: str, data_dir: str) -> None:
    """The command is spelled as the installed TFDS CLI parses it (tfds build's own parser,
    which imports without tensorflow)."""
    import simple_parsing
    from tensorflow_datasets.scripts.cli import build
    words = shlex.split(command)
    assert words[:2] == ["tfds", "build"]
    args = simple_parsing.parse(build.Args, args=words[2:])
    assert args.positional_datasets == [name]
    assert args.generation.file_format == "array_record"
    assert str(args.paths.data_dir) == data_dir


# --- tests -----------------------------------------------------------------------------------

def test_arrayrecord_dataset_trains_and_evaluates(tmp_path):
    data_dir = str(tmp_path / "tfds")
    _prepare(data_dir, "array_record")
    # The source holds exactly the generated examples (PNG is lossless; TFDS shuffles order).
    for split, spec in SPLITS.items():
        source = images.image_source(_data(NAME, data_dir), split)
        got = sorted((np.asarray(source[i]["image"]).tobytes(), int(source[i]["label"]))
                     for i in range(len(source)))
        assert got == sorted((im.tobytes(), label) for im, label in _examples(*spec))
    half = images.image_source(_data(NAME, data_dir), "test[:50%]")
    assert len(half) == SPLITS["test"][0] // 2

    # A fresh process, which cannot import CrateTinyShapes, reads it from its files.
    workdir = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "CRATE_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE,
               TFDS_DATA_DIR=str(tmp_path / "empty"))
    proc = subprocess.run(
        [sys.executable, "-m", "crate_jax.main", "--config=configs/crate_in1k.py:smoke",
         f"--workdir={workdir}", "--config.data.source=tfds", f"--config.data.name={NAME}",
         f"--config.data.data_dir={data_dir}", f"--config.data.num_classes={NUM_CLASSES}",
         "--config.data.eval_split=test", "--config.checkpoint.async_save=False",
         "--config.tensorboard=False"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final: step 4.0000" in proc.stdout
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    evals = [r for r in rows if "val/count" in r]
    assert evals[-1]["step"] == 4 and evals[-1]["val/count"] == SPLITS["test"][0]
    assert json.load(open(os.path.join(workdir, "config.json")))["data"]["data_dir"] == data_dir


def test_tfrecord_only_dataset_names_the_rebuild_command(tfrecord_only):
    data_dir, version_dir = tfrecord_only
    with pytest.raises(TFDSFormatError) as e:
        images.image_source(_data(NAME, data_dir), "train")
    message = str(e.value)
    assert NAME in message and data_dir in message and "tfrecord" in message
    assert "data.data_dir" in message and version_dir in message
    command = _build_command(message)
    assert command == f"tfds build {NAME} --file_format=array_record --data_dir={data_dir}"
    _check_build_command(command, NAME, data_dir)
    assert (f"tfds convert_format --dataset_version_dir={version_dir} "
            "--out_file_format=array_record") in message
    assert not isinstance(e.value, FileNotFoundError)  # optional evaluators must not skip it


def test_missing_dataset_or_split_names_the_build_command(tmp_path):
    data_dir = str(tmp_path / "tfds")
    _prepare(data_dir, "array_record")
    for name, where in [("no_such_dataset", data_dir), (NAME, str(tmp_path / "missing"))]:
        with pytest.raises(FileNotFoundError) as e:
            images.image_source(_data(name, where), "train")
        message = str(e.value)
        assert repr(name) in message and where in message and "data.name" in message
        command = _build_command(message)
        assert command == f"tfds build {name} --file_format=array_record --data_dir={where}"
        _check_build_command(command, name, where)
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        images.image_source(_data(NAME, data_dir), "validation")
