"""Properties of single training steps, on trainers built by the run's own wiring (runner.build_trainer):
per-sample thresholds in the loss, gradient accumulation, encoder freezing and its LR scale, EMA."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from lib.train import runner
from lib.train.checkpoint import load_checkpoint
from lib.gaps.masks import IGNORE

CPU = torch.device("cpu")
STILL = {"augment": {"enabled": False}, "model": {"dropout": 0.0, "norm": "group"}}  # no randomness, no batch coupling


def _trainer(root, **sections):
    torch.manual_seed(0)
    return runner.build_trainer(tiny_config(root, **{**STILL, **sections}), CPU, callbacks=[])


def _clean(batch):
    """No nodata: every sample has the same number of valid pixels, so per-batch means add up exactly."""
    return {**batch, "dsm": torch.nan_to_num(batch["dsm"], nan=float(batch["dsm"].nanmean())),
            "masks": torch.where(batch["masks"] == IGNORE, 0, batch["masks"])}


def test_mixed_threshold_batch_loss_uses_each_samples_threshold(tiny_dataset):
    weights = [1.0, 2.0, 3.0, 4.0]
    trainer = _trainer(tiny_dataset, run={"name": "mixed"}, loss={"name": "bce", "threshold_weights": weights})
    batch = next(iter(trainer.train_loader_fn(0)))
    state = trainer.task.generator.get_state()
    loss, _ = trainer._forward_loss(batch)
    trainer.task.generator.set_state(state)
    t_idx = torch.multinomial(trainer.task.weights, len(batch["dsm"]), replacement=True,
                              generator=trainer.task.generator)
    assert len(set(t_idx.tolist())) > 1, "the test needs a batch that mixes thresholds"

    def reference(thresholds_of_sample):
        """Each sample alone through the model at the given threshold, BCE weighted by that threshold."""
        num = den = 0.0
        for b, k in enumerate(thresholds_of_sample.tolist()):
            t = trainer.task.normalizer.normalise_threshold([trainer.task.thresholds_m[k]])
            logits = trainer.model(trainer.task.normalizer(batch["dsm"][b:b + 1]), t)[0, 0]
            target = batch["masks"][b, k]
            valid = target != IGNORE
            bce = F.binary_cross_entropy_with_logits(logits, (target == 1).float(), reduction="none")
            num = num + weights[k] * bce[valid].sum()
            den = den + valid.sum()
        return num / den

    with torch.no_grad():
        assert float(loss) == pytest.approx(float(reference(t_idx)), rel=1e-5)
        first_for_all = torch.full_like(t_idx, int(t_idx[0]))  # the old tool's bug: one threshold per batch
        assert float(loss) != pytest.approx(float(reference(first_for_all)), rel=1e-3)


def test_gradient_accumulation_matches_one_big_batch(tiny_dataset):
    sgd = {"name": "sgd", "momentum": 0.0, "lr": 0.5, "weight_decay": 0.0, "grad_clip": 0.0}
    schedule = {"name": "constant", "warmup_steps": 0}
    micro = _trainer(tiny_dataset, run={"name": "acc2"}, optim={**sgd, "accumulate_steps": 2}, schedule=schedule)
    big = _trainer(tiny_dataset, run={"name": "acc1"}, optim=sgd, schedule=schedule, train={"batch_size": 8})
    big.raw_model.load_state_dict(micro.raw_model.state_dict())
    for t in (micro, big):
        t.task.weights = torch.tensor([0.0, 1.0, 0.0, 0.0])  # one threshold: both draw the same targets
    loader = iter(micro.train_loader_fn(0))
    b1, b2 = _clean(next(loader)), _clean(next(loader))
    params = lambda t: dict(t.raw_model.named_parameters())  # noqa: E731
    before = {k: v.detach().clone() for k, v in params(micro).items()}
    assert not micro.train_step(b1).get("optimizer_step")
    micro.batch_in_epoch = 1
    assert micro.train_step(b2)["optimizer_step"]
    big.train_step({k: torch.cat([b1[k], b2[k]]) if torch.is_tensor(b1[k]) else b1[k] + b2[k] for k in b1})
    a, b = params(micro), params(big)
    moved = max(float((a[k].detach() - before[k]).abs().max()) for k in a)
    assert moved > 1e-3
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6), k


def test_frozen_encoder_gets_no_update_then_trains_with_scaled_lr(tiny_dataset):
    trainer = _trainer(tiny_dataset, run={"name": "freeze"}, train={"freeze_encoder_epochs": 1},
                       optim={"encoder_lr_scale": 0.25})
    encoder_ids = {id(p) for p in trainer.raw_model.encoder_parameters()}
    scales = {g["lr_scale"] for g in trainer.optimizer.param_groups if id(g["params"][0]) in encoder_ids}
    assert scales == {0.25}
    enc = lambda: [p.detach().clone() for p in trainer.raw_model.encoder_parameters()]  # noqa: E731
    head = trainer.raw_model.head.weight
    enc0, head0 = enc(), head.detach().clone()
    trainer.train_one_epoch()
    assert all(torch.equal(a, b) for a, b in zip(enc0, enc())), "a frozen encoder parameter moved"
    assert not torch.equal(head0, head)
    trainer.epoch, trainer.batch_in_epoch = 1, 0
    trainer.train_one_epoch()
    assert sum(not torch.equal(a, b) for a, b in zip(enc0, enc())) > len(enc0) // 2
    lr = trainer.schedule(trainer.step - 1)
    for g in trainer.optimizer.param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])


def test_ema_weights_are_evaluated_and_saved(tiny_dataset):
    cfg = tiny_config(tiny_dataset, run={"name": "ema"}, train={"epochs": 1, "ema_decay": 0.8})
    run_dir = runner.train_model(cfg)
    best, last = load_checkpoint(run_dir / "best.ckpt"), load_checkpoint(run_dir / "last.ckpt")
    floats = [k for k, v in last["model"].items() if torch.is_tensor(v) and v.is_floating_point()]
    assert all(torch.equal(best["model"][k], last["ema"][k]) for k in floats)
    assert any(not torch.equal(last["model"][k], last["ema"][k]) for k in floats)
    # a single-process evaluation of the EMA weights as a plain model gives the logged metrics
    evaluator = runner.build_trainer(tiny_config(tiny_dataset, run={"name": "ema_eval"}), CPU, callbacks=[])
    evaluator.raw_model.load_state_dict(best["model"])
    metrics = evaluator.validate()
    assert metrics["val/iou_mean"] == pytest.approx(best["metrics"]["val/iou_mean"], abs=1e-12)
    assert metrics["val/loss"] == pytest.approx(best["metrics"]["val/loss"], rel=1e-6)
