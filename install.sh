#!/usr/bin/env bash
# Installs the framework and its stack into the active Python environment, in the order that
# works (../shared/STACK.md): torch pinned first, then DeepSpeed built against it without build
# isolation, then this project with its test extra. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
python -m pip install -q -e ".[test]"
