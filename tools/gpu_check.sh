#!/usr/bin/env bash
# make gpu-check: the GPU suite, the short GPU benchmark, one summary table (docs/gpu.md).
# Uses $GPU_PY (default python3); installs nothing.
set -u
cd "$(dirname "$0")/.."
py=${GPU_PY:-python3}
out=runs/gpu-check
if ! "$py" -c 'import sys; from megatron.accelerator import gpu_present; sys.exit(0 if gpu_present() else 1)'; then
  echo "make gpu-check needs a CUDA GPU (none is visible here): nothing was run"
  exit 0
fi
rm -rf "$out"; mkdir -p "$out"
export GPU_CHECK_RESULTS="$PWD/$out/tests.jsonl"
start=$(date +%s)
"$py" tests/gpu/run.py 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
tests_end=$(date +%s)
"$py" bench/bench_gpu.py --quick 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
end=$(date +%s)
"$py" bench/gpu_summary.py --tests "$out/tests.jsonl" --tests-log "$out/tests.log" \
  --bench bench/results/gpu.json --tests-rc "$tests_rc" --bench-rc "$bench_rc" \
  --tests-seconds $((tests_end - start)) --bench-seconds $((end - tests_end))
summary_rc=$?
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$summary_rc" -eq 0 ]
