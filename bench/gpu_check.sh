#!/usr/bin/env bash
# One-shot check for a GPU machine (torch with CUDA preinstalled, nothing
# downloadable): builds the CUDA kernels in place (FORCE_CUDA=1), runs
# tests/test_cuda.py, then bench/bench_gpu.py. Logs and gpu_results.json go
# to $OUT when it is set. Finishes within GPU_CHECK_SECONDS (default 470).
# Exit status: 0 when the build, the tests and the bench all succeed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-470} ))
left() { echo $(( deadline - $(date +%s) )); }
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
status=0

cuda_home() {  # a folder with bin/nvcc and lib64/libcudart.so
  local d nvcc torch_home
  nvcc=$(command -v nvcc 2>/dev/null) && nvcc=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  torch_home=$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)
  for d in "${CUDA_HOME:-}" "$nvcc" "$torch_home" /usr/local/cuda /usr/local/cuda-*; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && [ -e "$d/lib64/libcudart.so" ]; then
      echo "$d"; return 0
    fi
  done
  return 1
}
if ! CUDA_HOME=$(cuda_home); then
  echo "gpu_check: no CUDA toolkit found (a folder with bin/nvcc and lib64/libcudart.so)"
  exit 1
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

echo "== build ($(date +%T)), logs in $LOGS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
echo "nvcc: $CUDA_HOME/bin/nvcc, MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
if ! timeout 300 "$PY" setup.py build_ext --inplace > "$LOGS/gpu_build.log" 2>&1; then
  echo "gpu_check: build failed; the end of $LOGS/gpu_build.log:"
  tail -40 "$LOGS/gpu_build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
if ! "$PY" -c 'import torch, autobalance_ext; assert autobalance_ext.has_cuda_kernels()'; then
  echo "gpu_check: the build has no CUDA kernels"
  exit 1
fi

echo "== tests/test_cuda.py ($(date +%T))"
if "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -c 'import hypothesis' 2>/dev/null || echo "(hypothesis is not installed; test_cuda.py does not need it)"
  budget=$(( $(left) - 200 ))  # keep time for the bench
  [ "$budget" -gt 60 ] || budget=60
  timeout "$budget" "$PY" -m pytest tests/test_cuda.py -q -rfE -p no:cacheprovider \
    > "$LOGS/gpu_tests.log" 2>&1
  rc=$?
  tail -60 "$LOGS/gpu_tests.log"
  if [ "$rc" -eq 124 ]; then echo "gpu_check: tests timed out after ${budget} s"; fi
  [ "$rc" -eq 0 ] || status=1
else
  echo "gpu_check: pytest is not installed here (nothing can be downloaded); skipping the tests"
fi

echo "== bench/bench_gpu.py ($(date +%T))"
quick=()
[ "$(left)" -gt 200 ] || quick=(--quick)  # no torch.compile, fewer runs
timeout $(( $(left) > 30 ? $(left) - 5 : 25 )) "$PY" bench/bench_gpu.py ${quick[@]+"${quick[@]}"} \
  --out "$LOGS/gpu_results.json" 2>&1 | tee "$LOGS/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done ($(date +%T)), status $status"
exit $status
