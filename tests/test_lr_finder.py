"""LR range test: exact state restore, the exponential sweep and its stop rule, suggestions on synthetic
curves with known answers, the warnings, the terminal plot, and the script end to end."""
import copy
import json
import random

import numpy as np
import pytest
import torch

from conftest import tiny_config
from lib.tune import lr_finder as lrf
from lib.tune.asciiplot import plot
from lib.train.checkpoint import seed_everything
from lib.core.config import load_config, save_config
from lib.train.runner import build_trainer

CPU = torch.device("cpu")
X = np.linspace(-6, 0, 121)                   # log10 LR, 0.05 apart: 1e-3 and 1e-2 are grid points
LR = 10 ** X


def _trainer(tiny_dataset, **sections):
    cfg = tiny_config(tiny_dataset, **sections)
    seed_everything(cfg.run.seed)
    return build_trainer(cfg, CPU, callbacks=[])


def _train(trainer, steps):
    batches = lrf.endless_batches(trainer)
    for _ in range(steps):
        trainer.train_step(next(batches))
        trainer.batch_in_epoch += 1


def _state(trainer):
    """A deep copy (state_dict() returns live tensors that training updates in place)."""
    return copy.deepcopy({
        "model": trainer.raw_model.state_dict(), "optim": trainer.optimizer.state_dict(),
        "torch": torch.get_rng_state(), "numpy": np.random.get_state()[1], "python": random.getstate(),
        "task": trainer.task.generator.get_state(), "augment": trainer.augment.state_dict(),
        "step": (trainer.step, trainer.epoch, trainer.batch_in_epoch)})


def _equal(a, b) -> bool:
    if torch.is_tensor(a) or isinstance(a, np.ndarray):
        return bool((a == b).all()) if a.shape == b.shape else False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_sweep_restores_weights_optimiser_and_rng_exactly(tiny_dataset):
    trainer = _trainer(tiny_dataset)
    _train(trainer, 2)                                 # Adam moments and a moved cursor exist before the sweep
    before = _state(trainer)
    result = lrf.lr_range_test(trainer, 1e-5, 1.0, steps=12)
    assert len(result["lr"]) >= 2
    assert _equal(before, _state(trainer))


def test_nothing_leaks_into_the_training_that_follows(tiny_dataset):
    swept = _trainer(tiny_dataset)                     # built and trained one after the other: dropout
    lrf.lr_range_test(swept, 1e-5, 1.0, steps=12)       # draws from the global RNG they share
    _train(swept, 3)
    plain = _trainer(tiny_dataset)
    _train(plain, 3)
    a, b = swept.raw_model.state_dict(), plain.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_sweep_is_exponential_and_stops_when_the_loss_diverges(tiny_dataset):
    trainer = _trainer(tiny_dataset, optim={"grad_clip": 0.0})
    result = lrf.lr_range_test(trainer, 1e-4, 1e6, steps=40)
    n = len(result["lr"])
    growth = (1e6 / 1e-4) ** (1 / 39)
    np.testing.assert_allclose(result["lr"], 1e-4 * growth ** np.arange(n), rtol=1e-9)
    assert n < 40 and result["stop"].startswith(("diverged", "non-finite")), result["stop"]
    assert np.allclose(result["ema"], lrf.ema(result["loss"], result["beta"]))


def test_suggestions_on_curves_with_known_answers():
    sigmoid_drop = 1 - 0.8 / (1 + np.exp(-4 * (X + 3)))          # falls fastest at 1e-3
    rises = np.maximum(X + 1, 0) * 5                             # diverges after 1e-1
    assert lrf.suggest(LR, sigmoid_drop + rises)["steepest"] == pytest.approx(1e-3)
    ramp = np.where(X < -4, 1.0, np.where(X <= -2, 1 - 0.4 * (X + 4), 0.2 + (X + 2) ** 2))
    s = lrf.suggest(LR, ramp)                                    # falls from 1e-4 to 1e-2 only
    assert s["valley"] == pytest.approx(1e-3) and s["minimum"] == pytest.approx(1e-3)
    assert 1e-4 <= s["steepest"] <= 1e-2
    rising = lrf.suggest(LR, 1 + X - X.min())
    assert rising["steepest"] is None and rising["valley"] is None and rising["minimum"] == pytest.approx(1e-7)


