#!/usr/bin/env bash
# minmax dispatch on one GPU (through the device tool; about 15 minutes):
#   bash benchmarks/run_minmax_gpu.sh "$OUT" .gpu_traces
# 1. the minmax kernels' tests and the dispatch tests on CUDA; 2. the kernels' cost inside a
# CUDA graph beside the static lookup, the count kernel and the single-program baseline
# (bench_minmax_dispatch.py); 3. the EP8 compute part (DeepSeek-V2-Lite sizes, ESFT replay)
# at 2048 and 8192 tokens per pass: naive, EPLB with static dispatch, EPLB with minmax, the
# per-pass policy with minmax, uniform routing (on the experts alone and on as many slots);
# 4. the EP8 compute part at 2048 tokens again with minmax's small passes as two launches (not fused);
# 5. the whole dispatch by the split's steps at EP8/16/32/48/72, on the dense table and on the list of
#    replicas (what --eplb-dispatch-minmax-steps costs; 20 layers per graph), and a rank's share of the
#    pass (every step) beside the whole pass (the split stops once no step lowers the peak).
set -uo pipefail
dest=${1:?usage: run_minmax_gpu.sh OUT_DIR [TRACES_DIR]}
traces=${2:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$dest"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$dest/$name.log" 2>&1
    echo "   exit $? ($(tail -n 1 "$dest/$name.log"))"
}
workload=(--workload synthetic)
[ -n "$traces" ] && workload=(--traces-dir "$traces")
step kernel_tests 120 python -m pytest -q -rs -p no:cacheprovider tests/test_minmax_kernel.py tests/test_dispatch.py tests/test_kernels.py tests/test_minmax_split.py
step minmax_cost 150 python benchmarks/bench_minmax_dispatch.py --skip-quality --out "$dest"
step ep8_2048 120 python benchmarks/bench_end_to_end.py --device cuda --ep8-only "${workload[@]}" --batch-tokens 2048 --out "$dest"
step ep8_8192 150 python benchmarks/bench_end_to_end.py --device cuda --ep8-only "${workload[@]}" --batch-tokens 8192 --out "$dest"
step ep8_2048_two_launches 120 python benchmarks/bench_end_to_end.py --device cuda --ep8-only "${workload[@]}" --batch-tokens 2048 --minmax-two-launches --out "$dest"
step split_steps_by_ep 360 python benchmarks/profile_minmax_kernels.py --split-sweep --stop --ep-sizes 8,16,32,48,72 --num-layers 20 --out "$dest"
