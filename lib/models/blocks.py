"""Layers shared by every architecture: norms, activations, FiLM, DropPath, conv blocks, extra inputs."""
import math

import torch
from torch import nn

from lib.core.errors import ModelError

# Below this per-device batch BatchNorm statistics are too noisy and GroupNorm wins (Wu & He, 2018).
MIN_BATCHNORM_BATCH = 16
GROUPS = 32  # GroupNorm groups when the width allows it

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
}


def build_activation(name: str) -> nn.Module:
    """A fresh activation module by config name."""
    if name not in ACTIVATIONS:
        raise ModelError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def resolve_norm(norm: str, batch_size: int | None) -> str:
    """The norm layer to build: 'adaptive' becomes 'batch' or 'group' from the per-device batch size.

    Decided once, at build time, and recorded in the model (see ForestModel.build_kwargs) so a checkpoint
    rebuilds the same layers whatever batch size predict or export use. No batch size means large enough.
    """
    if norm != "adaptive":
        return norm
    return "batch" if batch_size is None or batch_size >= MIN_BATCHNORM_BATCH else "group"


def build_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d, GroupNorm (gcd(channels, 32) groups) or Identity."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, GROUPS), channels)
    if kind == "none":
        return nn.Identity()
    raise ModelError(f"unknown norm {kind!r}; valid: adaptive, batch, group, none")


def conv_norm(cin: int, cout: int, kernel: int, norm: str, dilation: int = 1) -> nn.Sequential:
    """Conv (same padding) then norm; the conv has a bias only when no norm follows to cancel it."""
    conv = nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                     bias=norm == "none")
    return nn.Sequential(conv, build_norm(norm, cout))


class FiLM(nn.Module):
    """Per-channel x * (1 + dgamma(t)) + beta(t) from the normalised threshold t; the identity at init.

    The last layer starts at zero, so the hidden layer gets no gradient on the very first step; it does
    from the second (a zero gamma instead would silence the network).
    """

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), thresholds (B,)
        dgamma, beta = self.mlp(thresholds[:, None].to(x.dtype)).chunk(2, dim=1)  # (B, C) each
        return x * (1 + dgamma[:, :, None, None]) + beta[:, :, None, None]


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples with probability p while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)  # (B, 1, 1, 1)
        return x * mask / keep


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al., 2018): channel weights, then a spatial weight map.

    In eval mode the spatial map is kept in `last_map` (B, 1, H, W) for TensorBoard. The shared MLP uses
    SiLU, not the paper's ReLU: with C / 16 hidden units and non-negative pooled inputs, every ReLU unit
    can start dead (seen with 4 units), and then the channel attention never learns.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7):
        super().__init__()
        hidden = max(channels // reduction, min(channels, 4))
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)
        self.last_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W); the shared MLP sees both the mean- and the max-pooled descriptor
        pooled = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(pooled)  # (B, C, 1, 1) broadcast
        stats = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W)
        weight = torch.sigmoid(self.spatial(stats))  # (B, 1, H, W)
        if not self.training:
            self.last_map = weight.detach()
        return x * weight


class ConvBlock(nn.Module):
    """Two 3x3 conv-norm layers with activations; optionally FiLM, CBAM, and a residual with DropPath.

    Order: conv-norm-act, conv-norm, FiLM, CBAM, (+ shortcut), act.
    """

    def __init__(self, cin: int, cout: int, *, norm: str, activation: str, film_hidden: int = 0,
                 cbam_reduction: int = 0, residual: bool = False, drop_path: float = 0.0, dilation: int = 1):
        super().__init__()
        self.conv1 = conv_norm(cin, cout, 3, norm, dilation)
        self.act1 = build_activation(activation)
        self.conv2 = conv_norm(cout, cout, 3, norm, dilation)
        self.film = FiLM(cout, film_hidden) if film_hidden else None
        self.cbam = CBAM(cout, cbam_reduction) if cbam_reduction else None
        self.residual = residual
        self.shortcut = conv_norm(cin, cout, 1, norm) if residual and cin != cout else nn.Identity()
        self.drop_path = DropPath(drop_path)
        self.act2 = build_activation(activation)

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # x (B, cin, H, W) -> (B, cout, H, W)
        h = self.conv2(self.act1(self.conv1(x)))
        if self.film is not None:
            h = self.film(h, thresholds)
        if self.cbam is not None:
            h = self.cbam(h)
        if self.residual:
            h = self.shortcut(x) + self.drop_path(h)
        return self.act2(h)


def positional_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W): x and y in [-1, 1] at pixel centres, and the distance to the tile centre in [0, 1]."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) * (2 / h) - 1  # (H,)
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) * (2 / w) - 1  # (W,)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    dist = torch.sqrt(gx ** 2 + gy ** 2) / math.sqrt(2)
    return torch.stack([gx, gy, dist])[None].expand(b, -1, -1, -1)


def add_input_channels(x: torch.Tensor, thresholds: torch.Tensor | None, *, threshold_channel: bool,
                       positional: bool) -> torch.Tensor:
    """Append a constant threshold channel and/or positional channels to the data channels."""
    parts = [x]
    if threshold_channel:
        t = thresholds if thresholds is not None else x.new_zeros(x.shape[0])
        parts.append(t.to(x.dtype)[:, None, None, None].expand(-1, 1, *x.shape[2:]))
    if positional:
        parts.append(positional_channels(x))
    return torch.cat(parts, dim=1) if len(parts) > 1 else x


def apply_spectral_norm(model: nn.Module, skip=()) -> nn.Module:
    """Spectral normalisation on every conv and linear weight except FiLM's and `skip`'s (zero-initialised
    layers: sigma = 0)."""
    excluded = [m for m in model.modules() if isinstance(m, FiLM)] + list(skip)
    excluded_ids = {id(m) for layer in excluded for m in layer.modules()}
    layers = [m for m in model.modules()
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and id(m) not in excluded_ids]
    for layer in layers:
        nn.utils.parametrizations.spectral_norm(layer)
    return model
