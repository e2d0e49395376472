"""The classical DSM-only rule as a logit the network corrects (model.classical_prior).

The classical method calls a pixel a gap when its relative height (DSM minus a grey opening of the
DSM) is at most T. Given that quantity as input channels, a network still has to learn the rule from
scratch, and a short training run learns it badly where the rule is nearly exact (flat, closed
canopy). Added to the network's logits, the rule is where the model starts; the network learns only
the corrections (steep slopes, where the opening follows the canopy).

With model.prior_trust_map the network also sets the rule's two knobs per pixel: how far to trust it
(an output channel that scales its gain) and, with several relative-height channels, which opening
window to use (one output channel per window, offsets to the learned mix). One global gain and one
window must be a compromise between flat ground, where the wide window is exact to the pixel (LiDAR
pits included), and slopes, where narrow windows follow the ground better and the rule is still often
wrong; per pixel, the rule can decide sharply where it is right and fade where it is not, without the
network redrawing one-pixel detail it cannot see as well as the rule does. In that mode the network's
output layer starts at zero (start_from_rule), so training begins exactly at the rule, with full trust,
the global mix and no correction, and a correction grows only where the data asks for it. (Only that
last layer: the layers before it still get gradients through its weights after the first step, unlike
a FiLM scale initialised to 0.) With trust_scope "tile" the knobs are averaged over the tile (or the
prediction window): whether the rule holds is a regional matter (flat or steep ground, LiDAR or
photogrammetry), and per-pixel knobs became one more way to redraw pixels, which did not generalise.

Four options move the balance between the rule and the correction (docs/quality.md measures them):
no learnt bias (the boundary stays at h = T), a sharper start (initial_trust, a log-factor on the gain),
a penalty on the correction's size (loss.prior_correction_weight) and the task's loss on the rule alone
(loss.prior_rule_weight), which asks the knobs to make the rule right by itself wherever it can be; both
losses read the last training forward's parts through pop_parts.

The gate (gate_inputs > 0) decides per tile between the model and the classical method itself (the
widest window, h <= T, sharp): a small MLP on tile statistics of the inputs (mean and spread of each
channel, and T) gives the weight of the classical probability in the output. It is not learnt from the
task's loss (a gate learnt that way opened on every tile, docs/quality.md) but from a per-tile target:
1 where the classical decision makes fewer pixel errors than the model's on that training tile. Training
forwards return the model's logits unchanged (the task's loss trains the model as without a gate); eval
forwards return the mixture, so on flat closed canopy, where the opening finds the ground through
LiDAR pits, the model can hand the tile to the classical rule.
"""
import math

import torch
from torch import nn

from lib.core.errors import ModelError
from lib.gaps.masks import IGNORE

INITIAL_GAIN = 16.0  # logits per normalised unit: about 1 logit per metre at the usual ~17 m scale
TRUST_RANGE = 4.0    # the trust channel scales the gain by at most e^4 either way (bounded: no overflow)
CLASSICAL_GAIN = INITIAL_GAIN * math.exp(2.0)  # the gate's classical decision: sharp (~7 logits per metre)
GATE_START = -2.0    # the gate's first logit: weight 0.12 on the classical method


