#!/usr/bin/env bash
# Create .venv and install ctrkit with the torch/torchrec/fbgemm stack that works on this host.
# torchrec is installed with --no-deps: its declared deps pull the CUDA fbgemm-gpu build,
# which fails to load on a machine without a GPU. We pick the fbgemm build ourselves.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM="fbgemm-gpu==1.8.0"
else
  FBGEMM="fbgemm-gpu-cpu==1.8.0"
fi
# --no-warn-conflicts: pip would report torchrec's declared fbgemm-gpu as missing, which is the
# point of installing fbgemm ourselves (it reads as a failure and is none).
$PIP --no-warn-conflicts "torch==2.13.0" "$FBGEMM"
$PIP --no-warn-conflicts --no-deps "torchrec==1.8.0"
$PIP --no-warn-conflicts pyre-extensions tensordict tqdm iopath "torchmetrics==1.0.3"
$PIP --no-warn-conflicts -e ".[dev]"
echo "ctrkit installed in $VENV ($FBGEMM)"
