#!/usr/bin/env bash
# The whole workflow, end to end, the way a user runs it:
#   prepare data -> sanity checks -> LR finder -> small grid search -> train with the chosen LR and the
#   best grid config -> resume check -> evaluate (with baselines) -> predict whole scenes -> export.
#
#   bash run_all.sh                               # quick config: a few minutes on a 2-core CPU
#   CONFIG=configs/config.json bash run_all.sh    # the same workflow at full size
#   OUT=runs/wf2 bash run_all.sh                  # another output folder
#
# Stops at the first failing step and names it; ends with a summary (artefacts, test metrics, times).
set -euo pipefail
cd "$(dirname "$0")"

CONFIG=${CONFIG:-configs/quick.json}
OUT=${OUT:-runs/workflow}
PY=${PYTHON:-python}
REAL=../shared/data/real
NAME=$(basename "$OUT")
mkdir -p "$OUT"
TIMES="$OUT/step_times.txt"
: > "$TIMES"

step() {  # step NAME COMMAND...: run, time, and stop the workflow with the step's name on failure
    local name=$1
    shift
    echo
    echo "=== [$name] $*"
    local start
    start=$(date +%s%N)
    if ! "$@"; then
        echo "run_all.sh: step '$name' failed (command: $*)" >&2
        exit 1
    fi
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%-20s %5d.%01d s\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) >> "$TIMES"
}

# All runs of this workflow go under $OUT; the dataset root comes from the config.
COMMON=(--run.output_root="$OUT")

step prepare        $PY prepare_data.py --config "$CONFIG"
step sanity         $PY sanity_check.py --config "$CONFIG" "${COMMON[@]}" --run.name=sanity --out "$OUT/sanity"
step lr_finder      $PY lr_finder.py --config "$CONFIG" "${COMMON[@]}" --run.name=lr_finder --steps 60 \
                        --out "$OUT/lr_finder" --write-config "$OUT/config_lr.json"
step grid_search    $PY grid_search.py --config "$OUT/config_lr.json" --grid configs/grid.json "${COMMON[@]}" \
                        --name search --search.epochs=1
step train          $PY train.py --config "$OUT/search/best_config.json" "${COMMON[@]}" --run.name=main
step resume_check   $PY train.py --config "$OUT/search/best_config.json" "${COMMON[@]}" --run.name=main --resume auto
CKPT="$OUT/main/best.ckpt"
step evaluate       $PY evaluate.py --checkpoint "$CKPT" --split test --out "$OUT/evaluate"
step synthetic_scene $PY prepare_data.py --config "$CONFIG" --export-scene "$OUT/scene" --scene-size 384
step predict_synthetic $PY predict.py --checkpoint "$CKPT" --dsm "$OUT/scene/syn999_DSM.tif" \
                        --chm "$OUT/scene/syn999_CHM.tif" --out "$OUT/predict_synthetic"
if [ -f "$REAL/wellington_DSM.tif" ]; then
    step predict_wellington $PY predict.py --checkpoint "$CKPT" --dsm "$REAL/wellington_DSM.tif" \
                        --chm "$REAL/wellington_CHM.tif" --out "$OUT/predict_wellington"
    # the same scene with the shipped pretrained model (no --checkpoint: weights/gaps_dsm_v5.pt)
    step predict_shipped $PY predict.py --dsm "$REAL/wellington_DSM.tif" --thresholds 2 5 10 15 \
                        --chm "$REAL/wellington_CHM.tif" --out "$OUT/predict_shipped"
else
    echo "(skipping the real-scene prediction: $REAL/wellington_DSM.tif not found)"
fi
step export         $PY export.py --checkpoint "$CKPT" --format torchscript --out "$OUT/export/model.ts"

echo
echo "=== summary"
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"artefacts in {out}/: main/ (checkpoints, metrics.jsonl, tb/), evaluate/report.md, "
      "predict_*/ (gap maps, scores.json), export/model.ts")
methods = json.loads((out / "evaluate" / "report.json").read_text())["methods"]
for name in ("model", "classical", "all_canopy", "random"):
    metrics = methods[name]["metrics"]
    ious = "  ".join(f"{k[4:]} {v:.3f}" for k, v in metrics.items() if k.startswith("iou_") and v is not None)
    print(f"test split IoU, {name:10s}: {ious}")
for scene in ("predict_synthetic", "predict_wellington", "predict_shipped"):
    path = out / scene / "scores.json"
    if path.exists():
        scores = json.loads(path.read_text())
        for name in ("model", "ground_filter", "classical"):
            ious = "  ".join(f"{tag} {s['iou']:.3f}" for tag, s in scores[name].items() if isinstance(s, dict))
            print(f"{scene} IoU, {name:13s}: {ious}")
EOF
echo "time per step:"
cat "$TIMES"
