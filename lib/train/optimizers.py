"""Optimisers with parameter groups (no weight decay on norms/biases, lower LR for pretrained layers), and clipping."""
import torch

from lib.core.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")


def parameter_groups(model: torch.nn.Module, weight_decay: float, encoder_ids: set[int] = frozenset(),
                     encoder_lr_scale: float = 1.0) -> list[dict]:
    """Split parameters by (decay?, encoder?) into groups; each group carries its `lr_scale`."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((no_decay, id(param) in encoder_ids), []).append(param)
    out = []
    for (no_decay, encoder), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr_scale": encoder_lr_scale if encoder else 1.0})
    return out


def build_optimizer(cfg_optim, model: torch.nn.Module, extra_params=()):
    """Optimiser over the model (+ e.g. a learnable loss's parameters) from the `optim` section; the
    encoder's groups get LR x optim.encoder_lr_scale (fine-tuning pretrained layers more gently)."""
    encoder_lr_scale = cfg_optim.encoder_lr_scale
    encoder_ids = set()
    if encoder_lr_scale != 1.0 and hasattr(model, "encoder_parameters"):
        encoder_ids = {id(p) for p in model.encoder_parameters()}
    groups = parameter_groups(model, cfg_optim.weight_decay, encoder_ids, encoder_lr_scale)
    extra = [p for p in extra_params if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0, "lr_scale": 1.0})
    name = cfg_optim.name
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg_optim.lr, betas=(cfg_optim.momentum, 0.999))
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg_optim.lr, betas=(cfg_optim.momentum, 0.999))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg_optim.lr, momentum=cfg_optim.momentum,
                               nesterov=cfg_optim.nesterov and cfg_optim.momentum > 0)
    raise ConfigError(f"optim.name {name!r} is not one of {OPTIMIZERS}")


def clip_gradients(params, mode: str, value: float) -> torch.Tensor:
    """Clip in place; returns the total gradient norm BEFORE clipping (a tensor: no host sync here)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
    if value <= 0:
        return norm
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, value, foreach=True)
    elif mode == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    elif mode == "adaptive":
        # Adaptive gradient clipping (Brock et al. 2021): cap ||g|| / ||w|| per tensor at `value`.
        for p in params:
            w_norm = torch.linalg.vector_norm(p.detach()).clamp_min(1e-3)
            g_norm = torch.linalg.vector_norm(p.grad.detach()).clamp_min(1e-6)
            p.grad.mul_(torch.clamp(value * w_norm / g_norm, max=1.0))
    else:
        raise ConfigError(f"optim.clip_mode {mode!r} is not one of norm, value, adaptive")
    return norm
