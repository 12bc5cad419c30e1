"""The two layouts of a layer stack's parameters, and the conversions between them.

    stacked    {'encoder': {'layers': {'attn': {'proj': (L, d, K, p)}, ...}}}
               what the scanned encoder holds, trains and checkpoints
    per-layer  {'encoder': {'layers': {0: {'attn': {'proj': (d, K, p)}}, 1: ...}}}
               the layout of the converters' name maps, of checkpoints written before the
               encoder was scanned, and of any tool that wants layer i on its own

A 'layers' dict below an 'encoder' is per-layer when its keys are layer indices (ints, or
digit strings as orbax restores them) and stacked otherwise. The conversions walk any pytree
of dicts, lists, tuples and named tuples (so optax states convert with the parameters they
mirror) and stack or split every leaf of a layer dict along axis 0: NumPy arrays with NumPy,
jax arrays with jax.numpy, jax.ShapeDtypeStruct by shape, keeping a NamedSharding's spec for
the other axes (the layer axis is never sharded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# The modules whose 'layers' child is a scanned stack: every tower's encoder, and the decoder
# of a masked autoencoder.
STACK_PARENTS = ("encoder", "decoder")


def _is_index(key: Any) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _layer_dict(parent: Any, key: Any, value: Any) -> bool:
    return (parent in STACK_PARENTS and key == "layers" and isinstance(value, Mapping)
            and bool(value))


def _is_per_layer(value: Mapping) -> bool:
    return all(_is_index(k) for k in value)


def is_stacked_path(names: Sequence[Any]) -> bool:
    """Whether the leaf at key path `names` ('encoder', 'layers', 'attn', 'proj') is a
    stacked layer parameter, its leading axis the layers: below 'encoder/layers' with no
    layer index after it."""
    names = list(names)
    for a, b, c in zip(names, names[1:], names[2:], strict=False):
        if a in STACK_PARENTS and b == "layers":
            return not _is_index(c)
    return False


def _walk(tree: Any, convert, parent: Any = None) -> Any:
    """`tree` with convert(layer_dict) applied to every 'encoder/layers' dict."""
    if isinstance(tree, Mapping):
        return {k: convert(v) if _layer_dict(parent, k, v) else _walk(v, convert, k)
                for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a named tuple (optax states)
        return type(tree)(*(_walk(v, convert, parent) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_walk(v, convert, parent) for v in tree)
    return tree


def _spec(sharding: Any, insert: bool) -> Any:
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None, *spec) if insert else spec[1:]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _stack_leaves(*leaves: Any) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype,
                                    sharding=_spec(first.sharding, insert=True))
    if isinstance(first, np.ndarray | np.generic):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _slice_leaf(leaf: Any, index: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                    sharding=_spec(leaf.sharding, insert=False))
    return leaf[index]


def _stack(layers: Mapping) -> Any:
    if not _is_per_layer(layers):
        return layers
    indices = sorted(int(k) for k in layers)
    if indices != list(range(len(indices))):
        raise ValueError(f"encoder/layers: layer indices {indices} are not 0 … {len(indices) - 1}")
    by_index = {int(k): v for k, v in layers.items()}
    return jax.tree.map(_stack_leaves, *(by_index[i] for i in indices))


def _depth(layers: Mapping) -> int:
    leaves = jax.tree.leaves(layers)
    if not leaves:
        raise ValueError("encoder/layers holds no arrays, so its depth is unknown")
    depths = {int(np.shape(x)[0]) if not isinstance(x, jax.ShapeDtypeStruct) else x.shape[0]
              for x in leaves}
    if len(depths) != 1:
        raise ValueError(f"encoder/layers: stacked leaves of different lengths {sorted(depths)}")
    return depths.pop()


def _unstack(layers: Mapping) -> Any:
    if _is_per_layer(layers):
        return layers
    return {i: jax.tree.map(lambda x, i=i: _slice_leaf(x, i), layers)
            for i in range(_depth(layers))}


def stack_layers(tree: Any) -> Any:
    """Per-layer → stacked (trees already stacked pass through unchanged)."""
    return _walk(tree, _stack)


def unstack_layers(tree: Any) -> Any:
    """Stacked → per-layer, with int layer keys (per-layer trees pass through unchanged)."""
    return _walk(tree, _unstack)


def has_per_layer(tree: Any) -> bool:
    """Whether any 'encoder/layers' dict of `tree` is in the per-layer layout."""
    found = []

    def check(layers: Mapping) -> Mapping:
        found.append(_is_per_layer(layers))
        return layers

    _walk(tree, check)
    return any(found)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'encoder/layers/0/attn/proj': x} → {'encoder': {'layers': {0: {'attn': {'proj': x}}}}},
    the layer indices as ints."""
    out: dict[Any, Any] = {}
    for path, value in flat.items():
        parts: list[Any] = path.split("/")
        for i in range(1, len(parts)):
            if parts[i - 1] == "layers" and parts[i].isdigit():
                parts[i] = int(parts[i])
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as {'a/b/c': leaf} ('/'-joined paths)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}/")
        else:
            out[f"{prefix}{key}"] = value
    return out


def stack_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The '/'-path form of stack_layers."""
    return flatten(stack_layers(nest(flat)))


def unstack_flat(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The '/'-path form of unstack_layers: {'encoder/layers/0/attn/proj': ...}."""
    return flatten(unstack_layers(nest(flat)))
