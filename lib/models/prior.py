"""The classical DSM-only rule as a logit the network corrects (model.classical_prior).

The classical method calls a pixel a gap when its relative height (DSM minus a grey opening of the
DSM) is at most T. Given that quantity as input channels, a network still has to learn the rule from
scratch, and a short training run learns it badly where the rule is nearly exact (flat, closed
canopy). Added to the network's logits, the rule is where the model starts; the network learns only
the corrections (steep slopes, where the opening follows the canopy).
"""
import math

import torch
from torch import nn

from lib.errors import ModelError

INITIAL_GAIN = 16.0  # logits per normalised unit: about 1 logit per metre at the usual ~17 m scale


class ClassicalPrior(nn.Module):
    """gain * (T - h) + bias, h a learned convex mix of the relative-height input channels.

    Inputs and threshold are in the same normalised units (lib.normalize), so T - h compares metres.
    At init the mix is uniform and the bias zero: p = 0.5 exactly where h = T, as in the classical rule.
    """

    def __init__(self, channels):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 0:
            raise ModelError(f"classical prior needs the indices of relative-height input channels, found "
                             f"{channels}", hint="add a relative_height_<W>m entry to data.input_features")
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long), persistent=False)
        self.mix = nn.Parameter(torch.zeros(len(channels)))
        self.log_gain = nn.Parameter(torch.tensor(math.log(INITIAL_GAIN)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # x (B, C, H, W), thresholds (B,) -> (B, 1, H, W) logits
        weights = self.mix.softmax(0).to(x.dtype).view(1, -1, 1, 1)
        height = (x.index_select(1, self.channels) * weights).sum(1, keepdim=True)
        t = thresholds.to(x.dtype).view(-1, 1, 1, 1)
        return self.log_gain.exp().to(x.dtype) * (t - height) + self.bias.to(x.dtype)
