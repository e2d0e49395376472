"""Model zoo: shapes, gradients, FiLM identity and conditioning, D4 equivariance, norms, errors, summaries."""
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.core.config import load_config
from lib.core.errors import ModelError
from lib.models import MODELS, build_model, model_summary, rebuild_model, stride_of
from lib.models.blocks import CBAM, DropPath, FiLM, positional_channels, resolve_norm
from lib.core.schema import ModelConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, and on a loaded 2-core machine they
    multiplied this file's wall time by ~7 (measured 22 s with one thread, 167 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DENSE = sorted(name for name, spec in MODELS.items() if not spec.classifier_only)
FILM_MODELS = [name for name in DENSE if name not in ("unet", "unet_cbam")]


def tiny(name: str, **changes) -> ModelConfig:
    base = dict(name=name, base_channels=8, depth=3, norm="batch", dropout=0.1)
    if name == "res_unet_film_cbam":
        base.update(attention_gates=True)
    return ModelConfig(**{**base, **changes})


def smooth_field(b: int, hw: int, seed: int) -> torch.Tensor:
    """(b, 1, hw, hw) smooth random surface with unit standard deviation."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(b, 1, hw + 6, hw + 6, generator=g), 7, stride=1)
    return (x - x.mean()) / x.std()


def zero_grad_names(model: nn.Module) -> list[str]:
    """Trainable parameters that got no gradient (frozen ones cannot: see test_no_threshold_no_threshold_weights)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


def check_gradients(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    """Every trainable parameter gets gradient, except exactly the FiLM hidden layers at init (behind a zero
    layer), which get it after one optimiser step."""
    film_hidden = {n for n, p in model.named_parameters() if "film.mlp.0." in n and p.requires_grad}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # gentle: a big step can saturate a sigmoid
    for step in range(2):
        opt.zero_grad()
        out = model(x, t)
        (out * torch.randn_like(out)).mean().backward()
        dead = zero_grad_names(model)
        if step == 0:
            assert set(dead) == film_hidden, f"without gradient at init: {sorted(set(dead) ^ film_hidden)}"
            opt.step()
    assert not dead, f"parameters without gradient after one step: {dead}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shape_backward_and_every_parameter_learns(name):
    torch.manual_seed(0)
    task = "classification" if MODELS[name].classifier_only else "segmentation"
    model = build_model(tiny(name), task=task, num_classes=3)
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([-0.5, 0.7])
    expected = (2, 3) if task == "classification" else (2, 1, 64, 64)
    assert model(x, t).shape == expected
    check_gradients(model, x, t)


@pytest.mark.parametrize("name", DENSE)
def test_classification_head_on_every_encoder(name):
    torch.manual_seed(0)
    model = build_model(tiny(name, depth=2), task="classification", num_classes=4)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([0.1, 0.9])
    assert model(x, t).shape == (2, 4)
    assert model(x).shape == (2, 4)  # thresholds are optional for classifiers
    check_gradients(model, x, t)
    assert sum(p.numel() for p in model.encoder_parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_no_threshold_no_threshold_weights(task):
    """Tasks that feed a constant 0 threshold freeze exactly FiLM's input weights: they cannot get a gradient,
    so the optimiser and the gradient alerts leave them alone."""
    model = build_model(tiny("unet_film_cbam"), task=task, num_classes=3 if task == "classification" else None)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.endswith("film.mlp.0.weight")} and frozen
    seg = build_model(tiny("unet_film_cbam"), task="segmentation")
    assert all(p.requires_grad for p in seg.parameters())


def test_regression_task_gives_one_map():
    model = build_model(tiny("unet_film"), task="regression")
    assert model(torch.randn(2, 1, 64, 64), torch.zeros(2)).shape == (2, 1, 64, 64)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.ones(4000, 2, 3, 3)
    y = drop(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs((per_sample[:, 0] == 0).float().mean() - 0.25) < 0.03
    assert torch.equal(drop.eval()(x), x)


def test_film_is_identity_at_init():
    film = FiLM(6)
    x = torch.randn(3, 6, 5, 7)
    assert torch.equal(film(x, torch.tensor([-3.0, 0.0, 12.0])), x)


@pytest.mark.parametrize("name", DENSE)
def test_threshold_changes_output_after_training(name):
    """FiLM models ignore the threshold at init (identity) and learn to use it within a few steps."""
    torch.manual_seed(0)
    model = build_model(tiny(name, depth=2, dropout=0.0))
    x = smooth_field(2, 32, seed=1).repeat(2, 1, 1, 1)  # (4, 1, 32, 32)
    t = torch.tensor([-0.5, -0.5, 0.5, 0.5])

    def probe():  # how much the output moves between two thresholds
        return (model(x[:2], torch.full((2,), -1.0)) - model(x[:2], torch.full((2,), 1.0))).abs().max()

    model.eval()
    at_init = probe()
    assert (at_init == 0) == (name in FILM_MODELS)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x, t), (x < t[:, None, None, None]).float()).backward()
        opt.step()
    model.eval()
    assert probe() > 1e-3


