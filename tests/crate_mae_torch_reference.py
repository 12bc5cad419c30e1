"""A PyTorch CRATE-MAE in the released CRATE-MAE-B key layout (docs/design.md §1, "CRATE
autoencoder blocks"), written for the tests from that description: its state_dict keys and
shapes are the release's, and its forward pass is what the description means:

    encoder block   Z½ = Z + MSSA(LN(Z));  Z' = ReLU(X + η(X·W − X·Wᵀ·W) − ηλ), X = LN(Z½)
    decoder block   G = LN(Z)·Wᵀ;  Z' = G − MSSA(LN(G))
    block LayerNorms eps 1e-5 (torch's default), `norm` and `decoder_norm` eps 1e-6
    stem            a P×P stride-P convolution with bias, no LayerNorm
    masking         patches in ascending order of the given noise, the first
                    int(N·(1 − r)) kept, the others replaced by `mask_token`
    positions       MAE's fixed sin-cos table added once, to [cls; patches] at the encoder
                    input (the official forward adds `decoder_pos_embed` there; `pos_embed`
                    holds the same table); the decoder adds none, and `decoder_embed` is built
                    but never called
    output          decoder_pred of LN(decoder blocks(H)), cls row dropped; loss: per-patch
                    MSE averaged over the hidden patches of the batch (norm_pix: unbiased
                    variance + 1e-6)

Masking is injected as noise (B, N), so the JAX model can be given the same mask.
"""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import torch
from torch import nn
from torch.nn import functional as F

BLOCK_EPS = 1e-5
FINAL_EPS = 1e-6


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class SubspaceAttention(nn.Module):
    """W = x·U; A_k = softmax(W_k W_kᵀ/√p); out = concat_k(A_k W_k)·U_out + b."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        p = d // self.heads
        w = self.qkv(x).reshape(b, n, self.heads, p).transpose(1, 2)
        attn = torch.softmax(w @ w.transpose(-1, -2) * p ** -0.5, dim=-1)
        if return_attention:
            return attn
        return self.to_out((attn @ w).transpose(1, 2).reshape(b, n, d))


class SparseCoding(nn.Module):
    """One ISTA step from X: ReLU(X + η(X·W − X·Wᵀ·W) − ηλ), no residual."""

    def __init__(self, dim: int, eta: float = 0.1, lam: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, dim)))
        self.eta, self.lam = eta, lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.relu(x + self.eta * (x @ w - (x @ w.t()) @ w) - self.eta * self.lam)


class Unsparsify(nn.Module):
    """The decoder's dictionary: x·Wᵀ (no bias, no threshold)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, lam: float):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([
            PreNorm(dim, SubspaceAttention(dim, heads)),
            PreNorm(dim, SparseCoding(dim, lam=lam))])])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for attn, sparse in self.layers:
            z = sparse(z + attn(z))
        return z


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([
            PreNorm(dim, Unsparsify(dim)), PreNorm(dim, SubspaceAttention(dim, heads))])])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for unsparsify, attn in self.layers:
            g = unsparsify(z)
            z = g - attn(g)
        return z


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int, chans: int):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, patch, patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class CrateMAE(nn.Module):
    """(dim, depth, heads) for encoder and decoder alike; images NCHW."""

    def __init__(self, *, dim: int, depth: int, heads: int, patch: int, image: int,
                 chans: int = 3, lam: float = 0.5, decoder_depth: int | None = None):
        super().__init__()
        grid = image // patch
        self.patch = patch
        table = np.concatenate([np.zeros((1, dim)), ref.mae_sincos_2d(grid, grid, dim)])
        table = torch.from_numpy(table[None].astype(np.float32))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(table.clone(), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(table.clone(), requires_grad=False)
        self.patch_embed = PatchEmbed(dim, patch, chans)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, lam) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=FINAL_EPS)
        self.decoder_embed = nn.Linear(dim, dim)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(dim, heads) for _ in range(decoder_depth or depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=FINAL_EPS)
        self.decoder_pred = nn.Linear(dim, patch * patch * chans)

    @staticmethod
    def hidden_mask(noise: torch.Tensor, ratio: float) -> torch.Tensor:
        """(B, N) float mask, 1 = hidden."""
        n = noise.shape[1]
        keep = int(n * (1 - ratio))
        order = torch.argsort(noise, dim=1)
        mask = torch.ones_like(noise)
        mask.scatter_(1, order[:, :keep], 0.0)
        return mask

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(images)
        if mask is not None:
            x = torch.where(mask[..., None] > 0, self.mask_token.to(x.dtype), x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.decoder_pos_embed

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.tokens(images, mask)
        for block in self.blocks:
            z = block(z)
        return self.norm(z)

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent
        for block in self.decoder_blocks:
            z = block(z)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.patch
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
             norm_pix: bool) -> torch.Tensor:
        target = self.patchify(images)
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (
                target.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor, ratio: float = 0.75,
                norm_pix: bool = False):
        """(loss, prediction (B, N, P²·C), mask (B, N), latent (B, 1 + N, d))."""
        mask = self.hidden_mask(noise, ratio)
        latent = self.forward_encoder(images, mask)
        pred = self.forward_decoder(latent)
        return self.loss(images, pred, mask, norm_pix), pred, mask, latent

    def attention(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """The attention maps (B, K, 1 + N, 1 + N) of encoder block `layer`, nothing masked."""
        z = self.tokens(images)
        for block in self.blocks[:layer]:
            z = block(z)
        attn = self.blocks[layer].layers[0][0]
        return attn(z, return_attention=True)


def randomize(module: nn.Module, seed: int, std: float = 0.2) -> None:
    """Seeded noise in every trained parameter (LayerNorm weights near 1), the fixed tables
    left as they are."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.named_parameters():
            if not value.requires_grad:
                continue
            noise = torch.randn(value.shape, generator=gen, dtype=value.dtype) * std
            is_norm_weight = name.endswith("norm.weight")
            value.copy_(1.0 + 0.5 * noise if is_norm_weight else noise)
