"""Attention beyond CBAM: additive gates on U-Net skips and linear-complexity global self-attention."""
import math

import torch
from torch import nn

from lib.models.blocks import build_norm


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al., 2018): the decoder signal g weights the skip x per pixel.

    g is the upsampled decoder feature at the skip's resolution, so the gate is only 1x1 convs.
    In eval mode the gate map is kept in `last_map` (B, 1, H, W) for TensorBoard.
    """

    def __init__(self, channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.wx = nn.Conv2d(channels, inter_channels, 1, bias=False)
        self.wg = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)
        self.last_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W) skip, g (B, Cg, H, W) gating signal
        alpha = torch.sigmoid(self.psi(torch.relu(self.wx(x) + self.wg(g))))  # (B, 1, H, W)
        if not self.training:
            self.last_map = alpha.detach()
        return x * alpha


class LinearAttention(nn.Module):
    """Efficient attention (Shen et al., 2021), O(H*W) instead of O((H*W)^2), as a residual block.

    Keys are softmaxed over positions and queries over channels, so the (d x d) context K^T V is built
    first. No positional encoding: the block is equivariant to any permutation of the pixels.
    """

    def __init__(self, channels: int, heads: int, norm: str):
        super().__init__()
        self.heads = math.gcd(channels, heads)
        self.norm = build_norm(norm, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.unbind(1)  # (B, heads, d, N) each
        q, k = q.softmax(dim=2), k.softmax(dim=3)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # (B, heads, d, d)
        y = torch.einsum("bhde,bhdn->bhen", context, q)  # (B, heads, d, N)
        return x + self.out(y.reshape(b, c, h, w))