D4 = [lambda a, k=k, f=f: torch.rot90(a.flip(-1) if f else a, k, dims=(-2, -1)) for f in (0, 1) for k in range(4)]


def symmetrise_(model: nn.Module) -> None:
    """Average every conv kernel over the 8 D4 transforms, and perturb FiLM and BatchNorm (per-channel ops)
    so they take part."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.kernel_size[0] > 1:
                m.weight.copy_(torch.stack([g(m.weight) for g in D4]).mean(0))
            elif isinstance(m, FiLM):
                m.mlp[-1].weight.normal_(0, 0.3)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def d4_error(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Largest |model(g x) - g model(x)| over the D4 group (classifiers: |model(g x) - model(x)|)."""
    with torch.no_grad():
        y = model(x, t)
        dense = y.dim() == 4
        return max((model(g(x), t) - (g(y) if dense else y)).abs().max().item() for g in D4) / y.abs().max().item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_d4_equivariance_with_symmetric_kernels(name):
    """Every op is symmetric (max-pool, stride-2 transposed conv, bilinear, global pools, pointwise attention),
    so symmetric kernels make the whole model exactly equivariant; random kernels do not (the control)."""
    torch.manual_seed(0)
    task = "classification" if MODELS[name].classifier_only else "segmentation"
    model = build_model(tiny(name, depth=2), task=task, num_classes=3).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([0.3, -0.2])
    assert d4_error(model, x, t) > 1e-4  # control: generic kernels break the symmetry
    symmetrise_(model)
    assert d4_error(model, x, t) < 1e-5


def test_cbam_alone_is_equivariant_with_a_symmetric_spatial_kernel():
    torch.manual_seed(0)
    cbam = CBAM(8, reduction=2).eval()
    symmetrise_(cbam)
    x = torch.randn(2, 8, 12, 12)
    y = cbam(x)
    assert max((cbam(g(x)) - g(y)).abs().max().item() for g in D4) < 1e-6


def test_overfits_one_batch():
    """Learn gap = (surface below the threshold) for two thresholds on one batch: IoU > 0.95."""
    torch.manual_seed(0)
    model = build_model(tiny("unet_film_cbam", depth=2, dropout=0.0))
    x = smooth_field(4, 32, seed=2).repeat(2, 1, 1, 1)  # (8, 1, 32, 32)
    t = torch.tensor([-0.4] * 4 + [0.6] * 4)
    y = (x < t[:, None, None, None]).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        opt.zero_grad()
        logits = model(x, t)
        F.binary_cross_entropy_with_logits(logits, y).backward()
        opt.step()
        pred = (logits.detach() > 0).float()
        iou = (pred * y).sum() / ((pred + y) > 0).sum()
        if iou > 0.95:
            break
    assert iou > 0.95, f"IoU {iou:.3f} after {step + 1} steps"