class ClassicalPrior(nn.Module):
    """gain * (T - h) + bias, h a learned convex mix of the relative-height input channels (bias optional).

    Inputs and threshold are in the same normalised units (lib.data.normalize), so T - h compares metres.
    At init the mix is uniform and the bias zero: p = 0.5 exactly where h = T, as in the classical rule.
    trust_map: the network's output has more channels, per-pixel knobs of the rule (see rule()).
    """

    def __init__(self, channels, trust_map: bool = False, trust_scope: str = "pixel", bias: bool = True,
                 initial_trust: float = 0.0, gate_inputs: int = 0, gate_channel: int = -1):
        super().__init__()
        if trust_scope not in ("pixel", "tile"):
            raise ModelError(f"classical prior trust scope must be 'pixel' or 'tile', found {trust_scope!r}")
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 0:
            raise ModelError(f"classical prior needs the indices of relative-height input channels, found "
                             f"{channels}", hint="add a relative_height_<W>m entry to data.input_features")
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long), persistent=False)
        self.trust_map = bool(trust_map)
        self.trust_scope = trust_scope
        if not abs(initial_trust) < TRUST_RANGE:
            raise ModelError(f"classical prior initial trust must be within (-{TRUST_RANGE:g}, {TRUST_RANGE:g}) "
                             f"(a log-factor on the gain), found {initial_trust}")
        self.initial_trust = float(initial_trust)
        # one channel: no mix to learn (a softmax over one weight has no gradient)
        self.mix = nn.Parameter(torch.zeros(len(channels))) if len(channels) > 1 else None
        self.log_gain = nn.Parameter(torch.tensor(math.log(INITIAL_GAIN)))
        self.bias = nn.Parameter(torch.zeros(())) if bias else None  # None: the boundary stays at h = T
        self.gate = tile_gate(2 * int(gate_inputs) + 1) if gate_inputs else None  # tile statistics, then T
        self.gate_channel = gate_channel_index(channels, gate_channel)
        self.recorded_gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.record_parts = False  # set by the trainer for loss.prior_correction_weight / prior_rule_weight
        self.recorded_parts: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def network_channels(self) -> int:
        """Output channels the network must give: its correction, then with a trust map the trust and one
        window-mix offset per relative-height channel (none for a single channel)."""
        if not self.trust_map:
            return 1
        return 2 + (len(self.channels) if self.mix is not None else 0)

    def start_from_rule(self, head: nn.Module) -> None:
        """Zero the network's output layer (a conv with bias), so the model's first output is the rule (with
        its gain scaled by e^initial_trust)."""
        if not isinstance(head, nn.Conv2d) or head.out_channels != self.network_channels or head.bias is None:
            raise ModelError(f"the classical prior's trust map needs the model's output layer `head` to be a "
                             f"Conv2d with {self.network_channels} outputs and a bias, found {head!r}")
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        with torch.no_grad():  # the trust channel's raw value whose bounded log-factor is initial_trust
            head.bias[1] = TRUST_RANGE * math.atanh(self.initial_trust / TRUST_RANGE)

    def rule(self, x: torch.Tensor, thresholds: torch.Tensor, modulation: torch.Tensor | None = None) -> torch.Tensor:
        """The rule's logits (B, 1, H, W) from x (B, C, H, W) and thresholds (B,).

        modulation: the network's raw per-pixel knobs (B, network_channels - 1, H, W): trust, then mix offsets.
        """
        if modulation is not None and self.trust_scope == "tile":
            modulation = modulation.mean((2, 3), keepdim=True)
        height = x.index_select(1, self.channels)                                   # (B, n, H, W)
        log_gain = self.log_gain.to(x.dtype)
        if modulation is not None:
            log_gain = log_gain + TRUST_RANGE * torch.tanh(modulation[:, :1] / TRUST_RANGE)
        if self.mix is not None:
            mix = self.mix.to(x.dtype).view(1, -1, 1, 1)
            if modulation is not None:
                mix = mix + modulation[:, 1:]
            height = (height * mix.softmax(1)).sum(1, keepdim=True)
        t = thresholds.to(x.dtype).view(-1, 1, 1, 1)
        logits = log_gain.exp() * (t - height)
        return logits if self.bias is None else logits + self.bias.to(x.dtype)

    def pop_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's correction and the rule's logits (each B, 1, H, W) of the last training forward,
        once (for the loss's extra terms)."""
        parts, self.recorded_parts = self.recorded_parts, None
        if parts is None:
            raise ModelError("no parts recorded: set record_parts and run a forward in training mode")
        return parts

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor, network: torch.Tensor) -> torch.Tensor:
        """The model's logits (B, 1, H, W): the network's correction (its first channel) plus the rule; with
        a gate, in eval, the logit of the gate's mixture of that model and the classical method."""
        correction = network[:, :1]
        rule = self.rule(x, thresholds, network[:, 1:] if self.trust_map else None)
        if self.record_parts and self.training:
            self.recorded_parts = correction, rule
        out = correction + rule
        if self.gate is None:
            return out
        t = thresholds.to(x.dtype).view(-1, 1)
        gate = self.gate(torch.cat([tile_statistics(x), t], 1)).view(-1, 1, 1, 1)
        return gated_output(self, gate, x, t.view(-1, 1, 1, 1), out)

    def pop_gate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pop_gate(self)


