#!/usr/bin/env bash
# Rebuild the real-tissue demo model (wsiseg/demo/tumour.safetensors) from ../shared/data/labelled-regions.
#   pipelines/tumour-model.sh [WORKDIR]      (run from the project root; about 5-10 min on one CPU core)
set -euo pipefail
WORK=${1:-.bench/tumour-model}
DATA=${WSISEG_SHARED_DATA:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import sys; from wsiseg.demo.data import prepare_demo_data; print(prepare_demo_data(sys.argv[1], sys.argv[2]))" \
  "$DATA" "$WORK/data"
OMP_NUM_THREADS=1 "${WSISEG:-.venv/bin/wsiseg}" train "$WORK/data/pairs.csv" --classes "$WORK/data/classes.yaml" \
  --config pipelines/tumour-model.yaml --out "$WORK/run" --overwrite
OMP_NUM_THREADS=1 "${WSISEG:-.venv/bin/wsiseg}" evaluate "$WORK/run/model.safetensors" "$WORK/data/pairs.csv" \
  --classes "$WORK/data/classes.yaml" --split test --out "$WORK/eval"
echo "model: $WORK/run/model.safetensors (copy to wsiseg/demo/tumour.safetensors to ship it)"