def test_zero_lag_smoothing_keeps_the_steepest_point_where_the_ema_moves_it():
    clean = 1 - 0.8 / (1 + np.exp(-4 * (X + 3))) + np.maximum(X + 1, 0) * 5
    skip = lrf.warmup_points(0.9, X.size)
    shift_zero, shift_ema = [], []
    for seed in range(5):
        noisy = clean + np.random.default_rng(seed).normal(0, 0.03, X.size)
        shift_zero.append(np.log10(lrf.suggest(LR, lrf.zero_lag(noisy, 0.9), skip)["steepest"]) + 3)
        shift_ema.append(np.log10(lrf.suggest(LR, lrf.ema(noisy, 0.9), skip)["steepest"]) + 3)
    assert max(np.abs(shift_zero)) <= 0.11                       # within 1.3x of the truth
    assert min(shift_ema) > 0 and np.mean(shift_ema) > 0.25      # the causal EMA lags towards larger LR


def test_longest_fall_and_smoothers():
    y = np.array([5, 4, 3, 3, 6, 5, 4, 3, 2, 1, 1, 0, 0.0])
    assert lrf._longest_fall(y) == (4, 9)                        # 6 -> 1 beats 5 -> 3 and 1 -> 0
    assert lrf._longest_fall(np.arange(5.0)) is None
    assert lrf.ema([2.0, 2.0, 2.0], 0.98) == pytest.approx([2.0, 2.0, 2.0])   # bias-corrected from the start
    assert lrf.zero_lag(np.full(7, 3.0), 0.9) == pytest.approx(np.full(7, 3.0))


@pytest.mark.parametrize("case, expected", [("short", "only 10 points"), ("flat", "flat"), ("noisy", "noisy"),
                                            ("open", "still falling"), ("clean", None)])
def test_diagnose_names_what_makes_a_curve_untrustworthy(case, expected):
    clean = 1 - 0.8 / (1 + np.exp(-4 * (X + 3))) + np.maximum(X + 1, 0) * 5
    loss = {"short": clean[:10], "flat": 1 - 0.01 * (X + 6) / 6, "clean": clean, "open": clean[:90],
            "noisy": clean + np.random.default_rng(0).normal(0, 0.6, X.size)}[case]
    stop = "reached lr_max after 121 steps" if case == "open" else "diverged at lr 1 (smoothed loss above 4x)"
    result = {"loss": list(loss), "stop": stop}
    warnings = lrf.diagnose(result, lrf.zero_lag(loss, 0.9))
    if expected is None:
        assert warnings == []
    else:
        assert any(expected in w for w in warnings), warnings


def test_describe_says_how_far_apart_the_suggestions_are():
    text = lrf.describe({"steepest": 2e-3, "valley": 1e-3, "minimum": 1.5e-3}, [])
    assert "fell fastest at 2.0e-03" in text and "agree within 2.0x" in text and "use 1.0e-03 (valley)" in text
    far = lrf.describe({"steepest": 1e-1, "valley": 1e-4, "minimum": 1e-3}, ["the curve is noisy"])
    assert "1000.0x apart (an ambiguous curve)" in far and "warning: the curve is noisy" in far
    assert lrf.choose({"steepest": None, "valley": None, "minimum": 3e-4}) == ("minimum", 3e-4)


def test_ascii_plot_places_points_and_marks():
    lines = plot([1, 10, 100], [0.0, 1.0, 2.0], width=11, height=5, logx=True, marks={"v": 10}).splitlines()
    grid = [line.split("|", 1)[1] for line in lines[:5]]
    assert grid[4][0] == "*" and grid[2][5] == "*" and grid[0][10] == "*"     # bottom-left, middle, top-right
    assert all(row[5] in "v*" for row in grid) and grid[0][5] == "v"
    assert "1e+00" in lines[-1] and "1e+02" in lines[-1]
    assert plot([1.0], [float("nan")]).startswith("(nothing to plot")


def test_script_writes_csv_tensorboard_and_a_config_with_the_suggestion(tiny_dataset, tmp_path, capsys):
    import lr_finder
    config = tmp_path / "tiny.json"
    save_config(tiny_config(tiny_dataset), config)
    out, written = tmp_path / "lrf", tmp_path / "tuned.json"
    rc = lr_finder.main(["--config", str(config), "--lr-min", "1e-5", "--steps", "40", "--out", str(out),
                         "--write-config", str(written), "--optim.grad_clip=0"])
    assert rc == 0
    rows = (out / "lr_finder.csv").read_text().splitlines()
    assert rows[0] == "lr,loss,ema_loss,smoothed_loss" and len(rows) >= 3
    found = json.loads((out / "lr_finder.json").read_text())
    chosen = found["suggestions"]["valley"] or found["suggestions"]["steepest"] or found["suggestions"]["minimum"]
    assert load_config(written).optim.lr == pytest.approx(float(f"{chosen:.3g}"))
    assert load_config(written).optim.grad_clip == 0.0           # the rest of the config is kept
    assert any(p.name.startswith("events") for p in (out / "tb").iterdir())
    assert "smoothed loss" in capsys.readouterr().out
