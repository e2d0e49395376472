"""Export the inference model (raw DSM metres + threshold metres -> gap probabilities; for a tile
classifier, raw bands -> class probabilities) and prove it matches.

Formats: TorchScript (.ts, torch.jit.trace), ExportedProgram (.pt2, torch.export with dynamic batch and
size) and ONNX (.onnx; needs the optional packages onnx + onnxruntime). The normaliser is inside the
graph, NaN handling included. After writing, the file is loaded back and compared with the eager model
on random and synthetic-forest DSMs (classifiers: random band values) with NaN holes, at two sizes and
batch sizes; a difference above PARITY_TOL raises ExportError. A model card (same stem, .json) carries
what lib/inference needs.
"""
import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import torch

from lib.core.errors import ExportError
from lib.core.atomic import write_json

FORMATS = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}
PARITY_TOL = 1e-4


def _with_holes(dsm: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Put a NaN rectangle and a few NaN pixels into each image (B,C,H,W): nodata must match eager too."""
    b, _, h, w = dsm.shape
    dsm = dsm.clone()
    dsm[:, :, h // 4:h // 3, w // 5:w // 2] = float("nan")
    dsm[torch.rand(dsm.shape, generator=generator) < 0.01] = float("nan")
    return dsm


def parity_inputs(tile_px: int, thresholds_m, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dsm (B,1,H,W), thresholds (B,)) pairs: noise around 300 m, and synthetic forest DSMs
    (lib.data.synthetic: terrain, crowns, gaps) at tile_px and 2 x tile_px, all with NaN holes."""
    from lib.data.synthetic import SiteParams, generate_site

    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(list(thresholds_m), dtype=torch.float32)
    pick = lambda n: t[torch.randint(len(t), (n,), generator=g)]  # noqa: E731
    noise = 300 + 20 * torch.randn(3, 1, tile_px, tile_px, generator=g)
    cases = [(_with_holes(noise, g), pick(3))]
    for size, batch in ((tile_px, 2), (2 * tile_px, 1)):
        sites = [generate_site(seed + i, SiteParams(size_px=size, nodata_fraction=0.0)).dsm for i in range(batch)]
        dsm = torch.from_numpy(np.stack(sites))[:, None]
        cases.append((_with_holes(dsm, g), pick(batch)))
    return cases


def class_parity_inputs(tile_px: int, normalization: dict, seed: int = 0) -> list[tuple[torch.Tensor]]:
    """(image (B,C,H,W),) cases for a classifier: band values drawn around the training mean/std, at
    tile_px and 2 x tile_px, with NaN holes."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(normalization["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"]).view(1, -1, 1, 1)
    return [(_with_holes(mean + std * torch.randn(b, mean.shape[1], px, px, generator=g), g),)
            for b, px in ((3, tile_px), (2, 2 * tile_px))]


def _torchscript(net, example, path: Path):
    with torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
    traced.save(str(path))
    return torch.jit.load(str(path))


def _exported(net, example, path: Path):
    auto = torch.export.Dim.AUTO  # images (B, C, H, W): batch and size dynamic; thresholds (B,)
    shapes = tuple({0: auto, 2: auto, 3: auto} if x.dim() == 4 else {0: auto} for x in example)
    try:
        program = torch.export.export(net, example, dynamic_shapes=shapes)
    except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependent...)
        raise ExportError(f"torch.export failed: {str(exc).splitlines()[0][:300]}",
                          hint="try --format torchscript") from None
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def _onnx(net, example, path: Path):
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs the optional package(s) {', '.join(missing)}, not installed",
                          hint=f"pip install {' '.join(missing)}  (they are not forestgaps dependencies)")
    import onnxruntime

    inputs = list(inspect.signature(net.forward).parameters)               # ["dsm", "thresholds_m"] or ["image"]
    image_axes = {0: "batch", 2: "height", 3: "width"}
    axes = {name: image_axes if x.dim() == 4 else {0: "batch"} for name, x in zip(inputs, example)}
    axes["probabilities"] = image_axes if len(inputs) == 2 else {0: "batch"}  # gap maps, or (B, classes)
    torch.onnx.export(net, example, str(path), opset_version=17, dynamo=False, dynamic_axes=axes,
                      input_names=inputs, output_names=["probabilities"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(*args):
        out = session.run(None, {name: x.numpy() for name, x in zip(inputs, args)})[0]
        return torch.from_numpy(out)
    return run


EXPORTERS = {"torchscript": _torchscript, "exported": _exported, "onnx": _onnx}


def max_abs_difference(eager, exported, cases) -> float:
    """Largest |eager - exported| over all cases (NaN in one but not the other counts as infinite)."""
    worst = 0.0
    with torch.no_grad():
        for case in cases:
            a, b = eager(*case), exported(*case)
            if a.shape != b.shape or not torch.equal(torch.isnan(a), torch.isnan(b)):
                return float("inf")
            worst = max(worst, float(torch.nan_to_num(a - b).abs().max()))
    return worst


def model_card(loaded, fmt: str, path: Path, difference: float) -> dict:
    """What lib/inference reads back (thresholds_m, pixel_size_m, tile_px, stride) plus provenance."""
    from lib.core.config import config_to_dict

    cfg = loaded.config
    return {"format": fmt, "file": path.name, "torch": torch.__version__, **_signature(loaded),
            "task": loaded.task, "class_names": list(loaded.class_names), "thresholds_m": list(loaded.thresholds_m),
            "tile_px": loaded.tile_px, "stride": loaded.stride,
            "pixel_size_m": loaded.pixel_size_m, "normalization": loaded.meta.get("normalization"),
            "metrics": loaded.meta.get("metrics", {}), "version": loaded.meta.get("version", {}),
            "model": cfg.model.name if cfg else loaded.meta.get("model"),
            "config": config_to_dict(cfg) if cfg else loaded.meta.get("config"),
            "parity_max_abs_diff": difference}


def _signature(loaded) -> dict:
    """The model card's description of the exported forward's inputs and output."""
    if loaded.task == "classification":
        bands = len(loaded.meta["normalization"]["mean"])
        return {"inputs": {"image": f"(B, {bands}, H, W) float32 raw band values, NaN = nodata"},
                "output": f"(B, {len(loaded.class_names)}) float32 class probabilities, in class_names order"}
    return {"inputs": {"dsm": "(B, 1, H, W) float32 metres, NaN = nodata; H, W multiples of stride",
                       "thresholds_m": "(B,) float32 CHM thresholds in metres"},
            "output": "(B, 1, H, W) float32 gap probability; nodata pixels get a value too: mask them"}


def _check_card_path(card_path: Path) -> None:
    """The model card must not replace a weights card (lib/inference: it holds the sha256 of shipped weights)."""
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(card, dict) and "sha256" in card:
        raise ExportError(f"{card_path} is the weights card of {card.get('file')}: the export's model card "
                          "would replace it", hint="choose another --out (e.g. another stem or folder)")


def export_model(loaded, fmt: str, out, seed: int = 0) -> dict:
    """Write loaded.net in `fmt` to `out`, check it against eager, write the model card; returns the card."""
    if fmt not in EXPORTERS:
        raise ExportError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    out = Path(out)
    _check_card_path(out.with_suffix(".json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    net = loaded.net.to("cpu").eval()
    cases = (class_parity_inputs(loaded.tile_px, loaded.meta["normalization"], seed) if loaded.task == "classification"
             else parity_inputs(loaded.tile_px, loaded.thresholds_m, seed))
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # torch.export.load wants the .pt2 suffix
    try:
        exported = EXPORTERS[fmt](net, cases[0], tmp)
        difference = max_abs_difference(net, exported, cases)
        if not difference <= PARITY_TOL:
            raise ExportError(f"{out}: exported model differs from eager by {difference:.3g} "
                              f"(> {PARITY_TOL:g}) on the parity inputs")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    card = model_card(loaded, fmt, out, difference)
    write_json(out.with_suffix(".json"), card)
    return card
