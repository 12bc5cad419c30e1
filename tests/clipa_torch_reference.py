"""A PyTorch two-tower model in the CRATE-α-CLIPA release layout (docs/design.md §3), written for
tests from that description: its state_dict keys and shapes are the release's, and its forward
pass is what the layout means (torch's own MultiheadAttention for both towers, MSSA as the
special case query = key = value = U, ODL with D = mlp.c_fc and D1 = mlp.c_proj, LayerNorm
eps 1e-6, GELU-tanh text MLP, no attention mask, the text feature taken at the last position
and multiplied by text_projectionᵀ)."""

from __future__ import annotations

import collections

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6


class OvercompleteDictionary(nn.Module):
    """A₁ = ReLU(η·X·D − ηλ), A₂ = ReLU(A₁ − η·(A₁·Dᵀ − X)·D − ηλ), out = A₂·D1ᵀ."""

    def __init__(self, d: int, ratio: int = 4, eta: float = 0.1, lam: float = 0.1):
        super().__init__()
        self.eta, self.lam = eta, lam
        self.c_fc = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, ratio * d)))
        self.c_proj = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, ratio * d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shrink = self.eta * self.lam
        a1 = F.relu(self.eta * (x @ self.c_fc) - shrink)
        a2 = F.relu(a1 - self.eta * ((a1 @ self.c_fc.T - x) @ self.c_fc) - shrink)
        return a2 @ self.c_proj.T


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); the vision block has no attention biases and
    ties the three in_proj blocks (MSSA)."""

    def __init__(self, width: int, heads: int, vision: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=EPS)
        self.attn = nn.MultiheadAttention(width, heads, bias=not vision, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=EPS)
        if vision:
            with torch.no_grad():
                u = self.attn.in_proj_weight[:width].clone()
                self.attn.in_proj_weight.copy_(torch.cat([u, u, u]))
            self.mlp = OvercompleteDictionary(width)
        else:
            self.mlp = nn.Sequential(collections.OrderedDict([
                ("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU(approximate="tanh")),
                ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Stack(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, vision: bool):
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width, heads, vision) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class Visual(nn.Module):
    def __init__(self, image: int, patch: int, width: int, depth: int, heads: int, embed: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(0.02 * torch.randn((image // patch) ** 2 + 1,
                                                                    width))
        self.transformer = Stack(width, depth, heads, vision=True)
        self.ln_post = nn.LayerNorm(width, eps=EPS)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


class ClipaTwoTower(nn.Module):
    def __init__(self, *, image: int, patch: int, width: int, depth: int, heads: int,
                 text_width: int, text_depth: int, text_heads: int, vocab: int, context: int,
                 embed: int):
        super().__init__()
        self.visual = Visual(image, patch, width, depth, heads, embed)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, text_width))
        self.transformer = Stack(text_width, text_depth, text_heads, vision=False)
        self.ln_final = nn.LayerNorm(text_width, eps=EPS)
        self.text_projection = nn.Parameter(text_width ** -0.5 * torch.randn(embed, text_width))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x))
        return x[:, -1] @ self.text_projection.T


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """LayerNorm weights and biases away from 1 and 0, so that a swapped norm shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, nn.MultiheadAttention) and module.in_proj_bias is not None:
                module.in_proj_bias.copy_(0.1 * torch.randn(module.in_proj_bias.shape,
                                                            generator=gen))
                module.out_proj.bias.copy_(0.1 * torch.randn(module.out_proj.bias.shape,
                                                             generator=gen))
