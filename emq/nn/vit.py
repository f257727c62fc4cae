"""A small vision transformer (DeiT-tiny-like) with multi-bit linear layers.

Why a compact definition rather than ``torchvision.models.VisionTransformer``: torchvision's
encoder uses ``nn.MultiheadAttention``, whose query/key/value projection is a bare
``in_proj_weight`` parameter consumed inside the fused ``F.multi_head_attention_forward``;
there is no ``nn.Linear`` to swap for a quantized one. Here attention is written out with
``nn.Linear`` for qkv and the output projection (and ``F.scaled_dot_product_attention``), so
the same :func:`emq.nn.swap.swap_modules` that converts torchvision's ResNets converts every
linear layer of every block.

What is quantized: the weights of every linear layer in the blocks (qkv, projection, both MLP
layers), at the current bit-width. The patch embedding and the classifier stay full
precision (METHOD.md §1's first and last layer) unless ``quant.quantize_first_last``.
Activations stay full precision: the activation quantizer ``q_b`` clamps to [0, 1], made for
the non-negative outputs of a ReLU, while a transformer's activations are signed.

Normalisation. LayerNorm has no running statistics: it normalises each token with its own
mean and variance, at every bit-width alike, so the only thing that can depend on the
bit-width is its affine part (gain and bias). *Switchable LayerNorm* keeps one LayerNorm
(one gain and bias) per trained bit-width, as switchable BN keeps one BN; *shared LayerNorm*
is one LayerNorm for all bit-widths. The weight bias correction of METHOD.md §2 applies to
the linear weights unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emq.config import ModelConfig, QuantConfig
from emq.nn.swap import swap_modules

# DeiT-tiny (Touvron et al. 2021): 12 blocks, 192-wide tokens, 3 heads, MLP ratio 4.
TINY = {"dim": 192, "depth": 12, "heads": 3, "mlp_ratio": 4}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, class token, learned positions, encoder blocks, final norm, linear head."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, num_classes: int, dim: int, depth: int,
                 heads: int, mlp_ratio: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT: image size {image_size} is not a multiple of the patch size {patch_size}")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the final norm: the classifier's input."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def patch_size_for(image_size: int) -> int:
    """DeiT's 16-pixel patches from 128 px up; 4-pixel patches for CIFAR/MNIST-size images."""
    return 16 if image_size >= 128 else 4


def vit_tiny(m: ModelConfig, q: QuantConfig, bits, num_classes: int, in_channels: int, image_size: int = 224):
    """DeiT-tiny with multi-bit linear layers and switchable or shared LayerNorm."""
    model = VisionTransformer(image_size, patch_size_for(image_size), in_channels, num_classes, **TINY)
    keep = () if q.quantize_first_last else ("patch_embed", "head")
    return swap_modules(model, q, bits, keep=keep)
