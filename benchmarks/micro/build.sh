#!/usr/bin/env bash
# Builds the CPU microbenchmarks against the torch of $PYTHON (default .venv/bin/python).
# recurrence_micro and gemm_micro link the extension's own kernel objects, every SIMD level it
# compiled, dispatched at run time as in the extension (ATEN_CPU_CAPABILITY lowers the level):
# build the extension first (setup.py build_ext --inplace, or make install). fma_peak is built
# with the build machine's widest SIMD flags.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
TORCH=$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")
TEMP=$(ls -d build/temp.* 2>/dev/null | head -n1 || true)
if [[ -z "$TEMP" || ! -f "$TEMP/csrc/cpu/cpu_capability.o" ]]; then
  echo "no extension build in build/temp.*: run setup.py build_ext --inplace first" >&2
  exit 1
fi
# Narrowest level first, as setup.py links them (see its _BuildExtension).
objects=("$TEMP/csrc/cpu/cpu_capability.o")
levels=()
for level in default avx2 avx512 avx512_bf16; do
  if [[ -d "$TEMP/cpu-$level" ]]; then
    objects+=($(find "$TEMP/cpu-$level/csrc/cpu/kernels" -name '*.o' | sort))
    [[ $level != default ]] && levels+=("-DFASTLSTM_CPU_${level^^}")
  fi
done
CXX=(g++ -O3 -std=c++20 -fopenmp -Wno-maybe-uninitialized -Icsrc -I"$TORCH/include"
     -I"$TORCH/include/torch/csrc/api/include")
LIBS=(-L"$TORCH/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$TORCH/lib")
for micro in recurrence_micro gemm_micro; do
  "${CXX[@]}" "${levels[@]}" "benchmarks/micro/$micro.cpp" "${objects[@]}" -o "benchmarks/micro/$micro" "${LIBS[@]}"
  echo "built benchmarks/micro/$micro (levels: default ${levels[*]})"
done

flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }
SIMD=(-mavx2 -mfma)
has avx512f && SIMD+=(-mavx512f)
has avx512_bf16 && SIMD+=(-mavx512bf16)
g++ -O2 -std=c++20 -pthread "${SIMD[@]}" benchmarks/micro/fma_peak.cpp -o benchmarks/micro/fma_peak
echo "built benchmarks/micro/fma_peak (${SIMD[*]})"
