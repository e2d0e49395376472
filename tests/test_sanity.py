"""Sanity checks flag what they must (frozen, unreached and dead parameters, a loss that cannot fall, bad
masks, NaN weights, a saturated start), stay quiet on a healthy model, and measure what they claim."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from lib.tune import batch_finder
from lib.tune import sanity
from lib.train.checkpoint import seed_everything
from lib.core.config import save_config
from lib.core.errors import TrainingError
from lib.train.runner import build_trainer
from lib.data.shards import iter_shard, read_manifest

CPU = torch.device("cpu")


def _trainer(cfg):
    seed_everything(cfg.run.seed)
    return build_trainer(cfg, CPU, callbacks=[])


def _overfit_trainer(tiny_dataset, **sections):
    trainer = _trainer(sanity.overfit_config(tiny_config(tiny_dataset, **sections), tiles=4))
    return trainer, sanity.first_batch(trainer)


def _tally(trainer, batch, steps=3):
    by_design = trainer.raw_model.frozen_by_design
    with sanity.GradientTally(sanity._all_parameters(trainer), by_design) as tally:
        for _ in range(steps):
            trainer.train_step(batch)
            trainer.batch_in_epoch += 1
    return tally.check(steps)


@pytest.mark.parametrize("largest", [0, 1, 2, 37, 64, 99, 100, 500])
def test_largest_fitting_finds_the_boundary_in_logarithmic_tries(largest):
    limit = 100
    best, tried = batch_finder.largest_fitting(lambda size: size <= largest, start=1, limit=limit)
    assert best == min(largest, limit)
    assert max(tried) <= limit and len(tried) == len(set(tried))
    assert len(tried) <= 2 * math.ceil(math.log2(limit)) + 1


def test_gradient_check_passes_a_healthy_model_despite_zero_initialised_film(tiny_dataset):
    trainer, batch = _overfit_trainer(tiny_dataset)
    check = _tally(trainer, batch)
    assert check.status == "ok", check.message
    film = [n for n, _ in trainer.raw_model.named_parameters() if "film.mlp.0" in n]
    assert film, "the tiny model should have FiLM layers, whose first step has zero gradient by design"


def test_one_step_gradient_check_warns_instead_of_failing_on_the_film_start(tiny_dataset):
    trainer, batch = _overfit_trainer(tiny_dataset)
    check = _tally(trainer, batch, steps=1)
    assert check.status == "warn" and "film.mlp.0" in check.message and "--steps 2" in check.message


def test_a_regression_models_frozen_threshold_weights_are_not_a_gradient_problem(tiny_dataset):
    trainer, batch = _overfit_trainer(tiny_dataset, data={"task": "regression"}, loss={"name": "huber"})
    assert trainer.raw_model.frozen_by_design and all("film.mlp.0.weight" in n
                                                      for n in trainer.raw_model.frozen_by_design)
    check = _tally(trainer, batch)
    assert check.status == "ok" and not check.details["frozen"], check.message


def test_a_short_overfit_budget_that_is_learning_warns_not_fails(tiny_dataset):
    trainer, batch = _overfit_trainer(tiny_dataset, optim={"lr": 0.01})
    check = sanity.overfit(trainer, batch, steps=3, target=0.01)
    losses = [loss for _, loss, _ in check.details["curve"]]
    assert losses[-1] < 0.99 * losses[0]
    assert check.status == "warn" and "too few to tell" in check.message and "bug" not in check.message


def test_gradient_check_names_frozen_unreached_and_dead_parameters(tiny_dataset):
    trainer, batch = _overfit_trainer(tiny_dataset)
    model = trainer.raw_model
    frozen_name, frozen = next(iter(model.named_parameters()))
    frozen.requires_grad_(False)
    model.unused = torch.nn.Parameter(torch.ones(3))                    # registered, never in forward
    model.head.register_forward_hook(lambda module, inputs, out: out * 0)   # dead: its gradient is 0
    check = _tally(trainer, batch)
    assert check.status == "fail"
    assert check.details["frozen"] == [frozen_name]
    assert check.details["no_gradient"] == ["unused"]
    assert {"head.weight", "head.bias"} <= set(check.details["zero_gradient"])
    assert frozen_name in check.message and "unused" in check.message


def test_overfit_fails_loudly_when_the_loss_cannot_decrease(tiny_dataset):
    trainer, batch = _overfit_trainer(tiny_dataset, optim={"lr": 0.0})
    check = sanity.overfit(trainer, batch, steps=20, target=0.5)
    assert check.status == "fail" and "bug" in check.message
    losses = [loss for _, loss, _ in check.details["curve"]]
    assert max(losses) - min(losses) < 1e-6 * losses[0]                 # lr 0: nothing moves at all
    assert len(check.details["curve"]) == 3                             # steps 0, 10, 20: the whole budget


def test_overfit_reaches_its_target_on_a_working_pipeline(tiny_dataset):
    trainer, batch = _overfit_trainer(tiny_dataset, optim={"lr": 0.01})
    check = sanity.overfit(trainer, batch, steps=150, target=0.5)
    assert check.status == "ok", check.message
    curve = check.details["curve"]
    assert curve[-1][1] <= 0.5 * curve[0][1] and curve[-1][2] > curve[0][2]   # loss halves, IoU rises


def test_overfit_config_turns_regularisation_off_and_keeps_the_norm_layers(tiny_dataset):
    cfg = tiny_config(tiny_dataset, train={"batch_size": 32})
    small = sanity.overfit_config(cfg, tiles=4)
    assert not small.augment.enabled and small.model.dropout == 0 and small.optim.weight_decay == 0
    assert small.train.batch_size == 4 and small.schedule.name == "constant"
    assert small.model.norm == "batch"          # what 'adaptive' gives at batch 32, not at 4


def test_baselines_match_brute_force_scores_of_the_validation_masks(tiny_dataset):
    cfg = tiny_config(tiny_dataset)
    check = sanity.check_baselines(_trainer(cfg))
    manifest = read_manifest(cfg.data.root)
    masks = np.stack([np.stack([s[m + ".npy"] for m in manifest["mask_members"]])
                      for shard in manifest["splits"]["val"]["shards"]
                      for s in iter_shard(tiny_dataset / "data" / shard["file"])])   # (N, K, H, W)
    valid, gap = masks != 255, masks == 1
    accuracy = [(~gap[:, k])[valid[:, k]].mean() for k in range(masks.shape[1])]
    assert check.details["all_canopy"]["val/accuracy_mean"] == pytest.approx(np.mean(accuracy), abs=1e-9)
    assert check.details["all_canopy"]["val/recall_mean"] == 0.0
    rates = list(manifest["summary"]["train"]["gap_fraction"].values())
    for k, (tag, r) in enumerate(zip(manifest["summary"]["train"]["gap_fraction"], rates)):
        f = gap[:, k][valid[:, k]].mean()
        expected_iou = r * f / (r + f - r * f)        # independent guess at rate r, truth at rate f
        assert check.details["random"][f"val/iou_{tag}"] == pytest.approx(expected_iou, abs=0.03)


def test_batch_check_flags_mask_values_outside_the_labels(tiny_dataset):
    trainer = _trainer(tiny_config(tiny_dataset))
    batch = sanity.first_batch(trainer)
    assert sanity.check_batch(trainer, batch).status == "ok"
    batch["masks"][0, 0, 0, 0] = 7
    check = sanity.check_batch(trainer, batch)
    assert check.status == "fail" and "7" in check.message


def test_weight_check_names_a_nan_parameter(tiny_dataset):
    model = _trainer(tiny_config(tiny_dataset)).raw_model
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    check = sanity.check_weights(model)
    assert check.status == "fail" and "head.bias" in check.message


def test_initial_loss_is_ln2_for_bce_and_a_saturated_start_is_flagged(tiny_dataset):
    trainer = _trainer(tiny_config(tiny_dataset, loss={"name": "bce"}))
    batch = sanity.first_batch(trainer)
    check = sanity.check_initial_loss(trainer, batch)
    assert check.status == "ok", check.message
    assert check.details["expected"] == pytest.approx(math.log(2))
    assert check.details["zero_output"] == pytest.approx(math.log(2), rel=1e-5)   # BCE at p = 0.5, any target
    trainer.raw_model.register_forward_hook(lambda module, inputs, out: out + 8.0)
    assert sanity.check_initial_loss(trainer, batch).status == "warn"


def test_batch_size_finder_catches_out_of_memory_and_restores_the_trainer(tiny_dataset, monkeypatch):
    trainer = _trainer(tiny_config(tiny_dataset))
    batch = sanity.first_batch(trainer)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items() if torch.is_tensor(v)}
    real_step = trainer.train_step

    def step(b):
        if b["masks"].shape[0] > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(b)
    monkeypatch.setattr(trainer, "train_step", step)
    found = batch_finder.find_batch_size(trainer, batch, limit=64)
    assert found.largest == 6 and found.tried == [1, 2, 4, 8, 6, 7]
    assert set(found.peak_mb) == set(found.tried) and all(mb > 0 for mb in found.peak_mb.values())
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.raw_model.parameters())
    monkeypatch.setattr(trainer, "train_step", lambda b: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):           # only memory errors are caught
        batch_finder.find_batch_size(trainer, batch, limit=4)


@pytest.mark.parametrize("largest, status", [(2, "fail"), (4, "ok"), (64, "ok")])
def test_batch_size_check_fails_only_when_the_configured_batch_does_not_fit(tiny_dataset, monkeypatch,
                                                                           largest, status):
    trainer = _trainer(tiny_config(tiny_dataset))                      # train.batch_size is 4
    monkeypatch.setattr(batch_finder, "try_batch", lambda trainer, batch, size: size <= largest)
    check = sanity.check_batch_size(trainer, sanity.first_batch(trainer), limit=64, search=True)
    assert check.status == status and check.details["largest"] == largest
    assert ("train.batch_size=4 does not fit" in check.message) == (status == "fail")


def test_cpu_batch_size_is_an_estimate_from_measured_per_sample_memory_and_free_ram(tiny_dataset, monkeypatch):
    """On CPU the finder does not search (running out of RAM is no catchable error): it measures what a sample
    adds to a step's peak RSS and bounds the batch by the RAM available."""
    trainer = _trainer(tiny_config(tiny_dataset))                      # train.batch_size is 4
    peaks = iter([500.0, 500.0, 540.0, 620.0, 780.0])                 # MB after steps of 4, 8, 16, 32, 64
    monkeypatch.setattr(batch_finder, "try_batch", lambda trainer, batch, size: True)
    monkeypatch.setattr("lib.train.monitor.process_memory_mb", lambda: {"sys/rss_peak_mb": next(peaks)})
    monkeypatch.setattr(batch_finder, "available_memory_mb", lambda: 1000.0)
    check = sanity.check_batch_size(trainer, sanity.first_batch(trainer), limit=64)
    assert check.status == "ok" and check.details["tried"] == [4, 8, 16, 32]  # stopped after two growths
    assert check.details["per_sample_mb"] == pytest.approx(80 / 16)          # 620 - 540 MB for 16 more
    assert check.details["largest"] == 32 + int(0.8 * 1000 / 5)
    assert "not tried" in check.message and "5.0 MB" in check.message
    flat = iter([500.0] * 10)                                           # the peak never grows: no estimate
    monkeypatch.setattr("lib.train.monitor.process_memory_mb", lambda: {"sys/rss_peak_mb": next(flat)})
    check = sanity.check_batch_size(trainer, sanity.first_batch(trainer), limit=16)
    assert check.details["largest"] == 0 and "searches only on GPU" in check.message


