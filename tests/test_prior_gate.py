"""model.prior_gate: a per-tile choice between the model and the classical method, learnt from a per-tile target."""
import pytest
import torch

from conftest import tiny_config
from lib.core.errors import ModelError
from lib.gaps.masks import IGNORE
from lib.models import build_model, rebuild_model
from lib.models.prior import CLASSICAL_GAIN, GATE_START, ClassicalPrior, gate_loss

FEATURES = ["dsm", "relative_height_9m", "relative_height_15m"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.1, 0.4]), torch.randn(2, 1, 8, 8, generator=g)


def test_training_forwards_return_the_model_and_record_the_gate_once():
    prior = ClassicalPrior([1, 2], gate_inputs=3).train()
    x, t, network = _inputs()
    out = prior(x, t, network)
    torch.testing.assert_close(out, network + prior.rule(x, t), rtol=0, atol=0)   # the task's loss sees the model
    gate, classical, model = prior.pop_gate()
    assert gate.shape == (2, 1, 1, 1) and torch.allclose(gate, torch.full_like(gate, GATE_START))
    torch.testing.assert_close(classical, CLASSICAL_GAIN * (t.view(-1, 1, 1, 1) - x[:, 2:3]))  # the widest window
    assert torch.equal(model, out) and not model.requires_grad
    with pytest.raises(ModelError, match="no gate recorded"):
        prior.pop_gate()
    prior.eval()(x, t, network)
    assert prior.recorded_gate is None                       # validation and prediction record nothing


def test_eval_forwards_mix_the_two_probabilities_by_the_gate():
    prior = ClassicalPrior([1, 2], gate_inputs=3).eval()
    x, t, network = _inputs()
    model = network + prior.rule(x, t)
    classical = CLASSICAL_GAIN * (t.view(-1, 1, 1, 1) - x[:, 2:3])
    weight = torch.sigmoid(torch.tensor(GATE_START))
    with torch.no_grad():
        expected = weight * torch.sigmoid(classical) + (1 - weight) * torch.sigmoid(model)
        torch.testing.assert_close(torch.sigmoid(prior(x, t, network)), expected, rtol=1e-4, atol=1e-5)
        prior.gate[2].bias.fill_(30.0)                       # fully open: the classical decision, h <= T
        assert torch.equal(prior(x, t, network) > 0, x[:, 2:3] < t.view(-1, 1, 1, 1))
        prior.gate[2].bias.fill_(-30.0)                      # closed: the model's decision
        assert torch.equal(prior(x, t, network) > 0, model > 0)


def _two_tiles():
    """Labels (2, 1, 4, 4) and classical and model logits: on tile 0 the classical method errs less (the
    model is wrong on a labelled row, the classical method on an unlabelled one), on tile 1 it is wrong."""
    target = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    target[:, :, :2] = 1
    right = torch.where(target.bool(), 5.0, -5.0)            # logits that match the target everywhere
    classical, model = right.clone(), right.clone()
    classical[1] *= -1                                       # tile 1: the classical method is wrong
    model[0, :, 0] *= -1                                     # tile 0: the model is wrong on one row
    classical[0, :, 3] *= -1                                 # ... and the classical method on a row nobody labelled
    target[0, :, 3] = IGNORE
    return target, classical, model


def test_the_gate_target_is_whichever_errs_less_on_the_labelled_pixels_of_each_tile():
    target, classical, model = _two_tiles()
    gate = torch.zeros(2, 1, 1, 1, requires_grad=True)
    gate_loss(gate, classical, model, target).backward()
    assert gate.grad[0].item() < 0 < gate.grad[1].item()    # open the gate on tile 0, close it on tile 1


def test_the_mixture_objective_is_the_labels_bce_of_the_mixture_made_in_prediction():
    target, classical, model = _two_tiles()
    gate = torch.zeros(2, 1, 1, 1, requires_grad=True)
    loss = gate_loss(gate, classical, model, target, "mixture")
    loss.backward()
    assert gate.grad[0].item() < 0 < gate.grad[1].item()
    mixture = 0.5 * torch.sigmoid(classical) + 0.5 * torch.sigmoid(model)  # gate 0: half each
    labelled = target != IGNORE
    expected = torch.nn.functional.binary_cross_entropy(mixture[labelled], target[labelled].float())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("objective", ["tile", "mixture"])
def test_prior_gate_builds_rebuilds_trains_and_needs_the_prior(tiny_dataset, tmp_path, objective):
    from lib.train.runner import build_trainer
    cfg = tiny_config(tmp_path, data={"root": str(tiny_dataset / "data"), "input_features": FEATURES},
                      model={"classical_prior": True, "prior_gate": True, "prior_gate_target": objective},
                      train={"epochs": 1, "max_steps": 3},
                      log={"tensorboard": False, "images_every_epochs": 0})
    trainer = build_trainer(cfg, torch.device("cpu"), callbacks=[])
    gate = trainer.raw_model.prior.gate
    assert gate[0].in_features == 2 * 3 + 1
    trainer.fit()
    assert gate[2].weight.abs().sum() > 0                    # learnt from its own target
    assert trainer.raw_model.prior.recorded_gate is None     # each step's gate was consumed
    again = rebuild_model(cfg.model, trainer.raw_model.state_dict())
    assert again.prior.gate is not None
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x, t), trainer.raw_model.eval()(x, t))
        traced = torch.jit.trace(again, (x, t))                # export.py's TorchScript path
        torch.testing.assert_close(traced(x, t), again(x, t))
    with pytest.raises(ModelError, match="prior_gate"):
        build_model(tiny_config(tmp_path, model={"prior_gate": True}).model, in_channels=3)
