"""train.py end to end: model summary and regularisers in train.log, --profile writes a trace, and
--init-from with a frozen encoder keeps the pretrained encoder exactly."""
import copy
import json

import torch

import train
from conftest import TINY
from lib.train.checkpoint import load_checkpoint


def _config_file(tmp_path, root):
    data = copy.deepcopy(TINY)
    data["data"]["root"] = str(root / "data")
    data["run"]["output_root"] = str(tmp_path / "runs")
    data["train"]["epochs"] = 1
    data["log"]["images_every_epochs"] = 0
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_profile_summary_and_transfer_with_frozen_encoder(tiny_dataset, tmp_path):
    config = _config_file(tmp_path, tiny_dataset)
    assert train.main(["--config", config, "--run.name=pre", "--profile", "2"]) == 0
    pre = tmp_path / "runs" / "pre"
    events = json.loads((pre / "profile" / "trace.json").read_text())["traceEvents"]
    assert any("conv" in str(e.get("name", "")) for e in events)
    assert "Self CPU" in (pre / "profile" / "summary.txt").read_text()
    log = (pre / "train.log").read_text()
    assert "M parameters" in log and "GFLOP per 32x32 tile" in log and "regularisation: dropout" in log

    assert train.main(["--config", config, "--run.name=fine", "--init-from", str(pre / "best.ckpt"),
                       "--train.freeze_encoder_epochs=1", "--optim.encoder_lr_scale=0.1"]) == 0
    before = load_checkpoint(pre / "best.ckpt")["model"]
    after = load_checkpoint(tmp_path / "runs" / "fine" / "last.ckpt")["model"]
    weights = [k for k, v in after.items() if torch.is_tensor(v) and v.is_floating_point()]
    encoder = [k for k in weights if k.startswith("encoder.") and "running_" not in k]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert "encoder frozen" in (tmp_path / "runs" / "fine" / "train.log").read_text()


def test_loader_calibration_choice_is_printed(tiny_dataset, tmp_path, capsys):
    config = _config_file(tmp_path, tiny_dataset)
    assert train.main(["--config", config, "--run.name=cal", "--data.calibrate=true", "--train.max_steps=3"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("loader calibration chose "))
    assert "0 workers (the main process loads)" in line and "samples/s: " in line      # every trial, timed


def test_a_train_split_smaller_than_one_batch_is_an_error(tiny_dataset, tmp_path, capsys):
    """drop_last would run no step at all: a single small plot must not 'train' silently."""
    samples = json.loads((tiny_dataset / "data" / "manifest.json").read_text())["splits"]["train"]["samples"]
    config = _config_file(tmp_path, tiny_dataset)
    assert train.main(["--config", config, f"--train.batch_size={samples + 1}"]) == 2
    err = capsys.readouterr().err
    assert f"the train split has {samples} tile(s) per process, fewer than one batch" in err
    assert f"hint: --train.batch_size={samples}" in err
    assert train.main(["--config", config, f"--train.batch_size={samples}", "--schedule.warmup_steps=0"]) == 0
