"""A PyTorch ViT in the layout of DINO's and DINOv2's backbones (docs/design.md §1, "SimDINO as the
official code runs it"), written for the tests from that description: timm names (`cls_token`,
`pos_embed`, `patch_embed.proj`, `blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`,
`norm`), LayerNorm eps 1e-6, qkv with bias, exact GELU, pre-norm residual blocks, the cls token
after the final norm as the feature. `layer_scale=True` adds DINOv2's LayerScale (`ls1.gamma`,
`ls2.gamma`) and its `mask_token`; `registers=R` adds DINOv2's register tokens (after the cls
token, without position). `dino_checkpoint` / `dinov2_checkpoint` wrap state dicts the way the
official trainers save them."""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, width: int, heads: int, hidden: int, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=EPS)
        self.attn = Attention(width, heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=EPS)
        self.mlp = Mlp(width, hidden)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """images (B, C, S, S) → the cls token after the final norm, (B, d)."""

    def __init__(self, *, image: int, patch: int, width: int, depth: int, heads: int,
                 hidden: int | None = None, layer_scale: bool = False, registers: int = 0,
                 channels: int = 3):
        super().__init__()
        grid = (image // patch) ** 2
        self.patch_embed = PatchEmbed(patch, channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid + 1, width))
        self.register_tokens = (nn.Parameter(torch.zeros(1, registers, width))
                                if registers else None)
        if layer_scale or registers:  # DINOv2's backbone carries iBOT's mask token
            self.mask_token = nn.Parameter(torch.zeros(1, width))
        self.blocks = nn.ModuleList(Block(width, heads, hidden or 4 * width, layer_scale)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]],
                          dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def randomize(module: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Every parameter drawn from N(0, scale²) (LayerNorm weights and LayerScale around 1), so
    that no transpose, permutation or missing bias can go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1.0 + noise if name.endswith(("norm1.weight", "norm2.weight",
                                                  "norm.weight", "gamma")) else noise)


def head_state(width: int, seed: int, hidden: int = 16, out: int = 8) -> dict[str, torch.Tensor]:
    """A SimDINO projection head's parameters (Linear–GELU–Linear–GELU–Linear, `mlp.{0,2,4}`)."""
    gen = torch.Generator().manual_seed(seed)
    dims = ((hidden, width), (hidden, hidden), (out, hidden))
    state = {}
    for index, (rows, cols) in zip((0, 2, 4), dims, strict=True):
        state[f"mlp.{index}.weight"] = torch.randn(rows, cols, generator=gen)
        state[f"mlp.{index}.bias"] = torch.randn(rows, generator=gen)
    return state


def dino_checkpoint(student: DinoViT, teacher: DinoViT) -> dict:
    """simdino/main_dino.py's checkpoint.pth: the student under torch.compile around DDP
    ('_orig_mod.module.'), the teacher under torch.compile ('_orig_mod.'), each a
    MultiCropWrapper ('backbone.', 'head.'), with the optimizer, epoch and argparse args."""
    width = student.cls_token.shape[-1]

    def wrapped(module: DinoViT, prefix: str, seed: int) -> dict:
        out = {f"{prefix}backbone.{k}": v for k, v in module.state_dict().items()}
        out |= {f"{prefix}head.{k}": v for k, v in head_state(width, seed).items()}
        return out

    return {"student": wrapped(student, "_orig_mod.module.", 1),
            "teacher": wrapped(teacher, "_orig_mod.", 2),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "epoch": 100, "dino_loss": {},
            "args": argparse.Namespace(arch="vit_base", patch_size=16, eps=0.05, coeff=1.0,
                                       global_crops_scale=(0.4, 1.0), expa_type=1)}


def dinov2_checkpoint(teacher: DinoViT, depth_per_chunk: int) -> dict:
    """simdinov2's eval/<iter>/teacher_checkpoint.pth: {'teacher': ...} with 'backbone.' and
    'dino_head.' keys and the blocks in FSDP chunks ('blocks.{chunk}.{i}.')."""
    width = teacher.cls_token.shape[-1]
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // depth_per_chunk}.{key[len('blocks.'):]}"
        state[f"backbone.{key}"] = value
    state |= {f"dino_head.{k}": v for k, v in head_state(width, 3).items()}
    return {"teacher": state}
