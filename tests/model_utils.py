"""Test helpers: read a model's parameters as flat NumPy dicts, randomise them, and lay them
out as the reference checkpoints do (docs/design.md §3), so that the NumPy reference forwards in
numpy_reference.py can run on exactly the same weights."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from crate_jax.models import layer_stack


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """{'encoder/layers/0/attn/proj': array, ...} for every nnx.Param, layer by layer (the
    model stacks its layers; the reference layouts name each one)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return layer_stack.unstack_flat(
        {"/".join(map(str, path)): np.asarray(var[...]) for path, var in flat})


def randomize(model: nnx.Module, seed: int = 0, std: float = 0.2) -> None:
    """Overwrite every parameter with seeded noise, so that no parameter sits at a value
    (ones, zeros) that would hide a swapped or ignored tensor. LayerNorm scales stay near 1."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var[...].shape
        noise = rng.normal(0.0, std, shape).astype(np.float32)
        value = 1.0 + noise if path[-1] == "scale" else noise
        var[...] = jax.numpy.asarray(value, dtype=var[...].dtype)


def _layers(flat: dict) -> int:
    return 1 + max(int(k.split("/")[2]) for k in flat if k.startswith("encoder/layers/"))


def crate_torch_layout(flat: dict) -> dict[str, np.ndarray]:
    """Our CRATE parameters in the PyTorch state_dict layout (Linear weights are (out, in))."""
    d = flat["cls"].shape[-1]
    sd = {
        "cls_token": flat["cls"], "pos_embedding": flat["posemb/embedding"],
        "to_patch_embedding.1.weight": flat["stem/norm_in/scale"],
        "to_patch_embedding.1.bias": flat["stem/norm_in/bias"],
        "to_patch_embedding.2.weight": flat["stem/proj/kernel"].T,
        "to_patch_embedding.2.bias": flat["stem/proj/bias"],
        "to_patch_embedding.3.weight": flat["stem/norm_out/scale"],
        "to_patch_embedding.3.bias": flat["stem/norm_out/bias"],
        "mlp_head.0.weight": flat["norm/scale"], "mlp_head.0.bias": flat["norm/bias"],
        "mlp_head.1.weight": flat["head/kernel"].T, "mlp_head.1.bias": flat["head/bias"],
    }
    for i in range(_layers(flat)):
        ours, theirs = f"encoder/layers/{i}", f"transformer.layers.{i}"
        sd |= {
            f"{theirs}.0.norm.weight": flat[f"{ours}/attn/norm/scale"],
            f"{theirs}.0.norm.bias": flat[f"{ours}/attn/norm/bias"],
            f"{theirs}.0.fn.qkv.weight": flat[f"{ours}/attn/proj"].reshape(d, -1).T,
            f"{theirs}.0.fn.to_out.0.weight": flat[f"{ours}/attn/out"].reshape(-1, d).T,
            f"{theirs}.0.fn.to_out.0.bias": flat[f"{ours}/attn/out_bias"],
            f"{theirs}.1.norm.weight": flat[f"{ours}/sparse/norm/scale"],
            f"{theirs}.1.norm.bias": flat[f"{ours}/sparse/norm/bias"],
            f"{theirs}.1.fn.weight": flat[f"{ours}/sparse/weight"],
        }
    return sd


def _bigvision_common(flat: dict) -> dict[str, np.ndarray]:
    out = {"embedding/kernel": flat["stem/kernel"], "cls": flat["cls"],
           "encoder_norm/scale": flat["norm/scale"], "encoder_norm/bias": flat["norm/bias"]}
    if "posemb/embedding" in flat:  # a learned embedding (a fixed one is not a parameter)
        out["pos_embedding"] = flat["posemb/embedding"]
    if "stem/bias" in flat:
        out["embedding/bias"] = flat["stem/bias"]
    if "head/kernel" in flat:
        out |= {"head/kernel": flat["head/kernel"], "head/bias": flat["head/bias"]}
    return out


def crate_alpha_npz_layout(flat: dict) -> dict[str, np.ndarray]:
    """Our CRATE-α parameters in the big_vision .npz layout."""
    out = _bigvision_common(flat)
    for i in range(_layers(flat)):
        ours, theirs = f"encoder/layers/{i}", f"Transformer/encoderblock_{i}"
        att = f"{theirs}/MultiHeadDotProductSubspaceAttention_0"
        out |= {
            f"{theirs}/LayerNorm_0/scale": flat[f"{ours}/attn/norm/scale"],
            f"{theirs}/LayerNorm_0/bias": flat[f"{ours}/attn/norm/bias"],
            f"{att}/proj/kernel": flat[f"{ours}/attn/proj"],
            f"{att}/out/kernel": flat[f"{ours}/attn/out"],
            f"{theirs}/LayerNorm_1/scale": flat[f"{ours}/sparse/norm/scale"],
            f"{theirs}/LayerNorm_1/bias": flat[f"{ours}/sparse/norm/bias"],
            f"{theirs}/OvercompleteISTABlock_0/D": flat[f"{ours}/sparse/D"],
            f"{theirs}/OvercompleteISTABlock_0/D1": flat[f"{ours}/sparse/D1"],
        }
    return out


def vit_npz_layout(flat: dict) -> dict[str, np.ndarray]:
    """Our ViT parameters in the big_vision ViT layout."""
    out = _bigvision_common(flat)
    for i in range(_layers(flat)):
        ours, theirs = f"encoder/layers/{i}", f"Transformer/encoderblock_{i}"
        att = f"{theirs}/MultiHeadDotProductAttention_0"
        for name in ("query", "key", "value"):
            out[f"{att}/{name}/kernel"] = flat[f"{ours}/attn/{name}"]
            out[f"{att}/{name}/bias"] = flat[f"{ours}/attn/{name}_bias"]
        mlp = f"{theirs}/MlpBlock_0"
        out |= {
            f"{att}/out/kernel": flat[f"{ours}/attn/out"],
            f"{att}/out/bias": flat[f"{ours}/attn/out_bias"],
            f"{theirs}/LayerNorm_0/scale": flat[f"{ours}/attn/norm/scale"],
            f"{theirs}/LayerNorm_0/bias": flat[f"{ours}/attn/norm/bias"],
            f"{theirs}/LayerNorm_1/scale": flat[f"{ours}/sparse/norm/scale"],
            f"{theirs}/LayerNorm_1/bias": flat[f"{ours}/sparse/norm/bias"],
            f"{mlp}/Dense_0/kernel": flat[f"{ours}/sparse/fc1/kernel"],
            f"{mlp}/Dense_0/bias": flat[f"{ours}/sparse/fc1/bias"],
            f"{mlp}/Dense_1/kernel": flat[f"{ours}/sparse/fc2/kernel"],
            f"{mlp}/Dense_1/bias": flat[f"{ours}/sparse/fc2/bias"],
        }
    return out
