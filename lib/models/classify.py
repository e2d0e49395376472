"""Tile classifiers: the dilated CNN, and a pooled linear head on any segmentation encoder."""
import torch
from torch import nn

from lib.models.blocks import add_input_channels, build_activation, conv_norm
from lib.models.registry import ForestModel, register


@register("cnn_dilated", uses=("blocks_per_stage", "dilation_stage3"), stride=lambda cfg: 4,
          classifier_only=True)
class CNNDilated(ForestModel):
    """Three stages of conv-norm-act blocks (base, 2*base, 4*base channels; 64/128/256 at base 64),
    2x2 max-pool after stages 1 and 2, dilated 3x3 convs in stage 3, global average pooling, linear head.
    """

    def __init__(self, cfg, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.positional = cfg.positional
        layers, cin = [], in_channels + 3 * int(cfg.positional)
        for stage in range(3):
            cout = cfg.base_channels * 2 ** stage
            dilation = cfg.dilation_stage3 if stage == 2 else 1
            for _ in range(cfg.blocks_per_stage):
                layers += [conv_norm(cin, cout, 3, norm, dilation), build_activation(cfg.activation)]
                cin = cout
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
        self.encoder = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cin, out_channels)
        self.stride = 4

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 4 * base, H / 4, W / 4) before pooling (its receptive field grows with dilation)."""
        return self.encoder(add_input_channels(x, None, threshold_channel=False, positional=self.positional))

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, C, H, W) -> (B, num_classes) logits; thresholds are accepted and unused
        self.check_input(x)
        return self.classifier(self.dropout(self.features(x).mean((2, 3))))


class EncoderClassifier(ForestModel):
    """Global-average-pooled deepest features of a segmentation model's encoder, then a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float, stride: int):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.out_channels[-1], num_classes)
        self.stride = stride

    def forward(self, x: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, C, H, W), thresholds (B,) or None (FiLM then sees 0) -> (B, num_classes) logits
        self.check_input(x)
        if thresholds is None:
            thresholds = x.new_zeros(x.shape[0])
        deepest = self.encoder(x, thresholds)[-1]  # (B, C', H / stride, W / stride)
        return self.classifier(self.dropout(deepest.mean((2, 3))))
