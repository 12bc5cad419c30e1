"""Webdataset shards: the reader and the helpers users call, from their modules in
crate_jax/data/wds (one stage each; crate_jax.data.wds.reader explains the whole)."""

from crate_jax.data.wds.checks import ReaderStats
from crate_jax.data.wds.reader import WebDatasetReader
from crate_jax.data.wds.shards import expand_pattern, shard_order, write_shards
from crate_jax.data.wds.tar import IMAGE_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS", "ReaderStats", "WebDatasetReader", "expand_pattern",
           "shard_order", "write_shards"]
