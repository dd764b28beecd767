#!/usr/bin/env bash
# One-stop setup: .venv with tinysam-kit, ONNX Runtime, torchao (int8 on the torch engine), Ray, the Label Studio
# backend deps, object-storage sources (fsspec + s3fs) and FiftyOne (including an offline-capable MongoDB).
# Idempotent; safe to re-run.
#   bash scripts/setup.sh            # everything users need
#   bash scripts/setup.sh --no-fiftyone
set -euo pipefail
cd "$(dirname "$0")/.."

with_fiftyone=1
for arg in "$@"; do
    case "$arg" in
        --no-fiftyone) with_fiftyone=0 ;;
        *) echo "unknown option $arg" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip
# Pin the CPU build explicitly first: an unpinned torch from PyPI is a multi-GB CUDA build on Linux.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==${TINYSAM_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[onnx,int8,labelstudio,ray,cloud,dev]"
if [ "$with_fiftyone" = 1 ]; then
    PATH="$PWD/.venv/bin:$PATH" bash .ci/setup_fiftyone.sh
fi
"$PY" -c "import tinysam_kit, torch; print('tinysam-kit', tinysam_kit.__version__, '| torch', torch.__version__)"
