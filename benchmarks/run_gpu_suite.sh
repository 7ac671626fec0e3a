#!/usr/bin/env bash
# The GPU measurements still owed (see the latest closing note), in one call on 2 GPUs
# (nvidia-h200-x2 through the device tool; about 8 minutes):
#   bash benchmarks/run_gpu_suite.sh "$OUT" .gpu_traces
# 1. the GPU tests, and the minmax-dispatch kernels' tests on CUDA;  2. end to end, EP2, ESFT
# replay, static and minmax dispatch, planning in a process;  3. minmax dispatch as its
# Triton kernels;  4. non-blocking moves next to the CUDA graphs;  5. the executor's
# pause against a loop whose step is a whole DeepSeek-V3 forward pass (58 layers).
# SM clocks and power are logged every 100 ms meanwhile (clocks.csv), to tell GPU clock
# changes from the runtime's own variance. Each step has its own time limit; a failed step
# does not stop the next one.
# The device tool returns at most 8 files, so everything is packed into OUT_DIR/suite.tgz at the
# end; steps are cut short so that the whole suite ends within SUITE_SECONDS (default 570).
set -uo pipefail
dest=${1:?usage: run_gpu_suite.sh OUT_DIR [TRACES_DIR]}
traces=${2:-}
deadline=$((SECONDS + ${SUITE_SECONDS:-570}))
out="$dest/suite"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$out"
nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw --format=csv -lms 100 > "$out/clocks.csv" 2>/dev/null &
clocks=$!
trap 'kill $clocks 2>/dev/null; tar czf "$dest/suite.tgz" -C "$dest" suite && rm -rf "$out"' EXIT

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    (( left < limit )) && limit=$left
    (( limit < 10 )) && { echo "== $name skipped: the suite's time is spent"; return; }
    echo "== $name"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? ($(tail -n 1 "$out/$name.log"))"
}

workload=(--workload synthetic)
[ -n "$traces" ] && workload=(--traces-dir "$traces")
step gpu_tests 150 python -m pytest -q -rs -p no:cacheprovider -m gpu tests
step kernel_tests 120 python -m pytest -q -rs -p no:cacheprovider tests/test_minmax_kernel.py tests/test_kernels.py
step end_to_end 200 python benchmarks/bench_end_to_end.py --device cuda "${workload[@]}" --num-passes 300 \
    --skip-ep8 --dispatch static,minmax --plan-in-process --out "$out"
step end_to_end_minmax_kernel 200 python benchmarks/bench_end_to_end.py --device cuda "${workload[@]}" \
    --num-passes 300 --skip-ep8 --dispatch minmax --dispatch-backend triton --out "$out"
step end_to_end_non_blocking 150 python benchmarks/bench_end_to_end.py --device cuda "${workload[@]}" \
    --num-passes 300 --skip-ep8 --dispatch static --non-blocking --out "$out"
step executor_pause_per_pass 150 python benchmarks/bench_executor.py --pause-only --pause-step-layers 58 \
    --steps 60 --pause-variants bf16:8,bf16:8:free,fp8:8,bf16:none --total-timeout-s 140 --out "$out"
