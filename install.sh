#!/usr/bin/env bash
# Installs the framework and its stack into the active Python environment, in the order that
# works (../shared/STACK.md): torch pinned first, then DeepSpeed built against it without build
# isolation, then this project with its test extra. Safe to re-run.
#
#   bash install.sh                 the Python stack
#   bash install.sh --with-slurm    also Debian's Slurm, munge, shellcheck, iproute2 and util-linux
#                                   (as root or with sudo): what slurm/local-cluster, the tests'
#                                   real multi-host Slurm cluster on this machine, needs
#   bash install.sh --with-eval     also the eval extra (the lm-evaluation-harness, for
#                                   llada lm-eval; the test command installs it)
set -euo pipefail
cd "$(dirname "$0")"
with_slurm=0
extras=test
for arg in "$@"; do
  case "$arg" in
    --with-slurm) with_slurm=1 ;;
    --with-eval) extras=test,eval ;;
    *) echo "install.sh: unknown option $arg (known: --with-slurm, --with-eval)" >&2; exit 2 ;;
  esac
done

if [ "$with_slurm" = 1 ]; then
  missing=()
  for pkg in slurmctld slurmd slurm-client munge shellcheck iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
      echo "install.sh: --with-slurm needs root or sudo to install ${missing[*]}" >&2; exit 1
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
fi

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
python -m pip install -q -e ".[${extras}]"
