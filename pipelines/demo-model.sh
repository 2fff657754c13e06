#!/usr/bin/env bash
# Rebuild the shipped demo model (wsiseg/demo/model.safetensors) from the real data, end to end,
# with fixed seeds: build the mosaics, train, evaluate on the held-out test split, and (with
# --install) copy the model into the package and run `wsiseg demo` with it.
#
#   pipelines/demo-model.sh [WORK_DIR] [--install]
#
# WORK_DIR defaults to runs/demo-model. Environment:
#   WSISEG_SHARED_DATA  the shared data folder       [default: ../shared/data]
#   PYTHON              interpreter with wsiseg      [default: .venv/bin/python if present, else python3]
#   WSISEG_THREADS      CPU threads for torch        [default: 1, as the shipped model was trained;
#                       other values give slightly different (not bitwise identical) weights]
# See pipelines/README.md and docs/demo-model.md.
set -euo pipefail

cd "$(dirname "$0")/.."
WORK=runs/demo-model
INSTALL=0
for arg in "$@"; do
  case "$arg" in
    --install) INSTALL=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) WORK="$arg" ;;
  esac
done
DATA="${WSISEG_SHARED_DATA:-../shared/data}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS="${WSISEG_THREADS:-1}" MKL_NUM_THREADS="${WSISEG_THREADS:-1}"
export PYTHONHASHSEED=0

echo "== 1/4 mosaics: $DATA -> $WORK/data"
"$PYTHON" -m wsiseg.training.mosaic pipelines/demo-data.yaml --data "$DATA" --out "$WORK/data" --overwrite

echo "== 2/4 train -> $WORK/train"
start=$(date +%s)
"$PYTHON" -m wsiseg train "$WORK/data" --classes "$WORK/data/classes.yaml" \
  --config pipelines/demo-model.yaml --out "$WORK/train" --overwrite
echo "training took $(( $(date +%s) - start )) s"

echo "== 3/4 evaluate on the held-out test split -> $WORK/eval"
"$PYTHON" -m wsiseg evaluate "$WORK/train/model.safetensors" "$WORK/data" \
  --classes "$WORK/data/classes.yaml" --split test --device cpu --out "$WORK/eval"
ls -l "$WORK/train/model.safetensors"

if [ "$INSTALL" = 1 ]; then
  echo "== 4/4 install as the demo model and run the demo -> $WORK/demo"
  cp "$WORK/train/model.safetensors" wsiseg/demo/model.safetensors
  "$PYTHON" -m wsiseg demo --out "$WORK/demo" --device cpu --overwrite
else
  echo "== 4/4 skipped (pass --install to copy the model to wsiseg/demo/model.safetensors and run the demo)"
fi
