"""DeepLabV3+ with FiLM: residual atrous encoder, ASPP, and a light decoder on one low-level skip.

Downsampling is by max-pool and upsampling bilinear with half-pixel centres, so like the U-Nets the model
is D4-equivariant once its kernels are D4-symmetric.
"""
import torch
import torch.nn.functional as F
from torch import nn

from lib.models.blocks import FiLM, build_activation, conv_norm
from lib.models.registry import ForestModel, register
from lib.models.unet import UNetEncoder, block_factory


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, a dilated 3x3 per rate and image pooling, fused by a 1x1."""

    def __init__(self, cin: int, cout: int, rates: list[int], norm: str, activation: str):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(conv_norm(cin, cout, 1 if rate == 1 else 3, norm, rate), build_activation(activation))
            for rate in [1, *rates])
        # no norm on the pooled branch: its maps are 1x1, where GroupNorm of single channels is zero
        self.pool = nn.Sequential(nn.Conv2d(cin, cout, 1), build_activation(activation))
        self.project = nn.Sequential(conv_norm(cout * (len(rates) + 2), cout, 1, norm), build_activation(activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, cin, h, w) -> (B, cout, h, w)
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(ForestModel):
    """Encoder at stride 2**depth whose deepest block is dilated, ASPP + FiLM, fused with the level `low` skip."""

    def __init__(self, cfg, in_channels: int, out_channels: int, norm: str, *, aspp_rates: list[int],
                 film_hidden: int):
        super().__init__()
        depth = cfg.depth
        widths = [cfg.base_channels * 2 ** i for i in range(depth + 1)]
        make = block_factory(cfg, norm, film_hidden=film_hidden, cbam_reduction=0, residual=True)
        self.low = max(1, depth // 2)  # stride 4 for the usual depth 4, as in DeepLabV3+
        self.encoder = UNetEncoder(in_channels, widths, make, threshold_channel=False, positional=cfg.positional,
                                   dilations=[1] * depth + [2])
        aspp_channels, low_channels = widths[-1] // 2, widths[self.low] // 2
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.aspp = ASPP(widths[-1], aspp_channels, aspp_rates, norm, cfg.activation)
        self.film = FiLM(aspp_channels, film_hidden)
        self.reduce = nn.Sequential(conv_norm(widths[self.low], low_channels, 1, norm),
                                    build_activation(cfg.activation))
        self.fuse = make(aspp_channels + low_channels, widths[self.low], self.low)
        self.head = nn.Conv2d(widths[self.low], out_channels, 1)
        self.stride = 2 ** depth

    def network(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), thresholds (B,) normalised -> (B, out_channels, H, W)
        self.check_input(x)
        feats = self.encoder(x, thresholds)
        y = self.film(self.aspp(self.dropout(feats[-1])), thresholds)  # (B, aspp, H / 2**depth, ...)
        skip = feats[self.low]  # (B, widths[low], H / 2**low, ...)
        y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        y = self.dropout(self.fuse(torch.cat([y, self.reduce(skip)], dim=1), thresholds))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


@register("deeplabv3plus", uses=("drop_path",), extra={"aspp_rates": [2, 4, 6], "film_hidden": 32})
def deeplabv3plus(cfg, in_channels, out_channels, norm, aspp_rates, film_hidden):
    return DeepLabV3Plus(cfg, in_channels, out_channels, norm, aspp_rates=list(aspp_rates), film_hidden=film_hidden)
