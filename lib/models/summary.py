"""model_summary: parameter count and forward FLOPs of one sample."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from lib.models.registry import ForestModel


def model_summary(model: ForestModel, input_hw: tuple[int, int] = (256, 256)) -> dict:
    """params, trainable params, and FLOPs of one eval forward of a (1, C, H, W) input.

    FLOPs are counted by FlopCounterMode: convolutions and matmuls, 2 per multiply-add; element-wise ops
    (norms, activations, FiLM) are not counted.
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    x = torch.zeros(1, model.build_kwargs["in_channels"], *input_hw, device=device)  # (1, C, H, W)
    thresholds = torch.zeros(1, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, thresholds)
    finally:
        model.train(was_training)
    return {"params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "flops": counter.get_total_flops()}
