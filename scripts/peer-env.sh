#!/usr/bin/env bash
# Creates the Python environment for scripts/trl_peer.py: PyTorch and Hugging Face TRL from
# PyPI (about 6 GB with torch's CUDA libraries, though it runs on the CPU). Only peer
# benchmarks and cross-checks use it; the crate and CI never do.
# Usage: scripts/peer-env.sh [DIR]   (default ~/.cache/dpo-kernels/peer-venv); prints DIR/bin/python.
set -euo pipefail
dir=${1:-$HOME/.cache/dpo-kernels/peer-venv}
if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import torch, trl, safetensors" 2>/dev/null; then
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet torch==2.15.0 trl==1.16.0 safetensors numpy
fi
echo "$dir/bin/python"
