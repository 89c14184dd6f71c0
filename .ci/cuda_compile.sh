#!/usr/bin/env bash
# CI without a GPU: builds the extension with its CUDA kernels (FORCE_CUDA=1)
# against torch 2.14.1 in a fresh venv, in a temporary copy of the tree, and
# checks that the CUDA kernels of all three ops are registered. Run from the
# repository root; exits non-zero on any failure.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cuda_home() {  # the folder holding lib64/libcudart.so (and bin/nvcc)
  local d nvcc
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [ -n "$d" ] && [ -e "$d/lib64/libcudart.so" ] && [ -x "$d/bin/nvcc" ]; then
      echo "$d"; return 0
    fi
  done
  if nvcc=$(command -v nvcc 2>/dev/null); then
    d=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    if [ -e "$d/lib64/libcudart.so" ]; then echo "$d"; return 0; fi
  fi
  return 1
}
if ! CUDA_HOME=$(cuda_home); then
  echo "cuda_compile: no CUDA toolkit found (need <dir>/lib64/libcudart.so and <dir>/bin/nvcc)" >&2
  exit 1
fi
echo "cuda_compile: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

start=$(date +%s)
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check torch==2.14.1 numpy ninja setuptools wheel
echo "cuda_compile: venv ready in $(( $(date +%s) - start )) s"

mkdir "$work/src"
tar -C "$repo" --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=__pycache__ -cf - . | tar -C "$work/src" -xf -
cd "$work/src"
start=$(date +%s)
if ! CUDA_HOME="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1 MAX_JOBS=2 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" "$work/venv/bin/python" setup.py build_ext --inplace \
    > "$work/build.log" 2>&1; then
  grep -E "error|Error" "$work/build.log" | head -40 >&2 || true
  tail -20 "$work/build.log" >&2
  echo "cuda_compile: build failed" >&2
  exit 1
fi
echo "cuda_compile: built in $(( $(date +%s) - start )) s"

"$work/venv/bin/python" - <<'PY'
import sys
sys.path[:0] = [".", "python"]
import torch
import autobalance_ext
ops = ("parametric_ce", "parametric_ce_backward", "parametric_ce_double_backward")
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"autobalance::{op}", "CUDA")]
assert autobalance_ext.has_cuda_kernels() and not missing, f"no CUDA kernel for {missing}"
print("cuda_compile: CUDA kernels registered for", ", ".join(ops))
PY