def test_adaptive_norm_is_decided_by_batch_size_and_rebuilt_from_the_checkpoint():
    assert resolve_norm("adaptive", 64) == "batch" and resolve_norm("adaptive", 2) == "group"
    assert resolve_norm("group", 64) == "group" and resolve_norm("adaptive", None) == "batch"
    cfg = tiny("unet_film_cbam", norm="adaptive", depth=2)
    big, small = build_model(cfg, batch_size=64), build_model(cfg, batch_size=2)

    def kinds(model):
        return {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}

    assert kinds(big) == {nn.BatchNorm2d} and kinds(small) == {nn.GroupNorm}
    rebuilt = rebuild_model(cfg, small.state_dict())  # no batch size needed: the state dict records it
    assert kinds(rebuilt) == {nn.GroupNorm}
    x, t = torch.randn(1, 1, 32, 32), torch.zeros(1)
    assert torch.equal(rebuilt.eval()(x, t), small.eval()(x, t))
    with pytest.raises(ModelError, match="rebuild_model"):
        big.load_state_dict(small.state_dict())


def test_classifier_rebuilds_and_takes_segmentation_weights():
    torch.manual_seed(0)
    cfg = tiny("unet_film_cbam", depth=2)
    classifier = build_model(cfg, task="classification", num_classes=5).eval()
    rebuilt = rebuild_model(cfg, classifier.state_dict()).eval()
    x = torch.randn(2, 1, 32, 32)
    assert rebuilt.build_kwargs["num_classes"] == 5 and torch.equal(rebuilt(x), classifier(x))
    segmenter = build_model(cfg)  # transfer: the encoder keys are shared, the head is new
    missing, unexpected = classifier.load_state_dict(segmenter.state_dict(), strict=False)
    assert set(missing) == {"classifier.weight", "classifier.bias"}
    assert unexpected and all(k.startswith(("decoder.", "head.")) for k in unexpected)
    assert all(torch.equal(a, b) for a, b in zip(classifier.encoder_parameters(), segmenter.encoder_parameters()))
    with pytest.raises(ModelError, match="unet_film_cbam"):
        rebuild_model(tiny("unet"), classifier.state_dict())


def test_errors_name_the_valid_choices():
    with pytest.raises(ModelError) as err:
        build_model(tiny("unet_flim"))
    assert all(name in str(err.value) for name in MODELS) and "unet_film" in str(err.value)
    with pytest.raises(ModelError, match="res_unet_film_cbam"):  # drop_path on a model without residuals
        build_model(tiny("unet", drop_path=0.2))
    with pytest.raises(ModelError, match="attention_heads"):
        build_model(tiny("unet_linear_attention", extra={"heads": 2}))
    with pytest.raises(ModelError, match="int"):
        build_model(tiny("unet_linear_attention", extra={"attention_heads": "2"}))
    with pytest.raises(ModelError, match="num_classes"):
        build_model(tiny("unet"), task="classification")
    with pytest.raises(ModelError, match="classifier"):
        build_model(tiny("cnn_dilated"))
    with pytest.raises(ModelError, match="stride 8"):
        build_model(tiny("unet"))(torch.randn(1, 1, 36, 36), torch.zeros(1))


def test_stride_extra_options_and_drop_path_schedule():
    assert stride_of(tiny("unet", depth=3)) == 8 and stride_of(tiny("cnn_dilated")) == 4
    assert build_model(tiny("deeplabv3plus", depth=2)).stride == 4
    model = build_model(tiny("unet_linear_attention", extra={"attention_heads": 2}))
    assert model.encoder.attention.heads == 2
    model = build_model(tiny("res_unet_film_cbam", drop_path=0.3))  # depth 3: rates rise with the level
    encoder, decoder = ([round(b.drop_path.p, 6) for b in part.blocks] for part in (model.encoder, model.decoder))
    assert encoder == [0.0, 0.1, 0.2, 0.3] and decoder == [0.2, 0.1, 0.0]


