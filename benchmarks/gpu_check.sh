#!/usr/bin/env bash
# The prepared run for a lent GPU machine: build, the CUDA tests, compute-sanitizer on small
# cases, the calibration of the persistent kernel's floor, and the benchmark against cuDNN.
# Everything it prints is saved under $OUT (default benchmarks/results/gpu-<date>) for committing.
#
#   OUT=/some/dir benchmarks/gpu_check.sh [STAGE ...] [--full]
#
# STAGEs (default: all, in this order): build test sanitize calibrate bench. A device call is
# limited to 10 minutes, so a session may run them over several calls (build first: the others
# need the extension built in place). --full runs the full benchmark grid instead of --quick.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
preset="--quick"
stages=()
for arg in "$@"; do
  case "$arg" in
    --full) preset="" ;;
    build|test|sanitize|calibrate|bench) stages+=("$arg") ;;
    *) echo "unknown argument: $arg (stages: build test sanitize calibrate bench; --full)" >&2; exit 2 ;;
  esac
done
[[ ${#stages[@]} -eq 0 ]] && stages=(build test sanitize calibrate bench)
wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }

stage() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.txt"; }

stage "machine"
{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tail -3 | tee -a "$OUT/summary.txt"

if wants build; then
stage "build (ptxas report in build.log)"
if ! FASTLSTM_PTXAS_VERBOSE=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log" | tee -a "$OUT/summary.txt"
  exit 1
fi
grep -E "spill|Used [0-9]+ registers" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 > "$OUT/ptxas.txt"
"$PY" -c "import fastlstm; print('cuda kernels:', fastlstm.cuda_compiled())" 2>&1 | tee -a "$OUT/summary.txt"
fi

if wants test; then
stage "CUDA tests"
timeout 420 "$PY" -m pytest -q -m cuda tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
echo "pytest exit code $?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/test_cuda.log" | tee -a "$OUT/summary.txt"
fi

if wants sanitize; then
stage "compute-sanitizer (memcheck, racecheck, synccheck)"
for tool in memcheck racecheck synccheck; do
  timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" benchmarks/sanitizer_cases.py \
    > "$OUT/sanitizer-$tool.log" 2>&1
  echo "$tool exit code $? ($(grep -c '^ok' "$OUT/sanitizer-$tool.log") cases ran)" | tee -a "$OUT/summary.txt"
  grep -m3 "ERROR SUMMARY\|Error" "$OUT/sanitizer-$tool.log" | tee -a "$OUT/summary.txt"
done
fi

if wants calibrate; then
stage "calibration"
if nvcc -O3 -arch=sm_90 -o "$OUT/sync_latency" benchmarks/calibrate/sync_latency.cu > "$OUT/calibrate.log" 2>&1; then
  timeout 120 "$OUT/sync_latency" > "$OUT/calibrate.md" 2>&1
  rm -f "$OUT/sync_latency"
  cat "$OUT/calibrate.md" | tee -a "$OUT/summary.txt"
fi
fi

if wants bench; then
stage "benchmark ${preset:-full}"
timeout 540 "$PY" benchmarks/bench.py $preset --device cuda --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench exit code $?" | tee -a "$OUT/summary.txt"
tail -30 "$OUT/bench.log" | tee -a "$OUT/summary.txt"
fi
