"""Losses against direct formulas (float64, written independently), ignore invariance, per-sample weights."""
import math

import pytest
import torch

from lib.core.errors import ConfigError
from lib.train.losses import (LOSSES, AdaptiveLoss, BCELoss, CombinedFocalDiceLoss, DiceLoss, FocalLoss,
                        LovaszHingeLoss, TverskyLoss, build_loss, expected_initial_loss)
from lib.core.schema import LossConfig

SEG_NAMES = sorted(LOSSES["segmentation"])


def batch(b=3, h=6, w=5, seed=0, ignore=0.2):
    """Random logits (B,1,H,W), uint8 target 0/1/255 with every sample keeping valid pixels, t_idx (B,)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, h, w, generator=g) * 2
    target = (torch.rand(b, 1, h, w, generator=g) < 0.4).to(torch.uint8)
    target[torch.rand(b, 1, h, w, generator=g) < ignore] = 255
    target[:, :, 0, 0] = 1
    target[:, :, 0, 1] = 0
    t_idx = torch.randint(0, 4, (b,), generator=g)
    return logits, target, t_idx


def sample_terms(logits, target):
    """Per sample: list of (probabilities, labels) of its valid pixels, float64."""
    out = []
    for x, t in zip(logits.double(), target):
        keep = t != 255
        out.append((torch.sigmoid(x[keep]), (t[keep] == 1).double(), x[keep]))
    return out


def ref_pixel(logits, target, weights, pixel):
    """sum_b w_b sum_valid pixel(p, y, x) / number of valid pixels in the batch."""
    total, count = 0.0, 0
    for (p, y, x), w in zip(sample_terms(logits, target), weights):
        total += w * float(pixel(p, y, x).sum())
        count += len(y)
    return total / count


def ref_bce(p, y, x):
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p))


def ref_focal(gamma, alpha):
    def pixel(p, y, x):
        p_t = torch.where(y == 1, p, 1 - p)
        a_t = 1.0 if alpha is None else torch.where(y == 1, alpha, 1 - alpha)
        return -a_t * (1 - p_t) ** gamma * torch.log(p_t)
    return pixel


def ref_region(logits, target, weights, per_sample):
    values = [w * per_sample(p, y) for (p, y, _), w in zip(sample_terms(logits, target), weights)]
    return sum(values) / len(values)


def ref_dice(smooth):
    return lambda p, y: 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


def ref_tversky(a, b, smooth):
    def per_sample(p, y):
        tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
        return 1 - (tp + smooth) / (tp + a * fp + b * fn + smooth)
    return per_sample


def ref_lovasz(p, y, x):
    """Lovász extension of the Jaccard loss from its definition: Delta(S) = |S| / |gt ∪ S| on growing sets."""
    errors = (1 - x * (2 * y - 1)).tolist()
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    gt = {i for i in range(len(errors)) if y[i] == 1}
    total, prev, chosen = 0.0, 0.0, set()
    for i in order:
        chosen.add(i)
        delta = len(chosen) / len(gt | chosen)
        total += max(errors[i], 0.0) * (delta - prev)
        prev = delta
    return total


WEIGHTS = [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("case", ["bce", "focal", "focal_alpha", "dice", "tversky", "lovasz"])
def test_loss_matches_direct_formula_with_per_sample_weights(case):
    logits, target, t_idx = batch(seed=1)
    w = [WEIGHTS[i] for i in t_idx.tolist()]
    loss, ref = {
        "bce": lambda: (BCELoss(WEIGHTS), ref_pixel(logits, target, w, ref_bce)),
        "focal": lambda: (FocalLoss(2.0, None, WEIGHTS), ref_pixel(logits, target, w, ref_focal(2.0, None))),
        "focal_alpha": lambda: (FocalLoss(1.5, 0.25, WEIGHTS), ref_pixel(logits, target, w, ref_focal(1.5, 0.25))),
        "dice": lambda: (DiceLoss(1.0, WEIGHTS), ref_region(logits, target, w, ref_dice(1.0))),
        "tversky": lambda: (TverskyLoss(0.3, 0.7, 0.5, WEIGHTS),
                            ref_region(logits, target, w, ref_tversky(0.3, 0.7, 0.5))),
        "lovasz": lambda: (LovaszHingeLoss(WEIGHTS),
                           sum(wi * ref_lovasz(*s) for s, wi in zip(sample_terms(logits, target), w)) / len(w)),
    }[case]()
    assert float(loss(logits, target, t_idx)) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("name", SEG_NAMES)
def test_ignored_pixels_change_nothing(name):
    cfg = LossConfig(name=name, threshold_weights=WEIGHTS)
    criterion = build_loss(cfg, num_thresholds=4)
    logits, target, t_idx = batch(seed=2)
    base = criterion(logits, target, t_idx).detach()
    ignored = target == 255
    for fill in (torch.randn_like(logits) * 50, torch.full_like(logits, float("inf")),
                 torch.full_like(logits, float("nan"))):
        x = torch.where(ignored, fill, logits).requires_grad_(True)
        loss = criterion(x, target, t_idx)
        assert float(loss.detach()) == float(base)
        loss.backward()
        assert torch.all(x.grad[ignored] == 0) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", SEG_NAMES)
def test_mixed_thresholds_use_each_samples_weight(name):
    """A two-sample batch with different thresholds equals the weighted combination of its halves."""
    cfg = LossConfig(name=name, threshold_weights=WEIGHTS, adaptive_terms=["bce", "dice"])
    criterion = build_loss(cfg, num_thresholds=4)
    logits, target, _ = batch(b=2, seed=3, ignore=0.0)
    t_idx = torch.tensor([0, 3])
    mixed = criterion(logits, target, t_idx).item()
    unweighted = build_loss(LossConfig(name=name, adaptive_terms=["bce", "dice"]), num_thresholds=4)
    halves = [unweighted(logits[i:i + 1], target[i:i + 1], t_idx[i:i + 1]).item() for i in range(2)]
    # equal valid-pixel counts, so pixel and per-sample averages agree; adaptive at s = 0 sums its terms
    expected = (WEIGHTS[0] * halves[0] + WEIGHTS[3] * halves[1]) / 2
    assert mixed == pytest.approx(expected, rel=1e-5)
    first_sample_bug = WEIGHTS[0] * (halves[0] + halves[1]) / 2
    assert abs(mixed - first_sample_bug) > 1e-3


def test_focal_with_gamma_zero_is_bce():
    logits, target, t_idx = batch(seed=4)
    assert float(FocalLoss(0.0, None)(logits, target, t_idx)) == pytest.approx(float(BCELoss()(logits, target, t_idx)),
                                                                             rel=1e-6)


def test_dice_near_zero_on_perfect_prediction_including_empty_tiles():
    _, target, t_idx = batch(seed=5)
    target[1][target[1] == 1] = 0                                      # an empty tile
    logits = torch.where(target == 1, 30.0, -30.0)
    assert float(DiceLoss()(logits, target, t_idx)) < 1e-6
    assert float(TverskyLoss()(logits, target, t_idx)) < 1e-6
    assert float(LovaszHingeLoss()(logits, target, t_idx)) < 1e-6


def test_dice_empty_target_convention():
    target = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    logits = torch.full((1, 1, 4, 4), math.log(0.25 / 0.75))           # p = 0.25: predicted mass 4 pixels
    assert float(DiceLoss(smooth=1.0)(logits, target)) == pytest.approx(1 - 1 / (4 + 1), rel=1e-6)


def test_tversky_half_half_is_dice():
    logits, target, t_idx = batch(seed=6)
    assert float(TverskyLoss(0.5, 0.5, smooth=0.5)(logits, target, t_idx)) == \
        pytest.approx(float(DiceLoss(smooth=1.0)(logits, target, t_idx)), rel=1e-6)


def test_samples_without_valid_pixels_are_excluded_and_empty_batch_is_zero():
    logits, target, t_idx = batch(b=2, seed=7)
    padded_target = torch.cat([target, torch.full_like(target[:1], 255)])
    padded_logits = torch.cat([logits, torch.randn_like(logits[:1])])
    padded_t = torch.cat([t_idx, t_idx[:1]])
    for name in SEG_NAMES:
        criterion = build_loss(LossConfig(name=name), num_thresholds=4)
        assert criterion(padded_logits, padded_target, padded_t).item() == \
            pytest.approx(criterion(logits, target, t_idx).item(), rel=1e-6)
        x = torch.randn(2, 1, 4, 4, requires_grad=True)
        loss = criterion(x, torch.full((2, 1, 4, 4), 255, dtype=torch.uint8), torch.tensor([0, 1]))
        loss.backward()
        assert torch.isfinite(loss) and torch.all(x.grad == 0)


def test_combined_focal_dice_is_weighted_sum():
    logits, target, t_idx = batch(seed=8)
    combined = CombinedFocalDiceLoss(0.3, 2.0, WEIGHTS, gamma=2.0, alpha=0.25, smooth=1.0)
    expected = (0.3 * FocalLoss(2.0, 0.25, WEIGHTS)(logits, target, t_idx)
                + 2.0 * DiceLoss(1.0, WEIGHTS)(logits, target, t_idx))
    assert float(combined(logits, target, t_idx)) == pytest.approx(float(expected), rel=1e-6)


def test_adaptive_loss_formula_and_gradients():
    logits, target, t_idx = batch(seed=9)
    criterion = build_loss(LossConfig(name="adaptive", adaptive_terms=["focal", "dice"]), num_thresholds=4)
    params = list(criterion.parameters())
    assert len(params) == 1 and params[0].shape == (2,)
    terms = [FocalLoss()(logits, target, t_idx), DiceLoss()(logits, target, t_idx)]
    with torch.no_grad():
        params[0].copy_(torch.tensor([0.5, -1.0]))
    expected = sum(math.exp(-s) * float(t) + s for s, t in zip([0.5, -1.0], terms))
    x = logits.clone().requires_grad_(True)
    loss = criterion(x, target, t_idx)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert params[0].grad is not None and torch.all(params[0].grad != 0)
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    assert params[0].grad.tolist() == pytest.approx([1 - math.exp(-s) * float(t) for s, t in zip([0.5, -1.0], terms)],
                                                    rel=1e-5)
    assert x.grad.abs().sum() > 0


def test_loss_computes_in_float32_from_bf16_logits():
    logits, target, t_idx = batch(seed=10)
    criterion = build_loss(LossConfig(name="focal_dice"), num_thresholds=4)
    loss = criterion(logits.bfloat16(), target, t_idx)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(criterion(logits.bfloat16().float(), target, t_idx)), rel=1e-6)


def test_regression_losses_mask_nan_targets():
    g = torch.Generator().manual_seed(11)
    pred = torch.randn(2, 1, 5, 5, generator=g) * 5
    target = torch.rand(2, 1, 5, 5, generator=g) * 30
    target[torch.rand(2, 1, 5, 5, generator=g) < 0.3] = float("nan")
    keep = ~torch.isnan(target)
    e = (pred - target)[keep].double()
    l1 = build_loss(LossConfig(name="l1"), task="regression")
    huber = build_loss(LossConfig(name="huber", huber_delta_m=2.0), task="regression")
    ref_huber = torch.where(e.abs() <= 2.0, 0.5 * e ** 2, 2.0 * (e.abs() - 0.5 * 2.0)).mean()
    assert float(l1(pred, target)) == pytest.approx(float(e.abs().mean()), rel=1e-6)
    assert float(huber(pred, target)) == pytest.approx(float(ref_huber), rel=1e-6)
    assert float(l1(torch.where(keep, pred, 1e6), target)) == float(l1(pred, target))


def test_cross_entropy_with_smoothing_and_class_weights():
    g = torch.Generator().manual_seed(12)
    logits, target = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 2, 1, 0])
    cw, eps = [1.0, 2.0, 0.5], 0.1
    criterion = build_loss(LossConfig(name="cross_entropy", label_smoothing=eps, class_weights=cw),
                           task="classification", num_classes=3)
    logp = torch.log_softmax(logits.double(), 1)
    w = torch.tensor(cw, dtype=torch.float64)
    # torch's definition: weighted NLL averaged by the target weights, plus eps/C of the weighted uniform term
    nll = -(w[target] * logp[range(6), target]).sum() / w[target].sum()
    smooth = -(logp * w).sum(1).sum() / w[target].sum() / 3
    assert float(criterion(logits, target)) == pytest.approx(float((1 - eps) * nll + eps * smooth), rel=1e-6)


def test_expected_initial_loss_matches_zero_logits():
    _, target, t_idx = batch(b=4, h=16, w=16, seed=13)
    zero = torch.zeros(4, 1, 16, 16)
    for name in ("bce", "focal", "lovasz"):
        cfg = LossConfig(name=name)
        actual = float(build_loss(cfg, num_thresholds=4)(zero, target, t_idx))
        assert actual == pytest.approx(expected_initial_loss(cfg), rel=1e-5)
    assert expected_initial_loss(LossConfig(name="dice")) is None
    # every tile with gap fraction 1/4 and no ignore: Dice's value at p = 0.5 (smoothing negligible)
    target = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    target[:, :, :32, :32] = 1
    for name in ("dice", "tversky", "focal_dice"):
        cfg = LossConfig(name=name, focal_alpha=0.25, dice_smooth=1e-6)
        actual = float(build_loss(cfg, num_thresholds=4)(torch.zeros(2, 1, 64, 64), target, torch.tensor([0, 1])))
        assert actual == pytest.approx(expected_initial_loss(cfg, pos_fraction=0.25), rel=1e-5)
    logits = torch.zeros(5, 7)
    cfg = LossConfig(name="cross_entropy", label_smoothing=0.1)
    ce = float(build_loss(cfg, task="classification", num_classes=7)(logits, torch.arange(5)))
    assert ce == pytest.approx(expected_initial_loss(cfg, "classification", num_classes=7))
    weighted = LossConfig(name="bce", threshold_weights=[1, 2, 3, 6])
    assert expected_initial_loss(weighted) == pytest.approx(3 * math.log(2))
    assert expected_initial_loss(LossConfig(name="l1"), "regression") is None


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="bce.*dice.*focal"):
        build_loss(LossConfig(name="jaccard"))
    with pytest.raises(ConfigError, match="not a regression loss"):
        build_loss(LossConfig(name="focal_dice"), task="regression")
    with pytest.raises(ConfigError, match="threshold_weights"):
        build_loss(LossConfig(name="bce", threshold_weights=[1.0, 2.0]), num_thresholds=4)
    with pytest.raises(ConfigError, match="class_weights"):
        build_loss(LossConfig(name="cross_entropy", class_weights=[1.0]), task="classification", num_classes=3)
    with pytest.raises(ConfigError, match="adaptive_terms"):
        build_loss(LossConfig(name="adaptive", adaptive_terms=["adaptive"]))
    with pytest.raises(ConfigError) as err:
        build_loss(LossConfig(name="focal", extra={"gamma": 1.0}))
    assert "focal_gamma" in str(err.value)


def test_weights_without_t_idx_fail_loudly():
    logits, target, _ = batch(seed=14)
    with pytest.raises(ValueError, match="t_idx"):
        BCELoss(WEIGHTS)(logits, target)
    assert torch.isfinite(BCELoss()(logits, target))


def test_state_dict_holds_only_learned_parameters():
    """Threshold weights come from the config; AdaptiveLoss's log-variances must be checkpointed."""
    criterion = build_loss(LossConfig(name="focal_dice", threshold_weights=WEIGHTS), num_thresholds=4)
    assert criterion.state_dict() == {}
    assert list(AdaptiveLoss([BCELoss()]).state_dict()) == ["log_vars"]