def receptive_field(model) -> int:
    """Extent (pixels) of the input support of the gradient of the central feature, over a few inputs."""
    x = torch.randn(8, 1, 64, 64, requires_grad=True)
    model.features(x)[:, :, 8, 8].sum().backward()
    rows = x.grad.abs().sum((0, 1, 3)).nonzero()
    return int(rows.max() - rows.min() + 1)


def test_cnn_dilated_receptive_field_grows_with_dilation():
    """Brute force against the formula: b 3x3 convs, pool, b convs, pool, b convs dilated d: 4 + 6b + 8bd."""
    torch.manual_seed(0)
    for blocks, dilation in [(1, 1), (1, 2), (1, 4), (2, 2)]:
        cfg = tiny("cnn_dilated", blocks_per_stage=blocks, dilation_stage3=dilation)
        model = build_model(cfg, task="classification", num_classes=2).eval()  # eval: no batch coupling
        assert receptive_field(model) == 4 + 6 * blocks + 8 * blocks * dilation


def conv_linear_macs(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """Multiply-adds of every conv, transposed conv and linear layer, counted by forward hooks."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, nn.ConvTranspose2d):
            total += inputs[0].numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x, t)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["unet", "res_unet_film_cbam", "deeplabv3plus"])
def test_model_summary_counts(name):
    model = build_model(tiny(name))
    summary = model_summary(model, input_hw=(64, 64))
    assert summary["params"] == summary["trainable"] == sum(p.numel() for p in model.parameters())
    assert summary["flops"] == 2 * conv_linear_macs(model, torch.zeros(1, 1, 64, 64), torch.zeros(1))


def test_original_preset_has_about_8_3_million_parameters():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "original.json")
    model = build_model(cfg.model, batch_size=cfg.train.batch_size)
    assert 8.2e6 < sum(p.numel() for p in model.parameters()) < 8.4e6


def test_attention_maps_and_positional_channels():
    model = build_model(tiny("res_unet_film_cbam", depth=2, positional=True)).eval()
    assert model.encoder.blocks[0].conv1[0].in_channels == 1 + 3  # the model adds x, y, distance itself
    model(torch.randn(2, 1, 32, 32), torch.zeros(2))
    maps = model.attention_maps
    assert any("cbam" in k for k in maps) and any("gates" in k for k in maps)
    assert all(m.shape[:2] == (2, 1) and 0 <= m.min() and m.max() <= 1 for m in maps.values())
    pos = positional_channels(torch.zeros(1, 1, 4, 6))[0]  # (3, 4, 6)
    assert torch.allclose(pos[0], -pos[0].flip(-1)) and torch.allclose(pos[1], -pos[1].flip(-2))
    assert torch.allclose(pos[2], pos[2].flip(-1).flip(-2)) and pos[2].max() < 1


def test_spectral_norm_keeps_film_identity_and_bounds_weights():
    torch.manual_seed(0)
    model = build_model(tiny("unet_film_cbam", depth=2, spectral_norm=True)).train()
    x, t = torch.randn(2, 1, 32, 32), torch.zeros(2)
    for _ in range(3):  # power iterations run in training forwards
        model(x, t)
    conv = model.encoder.blocks[1].conv1[0]
    assert torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2) < 1.05
    assert all(not nn.utils.parametrize.is_parametrized(m) for f in model.modules() if isinstance(f, FiLM)
               for m in f.modules())
    assert torch.isfinite(model(x, t)).all()


def test_config_fields_round_trip_through_the_builder():
    cfg = dataclasses.replace(tiny("cnn_dilated"), blocks_per_stage=3, dilation_stage3=4)
    model = build_model(cfg, task="classification", num_classes=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and convs[-1].dilation == (4, 4) and convs[-1].padding == (4, 4)
