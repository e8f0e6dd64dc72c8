#!/usr/bin/env bash
# The main job, end to end on this machine: tiny checkpoints, synthetic data, all training stages,
# evaluation on the test split, prediction on a few images.
#   bash scripts/demo.sh [PYTHON] [CONFIG] [--set KEY=VALUE ...]   (make demo / make demo-internvit)
# Extra arguments go to the training command, e.g. --set "train.report_to=[tensorboard]"
# (make demo DEMO_ARGS='--set train.report_to=[tensorboard]').
set -euo pipefail
PY=${1:-python}
CONFIG=${2:-config/demo_swin.yaml}
shift $(( $# < 2 ? $# : 2 ))
RUN=runs/$(basename "$CONFIG" .yaml)
DATA=${DEMO_DATA:-datasets/receipts}
start=$(date +%s)

echo "== 1/5 tiny random checkpoints (InternVL2, Swin, Swin V2) -> checkpoints/tiny"
"$PY" scripts/make_tiny_checkpoints.py --out checkpoints/tiny --seed 0

TRAIN=6000
echo "== 2/5 synthetic receipt-count data ($TRAIN training images) -> $DATA"
if [ -f "$DATA/test/metadata.csv" ] && [ -f "$DATA/train/metadata.csv" ] \
   && [ "$(wc -l < "$DATA/train/metadata.csv")" -eq $((TRAIN + 1)) ]; then
  echo "   (already there; delete $DATA to regenerate)"
else
  if [ -e "$DATA" ]; then
    # Replace only a set this script generated (make_receipts.py writes contact_sheet.png); never a user's folder.
    if [ ! -f "$DATA/contact_sheet.png" ]; then
      echo "error: $DATA exists but is not a generated demo set with $TRAIN training images; set DEMO_DATA to another folder" >&2
      exit 1
    fi
    rm -rf "$DATA"
  fi
  "$PY" scripts/make_receipts.py --out "$DATA" --train $TRAIN --val 200 --test 200 --seed 0 --size 224
fi

echo "== 3/5 all training stages: $CONFIG -> $RUN"
rm -rf "$RUN"
"$PY" -m train --config "$CONFIG" --set data.train="$DATA/train" --set data.val="$DATA/val" \
  --set data.test="$DATA/test" --set output_dir="$RUN" "$@"

echo "== 4/5 evaluation on the test split -> $RUN/eval"
"$PY" scripts/evaluate.py --checkpoint "$RUN/final" --data "$DATA/test/metadata.csv" --out "$RUN/eval"

echo "== 5/5 prediction on a few test images"
"$PY" scripts/predict.py --checkpoint "$RUN/final" $(ls "$DATA"/test/*.jpg | head -n 6)

echo "== demo finished in $(( $(date +%s) - start )) s; run folder: $RUN (report: $RUN/report.md, curves: $RUN/curves.png)"
