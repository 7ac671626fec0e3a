#!/usr/bin/env bash
# The README's main job: 4 gloo ranks on CPU, the same drifting synthetic workload without and
# with EPLB, side by side (about 1.5 minutes on 2 cores). Report: $REPORT_DIR (eplb_report).
set -euo pipefail
python -m eplb_plugin.launch_server --compare \
    --ep-size 4 --ep-num-redundant-experts 4 --enable-eplb \
    --eplb-rebalance-num-iterations 50 --eplb-drift-threshold 0.9 --ep-dispatch-algorithm dynamic \
    --num-passes 300 --model-preset tiny --hidden-size 256 --moe-intermediate-size 512 --batch-tokens 256 \
    --report-dir "${REPORT_DIR:-eplb_report}" "$@"
