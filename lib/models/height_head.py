"""Every threshold from one forward pass (model.height_head): the network maps heights, not one decision.

A threshold-conditioned model (FiLM) must run again for each threshold asked for. This head instead reads
a canopy height and its uncertainty off the network once, and gives the gap probability at any T:

    p(gap at T) = sigmoid((T - height) / spread),   height = classical relative height + bias + correction,

where the classical relative height is a learnt convex mix of the relative-height input channels (the
classical rule: a gap where it is at most T; the mix starts on the widest one, the scene's ground filter),
the correction and the spread's log-factor are the network's first two output channels, and spread > 0.
With `pixel_mix` the network also gives one mix offset per channel: the mix is chosen per pixel, so a
model can take the opening where the terrain is flat and the filter where it is steep (each estimate wins
in its own regime), instead of one compromise for every scene. The probability rises with T, so the masks
nest by construction; the body never sees T, so K thresholds cost one forward
(ForestModel.forward_thresholds).

With a gate (gate_inputs > 0, as lib/models/prior.py's, but without T, so still one pass) the model can
hand a whole tile to the classical method's sharp rule on one channel (gate_channel: on flat closed
canopy the wide opening finds the ground through LiDAR pits, where the filter sits a few decimetres
high); the gate learns from its own per-tile target, and eval forwards return the mixture, which rises
with T like both of its parts, so the masks still nest.

The network's output layer starts at zero, so training starts at the rule (spread 1/16 of the
normalisation scale, about 1 logit per metre) and a correction grows only where the data asks for it:
only that last layer is zero, and its weights get gradients from the first step, unlike a FiLM scale at 0.
"""
import math

import torch
from torch import nn

from lib.core.errors import ModelError
from lib.models.prior import gate_channel_index, gated_output, pop_gate, tile_gate, tile_statistics

INITIAL_SPREAD = 1.0 / 16.0  # normalised units: the classical prior's initial gain of 16 logits per unit
WIDEST_START = 4.0           # the mix's first logit on the widest-context channel: weight e^4 / (e^4 + n - 1)
SPREAD_RANGE = 4.0           # the network scales the spread by at most e^4 either way (bounded: no overflow)


class HeightHead(nn.Module):
    """(T - height) / spread from the relative-height channels of x and the network's output channels."""

    threshold_free = True  # the body is run with T = 0: its output does not depend on the threshold
    record_parts = False

    def __init__(self, channels, pixel_mix: bool = False, gate_inputs: int = 0, gate_channel: int = -1):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 0:
            raise ModelError(f"the height head needs the indices of relative-height input channels, found {channels}",
                             hint="add a relative_height_<W>m entry to data.input_features")
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long), persistent=False)
        # the mix starts on the last channel, the widest context (the ground filter's when the input has it):
        # training starts at the best classical method the inputs hold, not at an average of weaker ones
        start = torch.zeros(len(channels))
        start[-1] = WIDEST_START
        self.mix = nn.Parameter(start) if len(channels) > 1 else None
        self.pixel_mix = bool(pixel_mix) and self.mix is not None
        # correction, the spread's log-factor, then with pixel_mix one mix offset per channel
        self.network_channels = 2 + (len(channels) if self.pixel_mix else 0)
        self.bias = nn.Parameter(torch.zeros(()))
        self.log_spread = nn.Parameter(torch.tensor(math.log(INITIAL_SPREAD)))
        self.gate = tile_gate(2 * int(gate_inputs)) if gate_inputs else None       # tile statistics only
        self.gate_channel = gate_channel_index(channels, gate_channel)
        self.recorded_gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def start_from_rule(self, head: nn.Module) -> None:
        """Zero the network's output layer (a conv with bias): the first output is the classical rule."""
        if not isinstance(head, nn.Conv2d) or head.out_channels != self.network_channels or head.bias is None:
            raise ModelError(f"the height head needs the model's output layer `head` to be a Conv2d with "
                             f"{self.network_channels} outputs and a bias, found {head!r}")
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    def height_spread(self, x: torch.Tensor, network: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Height and spread (each B, 1, H, W; normalised units) from x (B, C, H, W) and network
        (B, network_channels, H, W)."""
        height = x.index_select(1, self.channels)                                    # (B, n, H, W)
        if self.mix is not None:
            mix = self.mix.to(x.dtype).view(1, -1, 1, 1)
            if self.pixel_mix:
                mix = mix + network[:, 2:]
            height = (height * mix.softmax(1)).sum(1, keepdim=True)
        height = height + self.bias.to(x.dtype) + network[:, :1]
        log_factor = SPREAD_RANGE * torch.tanh(network[:, 1:2] / SPREAD_RANGE)
        return height, (self.log_spread.to(x.dtype) + log_factor).exp()

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor, network: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, H, W) at one threshold per sample, thresholds (B,) normalised."""
        return self._logits(x, thresholds.to(x.dtype).view(-1, 1, 1, 1), network)

    def every_threshold(self, x: torch.Tensor, thresholds: torch.Tensor, network: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) at every one of thresholds (K,) normalised, from one network output."""
        return self._logits(x, thresholds.to(x.dtype).view(1, -1, 1, 1), network)

    def _logits(self, x: torch.Tensor, t: torch.Tensor, network: torch.Tensor) -> torch.Tensor:
        """t (B or 1, K, 1, 1); with a gate: the model's logits in training (recorded for its loss), the
        mixture's in eval."""
        height, spread = self.height_spread(x, network)
        out = (t - height) / spread
        if self.gate is None:
            return out
        return gated_output(self, self.gate(tile_statistics(x)).view(-1, 1, 1, 1), x, t, out)

    def pop_gate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pop_gate(self)
