"""Export a checkpoint for deployment and check the exported model against the eager one.

    python export.py --checkpoint runs/quick/best.ckpt --format torchscript --out model.ts
    python export.py --checkpoint runs/exp1/best.ckpt --format exported --out exp1.pt2
    python export.py --checkpoint runs/exp1/best.ckpt --format onnx --out exp1.onnx   # needs onnx, onnxruntime
"""
import argparse
import sys
from pathlib import Path

from lib.core.cli import handle_errors


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The exported model takes the raw DSM in metres (NaN = nodata) and thresholds in metres and "
               "returns gap probabilities; normalisation is inside. A model card (same stem, .json) is "
               "written beside it; predict.py accepts a .ts file as --checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt)")
    parser.add_argument("--format", default="torchscript", choices=("torchscript", "exported", "onnx"),
                        help="torchscript (.ts), exported = torch.export ExportedProgram (.pt2), onnx (.onnx)")
    parser.add_argument("--out", help="output file (default: the checkpoint's path with the format's suffix)")
    return parser.parse_args(argv)


@handle_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from lib.infer.export import FORMATS, PARITY_TOL, export_model
    from lib.infer.loading import load_model

    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(FORMATS[args.format])
    card = export_model(load_model(args.checkpoint, "cpu"), args.format, out)
    print(f"exported {card['model']} as {args.format} to {out} (model card {out.with_suffix('.json')})")
    print(f"parity with the eager model: max abs difference {card['parity_max_abs_diff']:.3g} "
          f"(limit {PARITY_TOL:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
