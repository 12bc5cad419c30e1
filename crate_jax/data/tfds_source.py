"""Random-access reading of prepared TFDS datasets, without tensorflow.

`tfds.data_source` reads only the random-access file formats (ArrayRecord, Parquet), while
`tfds build NAME` writes TFRecord unless told otherwise. `open_data_source` loads the prepared
dataset from its files (`dataset_info.json`, `features.json`) instead of from the builder's
code, because some builders (COCO) touch tensorflow in their code; then it checks the format and
turns every way of not finding usable files into an error that says how to prepare them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TFDSFormatError(ValueError):
    """A TFDS dataset is prepared, but in no format that `tfds.data_source` can read.

    Not a FileNotFoundError on purpose: optional evaluators skip a missing dataset with a
    warning, but a dataset that is there in the wrong format is a setup mistake to fix."""


def default_data_dir() -> str:
    """The directory TFDS reads when no data_dir is given ($TFDS_DATA_DIR or
    ~/tensorflow_datasets)."""
    from tensorflow_datasets.core import constants
    return str(constants.DATA_DIR)


def build_command(name: str, data_dir: str | None) -> str:
    """The `tfds build` command that prepares `name` in ArrayRecord format under `data_dir`."""
    return (f"tfds build {name} --file_format=array_record "
            f"--data_dir={data_dir or default_data_dir()}")


def _how_to_prepare(name: str, data_dir: str | None) -> str:
    return (f"prepare it with `{build_command(name, data_dir)}` (the tfds command needs "
            "`pip install -r requirements-prepare.txt`; training reads it without tensorflow)")


def _what(name: str, data_dir: str | None, setting: str) -> str:
    where = f" ({setting}.name, {setting}.data_dir)" if setting else ""
    return f"TFDS dataset {name!r} under data_dir {data_dir or default_data_dir()}{where}"


def open_builder(name: str, data_dir: str | None, setting: str = "") -> Any:
    """The read-only builder of the prepared TFDS dataset `name` ('name', 'name/config' or
    'name/config:version') under `data_dir` (None: the TFDS default), checked to be in a
    random-access format; `setting` (e.g. 'data') is the config section named in errors.
    Raises FileNotFoundError when it is not prepared there and TFDSFormatError when it is
    prepared only as TFRecord (or another sequential format)."""
    from etils import epath
    from tensorflow_datasets.core import file_adapters, read_only_builder, registered

    what = _what(name, data_dir, setting)
    if data_dir and not epath.Path(data_dir).exists():
        raise FileNotFoundError(f"{what}: the data_dir does not exist; "
                                f"{_how_to_prepare(name, data_dir)}")
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
    except (registered.DatasetNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"{what}: not prepared there; {_how_to_prepare(name, data_dir)}") from e
    available = builder.info.available_file_formats()
    if not available & file_adapters.FileFormat.with_random_access():
        formats = ", ".join(sorted(f.value for f in available)) or "unknown"
        version_dir = builder.data_dir
        # `tfds build` refuses a data_dir that holds the dataset in another format, hence the
        # delete; convert_format keeps the TFRecord files and adds ArrayRecord next to them.
        raise TFDSFormatError(
            f"{what}: prepared only in {formats} format (at {version_dir}), which "
            "tfds.data_source cannot read. Convert it to ArrayRecord in place: `tfds "
            f"convert_format --dataset_version_dir={version_dir} --out_file_format=array_record`"
            f", or delete {version_dir} and rebuild it: `{build_command(name, data_dir)}` (the "
            "tfds command needs `pip install -r requirements-prepare.txt`)")
    return builder


def open_data_source(name: str, split: str, data_dir: str | None,
                     setting: str = "") -> Sequence[dict]:
    """`source[i] -> example dict (numpy)` for `split` (TFDS split syntax, e.g. 'train[:10%]')
    of the prepared TFDS dataset `name` under `data_dir`; see `open_builder` for the errors."""
    builder = open_builder(name, data_dir, setting)
    try:
        return builder.as_data_source(split=split)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{_what(name, data_dir, setting)}: no split {split!r} (splits: "
                         f"{sorted(builder.info.splits)}): {e}") from e
