"""PyTorch ToST modules written from docs/design.md §1 ("TSSA and ToST") whose state_dict keys are
the official layouts' (tost_vision/tost.py, tost_lang/model_TSSA.py): the golden references of
the 'tost-torch' and 'tost-gpt-torch' converters. float64 is used by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn


class TSSA(nn.Module):
    """Token statistics self-attention; `causal` uses prefix sums and the per-position bias."""

    def __init__(self, d: int, heads: int, *, causal: bool = False, block_size: int = 0,
                 names=("qkv", "to_out")):
        super().__init__()
        self.heads, self.causal, self.names = heads, causal, names
        setattr(self, names[0], nn.Linear(d, d))
        self.temp = nn.Parameter(torch.ones(heads, 1))
        if causal:
            self.denom_bias = nn.Parameter(torch.zeros(heads, block_size, 1))
            setattr(self, names[1], nn.Linear(d, d))
        else:
            self.to_out = nn.Sequential(nn.Linear(d, d))

    def forward(self, x):
        b, n, d = x.shape
        w = getattr(self, self.names[0])(x).view(b, n, self.heads, -1).transpose(1, 2)
        sq = w * w  # (b, K, n, p)
        if self.causal:
            denom = sq.cumsum(2).clamp_min(1e-12)
            logits = (sq / denom + self.denom_bias[:, :n]).sum(-1) * self.temp
            pi = logits.softmax(1)  # over heads
            q = (sq * pi[..., None]).cumsum(2) / (pi.cumsum(2) + 1e-8)[..., None]
        else:
            col = sq.sum(2, keepdim=True).sqrt().clamp_min(1e-12)
            logits = ((w / col) ** 2).sum(-1) * self.temp
            pi = logits.softmax(1)
            weights = pi / (pi.sum(-1, keepdim=True) + 1e-8)
            q = torch.einsum("bkn,bknp->bkp", weights, sq)[:, :, None]
        out = -(w * pi[..., None]) / (1 + q)
        out = out.transpose(1, 2).reshape(b, n, d)
        return getattr(self, self.names[1])(out)


class Mlp(nn.Module):
    def __init__(self, d: int, names=("fc1", "fc2")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(d, 4 * d))
        setattr(self, names[1], nn.Linear(4 * d, d))

    def forward(self, x):
        return getattr(self, self.names[1])(nn.functional.gelu(getattr(self, self.names[0])(x)))


class Block(nn.Module):
    """Z += γ1 ⊙ TSSA(LN(Z)); Z += γ2 ⊙ MLP(LN(Z))."""

    def __init__(self, d: int, heads: int, eta: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = TSSA(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d)
        self.gamma1 = nn.Parameter(eta * torch.ones(d))
        self.gamma2 = nn.Parameter(eta * torch.ones(d))

    def forward(self, x):
        x = x + self.gamma1 * self.attn(self.norm1(x))
        return x + self.gamma2 * self.mlp(self.norm2(x))


class ClassAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q[:, :, :1] * k).sum(-1) / math.sqrt(d // self.heads)).softmax(-1)
        cls = (attn[:, :, None] @ v).transpose(1, 2).reshape(b, 1, d)
        return torch.cat([self.proj(cls), x[:, 1:]], 1)  # patch rows pass through


class ClassAttentionBlock(nn.Module):
    """CaiT's block with tokens_norm: LN2 on every token, the MLP on the cls row only."""

    def __init__(self, d: int, heads: int, eta: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = ClassAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d)
        self.gamma1 = nn.Parameter(eta * torch.ones(d))
        self.gamma2 = nn.Parameter(eta * torch.ones(d))

    def forward(self, x):
        x = self.norm2(x + self.gamma1 * self.attn(self.norm1(x)))
        return x + torch.cat([self.gamma2 * self.mlp(x[:, :1]), x[:, 1:]], 1)


class FourierPosition(nn.Module):
    def __init__(self, d: int, hidden: int = 32):
        super().__init__()
        self.hidden = hidden
        self.token_projection = nn.Conv2d(2 * hidden, d, 1)

    def forward(self, h: int, w: int):
        dtype = self.token_projection.weight.dtype
        ys = torch.arange(1, h + 1, dtype=dtype)[:, None].expand(h, w) / (h + 1e-6)
        xs = torch.arange(1, w + 1, dtype=dtype)[None, :].expand(h, w) / (w + 1e-6)
        i = torch.arange(self.hidden, dtype=dtype)
        omega = 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / self.hidden)

        def features(v):
            arg = (v * 2 * math.pi)[..., None] / omega
            return torch.where(i % 2 == 0, arg.sin(), arg.cos())

        grid = torch.cat([features(ys), features(xs)], -1).permute(2, 0, 1)[None]
        return self.token_projection(grid).flatten(2).transpose(1, 2)


class ToST(nn.Module):
    """The image model: conv stem with BatchNorm, Fourier positions, TSSA blocks, 2 class-
    attention blocks, LN, head on the cls token."""

    def __init__(self, d: int, depth: int, heads: int, classes: int, patch: int = 16,
                 eta: float = 1.0, cab: int = 2):
        super().__init__()
        steps = int(math.log2(patch))
        widths = [3] + [d >> (steps - 1 - j) for j in range(steps)]
        layers = []
        for j in range(steps):
            if j:
                layers.append(nn.GELU())
            layers.append(nn.Sequential(nn.Conv2d(widths[j], widths[j + 1], 3, 2, 1,
                                                  bias=False), nn.BatchNorm2d(widths[j + 1])))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Sequential(*layers)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, heads, eta) for _ in range(depth))
        self.cls_attn_blocks = nn.ModuleList(ClassAttentionBlock(d, heads, eta)
                                             for _ in range(cab))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)
        self.pos_embeder = FourierPosition(d)

    def forward(self, images):  # NCHW
        x = self.patch_embed.proj(images)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_embeder(h, w)
        for block in self.blocks:
            x = block(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        for block in self.cls_attn_blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, block_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = TSSA(d, heads, causal=True, block_size=block_size,
                         names=("c_attn", "c_proj"))
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = Mlp(d, names=("c_fc", "c_proj"))
        self.gamma1 = nn.Parameter(1e-5 * torch.ones(d))
        self.gamma2 = nn.Parameter(1e-5 * torch.ones(d))

    def forward(self, x):
        x = x + self.gamma1 * self.attn(self.ln_1(x))
        return x + self.gamma2 * self.mlp(self.ln_2(x))


class ToSTGPT(nn.Module):
    """nanoGPT with causal TSSA; lm_head tied to wte; full logits (B, T, V)."""

    def __init__(self, vocab: int, block_size: int, d: int, depth: int, heads: int):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d),
            h=nn.ModuleList(GPTBlock(d, heads, block_size) for _ in range(depth)),
            ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))