def tile_gate(inputs: int) -> nn.Sequential:
    """The gate's MLP: tile statistics -> the logit of the classical method's weight, GATE_START at init."""
    gate = nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 1))
    nn.init.zeros_(gate[2].weight)
    nn.init.constant_(gate[2].bias, GATE_START)
    return gate


def gate_channel_index(channels, position: int) -> int:
    """The input channel of the gate's classical rule: relative-height channel number `position`."""
    if not -len(channels) <= position < len(channels):
        raise ModelError(f"model.prior_gate_channel {position} is not one of the {len(channels)} relative-height "
                         f"channels (0..{len(channels) - 1}, or -1 for the last)")
    return int(channels[position])


def tile_statistics(x: torch.Tensor) -> torch.Tensor:
    """(B, 2C): mean and spread of each input channel over the tile, detached (the gate's own target
    trains it, not the task's loss)."""
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).detach()


def gated_output(prior, gate: torch.Tensor, x: torch.Tensor, thresholds: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A gated prior's output: in training the model's logits `out` (B, K, H, W), with the gate's logit
    (B, 1, 1, 1), the classical logits and `out` recorded for gate_loss; in eval the logits of the mixture
    sigmoid(gate) x the classical probability + the rest x the model's. The classical method is the sharp
    rule h <= T on the prior's gate_channel, at thresholds (B or 1, K, 1, 1)."""
    classical = CLASSICAL_GAIN * (thresholds - x[:, prior.gate_channel:prior.gate_channel + 1])
    if prior.training:
        prior.recorded_gate = gate, classical, out.detach()
        return out
    return torch.logit(gate_mixture(gate, classical, out).clamp(1e-6, 1 - 1e-6))


def gate_mixture(gate: torch.Tensor, classical: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """The gap probability a gate makes: sigmoid(gate) x the classical method's + the rest x the model's."""
    weight = torch.sigmoid(gate)
    return weight * torch.sigmoid(classical) + (1 - weight) * torch.sigmoid(model)


def pop_gate(prior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate's logit (B, 1, 1, 1), the classical and the model's logits (B, 1, H, W, the model's
    detached) of the last training forward, once (for gate_loss)."""
    recorded, prior.recorded_gate = prior.recorded_gate, None
    if recorded is None:
        raise ModelError("no gate recorded: the prior needs a gate and a forward in training mode")
    return recorded


def gate_loss(gate: torch.Tensor, classical: torch.Tensor, model: torch.Tensor, target: torch.Tensor,
              objective: str = "tile") -> torch.Tensor:
    """The gate's loss from its logits (B, 1, 1, 1) and the labels target (B, 1, H, W; IGNORE not counted).

    "tile": BCE against a per-tile target, 1 where the classical decision (logits > 0) errs on fewer
    labelled pixels than the model's. "mixture": BCE of the mixture the gate makes in eval (gated_output)
    against the labels, so a tile where the two are close costs little either way and the weight goes
    to one side only where that side is clearly better; the model's logits are detached (the task's loss
    trains it).
    """
    valid = (target != IGNORE).float()
    truth = target.float() * valid
    if objective == "mixture":
        mixture = gate_mixture(gate.float(), classical.float(), model.float())
        pixels = nn.functional.binary_cross_entropy(mixture.clamp(1e-6, 1 - 1e-6), truth, reduction="none")
        return (pixels * valid).sum() / valid.sum().clamp(min=1)

    def error_rate(logits):
        return (((logits > 0).float() != truth).float() * valid).sum((1, 2, 3)) / valid.sum((1, 2, 3)).clamp(min=1)
    better = (error_rate(classical) < error_rate(model)).float()
    return nn.functional.binary_cross_entropy_with_logits(gate.float().view(-1), better)