def test_batch_size_finder_result_is_written_into_a_config(tiny_dataset, tmp_path, capsys):
    import sanity_check
    from lib.core.config import load_config
    cfg = tiny_config(tiny_dataset)
    sanity_check.write_batch_config(cfg, sanity.Check("batch size", "ok", "", {"largest": 37}), tmp_path / "b.json")
    written = load_config(tmp_path / "b.json")
    assert written.train.batch_size == 37 and written.optim == cfg.optim and "train.batch_size=37" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="no batch size to write"):
        sanity_check.write_batch_config(cfg, sanity.Check("batch size", "ok", "unmeasured", {"largest": 0}), tmp_path / "c.json")


def test_sanity_script_passes_a_tiny_run_and_fails_one_that_cannot_learn(tiny_dataset, tmp_path, capsys):
    import sanity_check
    config = tmp_path / "tiny.json"
    save_config(tiny_config(tiny_dataset, optim={"lr": 0.01}), config)
    assert sanity_check.main(["--config", str(config), "--steps", "150", "--out", str(tmp_path / "ok")]) == 0
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert [c["name"] for c in report] == ["weights", "batch", "initial loss", "baselines", "batch size",
                                           "gradients", "overfit"]
    assert (tmp_path / "ok" / "tb").is_dir()
    rc = sanity_check.main(["--config", str(config), "--optim.lr=0", "--steps", "10", "--out", str(tmp_path / "bad")])
    out = capsys.readouterr().out
    assert rc == 1 and "[FAIL] overfit" in out and "FAILED" in out
