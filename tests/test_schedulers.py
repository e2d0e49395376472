"""Schedules at key steps, restarts, one-cycle peak, ReduceOnPlateau vs torch's, state round-trips."""
import random

import pytest
import torch

from lib.core.errors import ConfigError
from lib.train.schedulers import SCHEDULES, ReduceOnPlateau, build_schedule, set_lr
from lib.core.schema import ScheduleConfig

BASE = 1e-3


def schedule(name, total=1000, **fields):
    return build_schedule(ScheduleConfig(name=name, **fields), BASE, total)


def test_warmup_cosine_key_steps():
    lr = schedule("warmup_cosine", total=1100, warmup_steps=100, min_lr_ratio=0.01)
    low = 0.01 * BASE
    assert lr(0) == pytest.approx(BASE / 100)
    assert lr(49) == pytest.approx(BASE / 2)
    assert lr(99) == pytest.approx(BASE) and lr(100) == pytest.approx(BASE)
    assert lr(600) == pytest.approx((BASE + low) / 2)           # halfway through the decay
    assert lr(1100) == pytest.approx(low) and lr(5000) == pytest.approx(low)
    values = [lr(s) for s in range(100, 1101)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_schedules_are_pure_functions_of_the_step():
    """Resume needs only the step: evaluation order and repetition change nothing."""
    for name in SCHEDULES:
        lr = schedule(name, milestone_steps=[300, 600])
        steps = list(range(0, 1200, 7))
        forward = [lr(s) for s in steps]
        shuffled = steps[:]
        random.Random(0).shuffle(shuffled)
        again = dict(zip(shuffled, (lr(s) for s in shuffled)))
        assert forward == [again[s] for s in steps]
        assert lr(500) == schedule(name, milestone_steps=[300, 600])(500)


@pytest.mark.parametrize("mult", [1, 2])
def test_cosine_restarts_restart_at_each_period(mult):
    lr = schedule("cosine_restarts", warmup_steps=10, restart_period_steps=100, restart_period_mult=mult,
                  min_lr_ratio=0.0)
    starts = [10, 110, 210] if mult == 1 else [10, 110, 310, 710]    # periods 100, 100 | 100, 200, 400
    for s in starts[1:]:
        assert lr(s) == pytest.approx(BASE)
        assert lr(s - 1) < 0.01 * BASE                              # the end of the previous period
    first, second = starts[1] - starts[0], starts[2] - starts[1]
    assert lr(starts[0] + first // 2) == pytest.approx(BASE / 2)
    assert lr(starts[1] + second // 2) == pytest.approx(BASE / 2)


def test_one_cycle_peak_position_and_ends():
    lr = schedule("one_cycle", total=1000, pct_start=0.25, div_factor=20.0, final_div_factor=100.0)
    values = [lr(s) for s in range(1001)]
    assert max(range(1001), key=values.__getitem__) == 250
    assert values[250] == pytest.approx(BASE)
    assert values[0] == pytest.approx(BASE / 20)
    assert values[1000] == pytest.approx(BASE / 20 / 100)
    assert values[125] == pytest.approx((BASE + BASE / 20) / 2)
    with pytest.raises(ConfigError, match="pct_start"):
        schedule("one_cycle", total=1000, pct_start=0.0)


def test_cyclic_triangle():
    lr = schedule("cyclic", cycle_half_steps=50, min_lr_ratio=0.1)
    low = 0.1 * BASE
    assert lr(0) == pytest.approx(low) and lr(100) == pytest.approx(low) and lr(200) == pytest.approx(low)
    assert lr(50) == pytest.approx(BASE) and lr(150) == pytest.approx(BASE)
    assert lr(25) == pytest.approx((low + BASE) / 2) and lr(75) == pytest.approx((low + BASE) / 2)


def test_step_multistep_poly_constant():
    step = schedule("step", warmup_steps=0, decay_every_steps=100, gamma=0.5)
    assert [step(s) for s in (0, 99, 100, 250)] == pytest.approx([BASE, BASE, BASE / 2, BASE / 4])
    multi = schedule("multistep", warmup_steps=0, milestone_steps=[10, 50], gamma=0.1)
    assert [multi(s) for s in (9, 10, 49, 50, 999)] == \
        pytest.approx([BASE, BASE / 10, BASE / 10, BASE / 100, BASE / 100])
    poly = schedule("poly", total=300, warmup_steps=100, poly_power=2.0, min_lr_ratio=0.0)
    assert [poly(s) for s in (0, 99, 100, 200, 300, 400)] == \
        pytest.approx([BASE / 100, BASE, BASE, BASE / 4, 0.0, 0.0])
    const = schedule("constant", warmup_steps=4)
    assert [const(s) for s in (0, 3, 500)] == pytest.approx([BASE / 4, BASE, BASE])


def test_config_errors():
    with pytest.raises(ConfigError, match="warmup_cosine.*one_cycle"):
        schedule("cosine")
    with pytest.raises(ConfigError, match="warmup_steps"):
        schedule("warmup_cosine", total=50, warmup_steps=100)
    with pytest.raises(ConfigError, match="increasing"):
        schedule("multistep", milestone_steps=[50, 10])
    with pytest.raises(ConfigError) as err:
        schedule("reduce_on_plateau", extra={"patience": 5})
    assert "plateau_patience" in str(err.value)


@pytest.mark.parametrize("mode,patience,cooldown", [("max", 2, 0), ("min", 3, 2), ("max", 0, 1)])
def test_reduce_on_plateau_matches_torch(mode, patience, cooldown):
    rng = random.Random(patience)
    metrics = [rng.choice([0.5, 0.6, 0.7]) + 0.001 * i * (1 if mode == "max" else -1) for i in range(60)]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=patience,
                                                           cooldown=cooldown, min_lr=BASE / 64, threshold=1e-3)
    ours = ReduceOnPlateau(BASE, factor=0.5, patience=patience, cooldown=cooldown, min_lr=BASE / 64, mode=mode,
                           threshold=1e-3)
    for value in metrics:
        reference.step(value)
        assert ours.step(value) == pytest.approx(opt.param_groups[0]["lr"])
    assert ours.lr < BASE


def test_reduce_on_plateau_patience_cooldown_and_nan():
    plateau = ReduceOnPlateau(1.0, factor=0.1, patience=2, cooldown=1, mode="max")
    lrs = [plateau.step(v) for v in [0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.9, float("nan")]]
    # best 0.5; 2 bad tolerated, the 3rd reduces; 1 cooldown validation not counted; 3 more bad reduce again
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    assert plateau.best == 0.9 and plateau.num_bad == 1


def test_reduce_on_plateau_state_round_trip_and_warmup():
    cfg = ScheduleConfig(name="reduce_on_plateau", warmup_steps=10, plateau_patience=1, plateau_factor=0.5,
                         min_lr_ratio=0.25)
    values = [0.3, 0.2, 0.2, 0.1, 0.1, 0.35, 0.1, 0.1, 0.1, 0.1]
    whole = build_schedule(cfg, BASE, 100, monitor_mode="max")
    assert whole(0) == pytest.approx(BASE / 10) and whole(9) == pytest.approx(BASE)
    reference = [whole.step(v) for v in values]
    first = build_schedule(cfg, BASE, 100, monitor_mode="max")
    resumed = [first.step(v) for v in values[:4]]
    second = build_schedule(cfg, BASE, 100, monitor_mode="max")
    second.load_state_dict(first.state_dict())
    resumed += [second.step(v) for v in values[4:]]
    assert resumed == reference and reference[-1] == pytest.approx(BASE / 4)     # floored at min_lr
    assert second(50) == pytest.approx(BASE / 4)


def test_set_lr_scales_each_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr_scale": 0.1}, {"params": [b]}], lr=1.0)
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-4, 2e-3])
    set_lr(opt, 1e-3, group_scales=[1.0, 0.5])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 5e-4])
    with pytest.raises(ValueError):
        set_lr(opt, 1e-3, group_scales=[1.0])


@pytest.mark.parametrize("total", [3, 10])
def test_a_warmup_longer_than_the_run_names_one_that_fits(total):
    """A small dataset gives few steps per epoch: the error's hint is a warmup the run can take."""
    cfg = ScheduleConfig(name="warmup_cosine", warmup_steps=total + 1)
    with pytest.raises(ConfigError) as err:
        build_schedule(cfg, 1e-3, total)
    fitting = int(err.value.hint.split("--schedule.warmup_steps=")[1].split()[0])
    schedule = build_schedule(ScheduleConfig(name="warmup_cosine", warmup_steps=fitting), 1e-3, total)
    assert 0 <= fitting < total and schedule(total - 1) < schedule(fitting)
