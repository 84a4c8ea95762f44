#!/usr/bin/env bash
# Builds the CPU microbenchmark against the torch of $PYTHON (default .venv/bin/python), with the
# SIMD flags setup.py would pick on this machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
TORCH=$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }
if has avx512f && has avx512bw && has avx512vl && has avx512dq && has fma; then
  SIMD="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512"
elif has avx2 && has fma; then
  SIMD="-mavx2 -mfma -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
else
  SIMD="-DCPU_CAPABILITY=DEFAULT"
fi
# shellcheck disable=SC2086
g++ -O3 -std=c++20 -fopenmp $SIMD -Wno-maybe-uninitialized -Icsrc -I"$TORCH/include" \
  -I"$TORCH/include/torch/csrc/api/include" benchmarks/micro/recurrence_micro.cpp csrc/cpu/lstm_recurrence_cpu.cpp \
  -o benchmarks/micro/recurrence_micro -L"$TORCH/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$TORCH/lib"
echo "built benchmarks/micro/recurrence_micro"
