"""The U-Net family: plain, FiLM, CBAM, FiLM+CBAM, residual with gates, and linear attention at the bottleneck.

All of them are built from symmetric operations (3x3 convs, 2x2 max-pools, 2x2 stride-2 transposed convs,
1x1 convs, global pooling), so a model whose kernels are D4-symmetric is exactly D4-equivariant.
"""
import torch
import torch.nn.functional as F
from torch import nn

from lib.models.attention import AttentionGate, LinearAttention
from lib.models.blocks import ConvBlock, add_input_channels
from lib.models.registry import ForestModel, register

FILM_CBAM_EXTRA = {"film_hidden": 32, "cbam_reduction": 16}


def block_factory(cfg, norm: str, *, film_hidden: int, cbam_reduction: int, residual: bool):
    """make(cin, cout, level, dilation) -> ConvBlock; in residual blocks DropPath rises linearly with level."""
    def make(cin: int, cout: int, level: int, dilation: int = 1) -> ConvBlock:
        drop_path = cfg.drop_path * level / cfg.depth if residual else 0.0
        return ConvBlock(cin, cout, norm=norm, activation=cfg.activation, film_hidden=film_hidden,
                         cbam_reduction=cbam_reduction, residual=residual, drop_path=drop_path, dilation=dilation)
    return make


class UNetEncoder(nn.Module):
    """One block per level (strides 1, 2, ..., 2**depth) with 2x2 max-pools between; every level, finest first.

    It owns the extra input channels (threshold, positional), so a classifier built on it sees the same input.
    """

    def __init__(self, in_channels: int, widths: list[int], make_block, *, threshold_channel: bool,
                 positional: bool, dilations: list[int] | None = None, attention: nn.Module | None = None):
        super().__init__()
        self.threshold_channel, self.positional = threshold_channel, positional
        dilations = dilations or [1] * len(widths)
        cins = [in_channels + int(threshold_channel) + 3 * int(positional)] + widths[:-1]
        self.blocks = nn.ModuleList(make_block(cin, cout, level, dilation)
                                    for level, (cin, cout, dilation) in enumerate(zip(cins, widths, dilations)))
        self.attention = attention
        self.out_channels = list(widths)

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor | None) -> list[torch.Tensor]:
        # x (B, C, H, W) -> [(B, widths[i], H / 2**i, W / 2**i) for each level i]
        x = add_input_channels(x, thresholds, threshold_channel=self.threshold_channel, positional=self.positional)
        feats = []
        for level, block in enumerate(self.blocks):
            # max-pool rather than a strided conv: symmetric, so D4 equivariance survives downsampling
            x = block(F.max_pool2d(x, 2) if level else x, thresholds)
            feats.append(x)
        if self.attention is not None:
            feats[-1] = self.attention(feats[-1])
        return feats


class UNetDecoder(nn.Module):
    """2x2 stride-2 transposed conv up, optional attention gate on the skip, concat, block, Dropout2d."""

    def __init__(self, widths: list[int], make_block, *, dropout: float, gates: bool):
        super().__init__()
        levels = range(len(widths) - 2, -1, -1)  # deepest skip first
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in levels)
        self.gates = nn.ModuleList(AttentionGate(widths[i], widths[i], max(widths[i] // 2, 1))
                                   for i in levels) if gates else None
        self.blocks = nn.ModuleList(make_block(2 * widths[i], widths[i], i) for i in levels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, feats: list[torch.Tensor], thresholds: torch.Tensor) -> torch.Tensor:
        x = feats[-1]  # (B, widths[-1], H / 2**depth, W / 2**depth)
        skips = feats[-2::-1]
        for i, (up, block, skip) in enumerate(zip(self.ups, self.blocks, skips)):
            x = up(x)  # (B, widths[level], ...) at the skip's resolution
            if self.gates is not None:
                skip = self.gates[i](skip, x)
            x = self.dropout(block(torch.cat([x, skip], dim=1), thresholds))
        return x  # (B, widths[0], H, W)


class UNet(ForestModel):
    """U-Net conditioned on the threshold by FiLM in every block, or else by a constant input channel."""

    def __init__(self, cfg, in_channels: int, out_channels: int, norm: str, *, film: bool, cbam: bool,
                 residual: bool = False, attention_heads: int = 0, film_hidden: int = 32, cbam_reduction: int = 16):
        super().__init__()
        widths = [cfg.base_channels * 2 ** i for i in range(cfg.depth + 1)]
        make = block_factory(cfg, norm, film_hidden=film_hidden if film else 0,
                             cbam_reduction=cbam_reduction if cbam else 0, residual=residual)
        attention = LinearAttention(widths[-1], attention_heads, norm) if attention_heads else None
        self.encoder = UNetEncoder(in_channels, widths, make, threshold_channel=not film,
                                   positional=cfg.positional, attention=attention)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.decoder = UNetDecoder(widths, make, dropout=cfg.dropout, gates=cfg.attention_gates)
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.stride = 2 ** cfg.depth

    def network(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), thresholds (B,) normalised -> (B, out_channels, H, W)
        self.check_input(x)
        feats = self.encoder(x, thresholds)
        feats[-1] = self.dropout(feats[-1])  # the bottleneck
        return self.head(self.decoder(feats, thresholds))


@register("unet", uses=("attention_gates",))
def unet(cfg, in_channels, out_channels, norm):
    return UNet(cfg, in_channels, out_channels, norm, film=False, cbam=False)


@register("unet_film", uses=("attention_gates",), extra={"film_hidden": 32})
def unet_film(cfg, in_channels, out_channels, norm, film_hidden):
    return UNet(cfg, in_channels, out_channels, norm, film=True, cbam=False, film_hidden=film_hidden)


@register("unet_cbam", uses=("attention_gates",), extra={"cbam_reduction": 16})
def unet_cbam(cfg, in_channels, out_channels, norm, cbam_reduction):
    return UNet(cfg, in_channels, out_channels, norm, film=False, cbam=True, cbam_reduction=cbam_reduction)


@register("unet_film_cbam", uses=("attention_gates",), extra=FILM_CBAM_EXTRA)
def unet_film_cbam(cfg, in_channels, out_channels, norm, **extra):
    return UNet(cfg, in_channels, out_channels, norm, film=True, cbam=True, **extra)


@register("res_unet_film_cbam", uses=("attention_gates", "drop_path"), extra=FILM_CBAM_EXTRA)
def res_unet_film_cbam(cfg, in_channels, out_channels, norm, **extra):
    return UNet(cfg, in_channels, out_channels, norm, film=True, cbam=True, residual=True, **extra)


@register("unet_linear_attention", uses=("attention_gates",), extra={"film_hidden": 32, "attention_heads": 4})
def unet_linear_attention(cfg, in_channels, out_channels, norm, film_hidden, attention_heads):
    return UNet(cfg, in_channels, out_channels, norm, film=True, cbam=False, film_hidden=film_hidden,
                attention_heads=attention_heads)
