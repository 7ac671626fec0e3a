#!/usr/bin/env bash
# The main job on a CPU: the same skewed, drifting workload served by 4 expert-parallel
# ranks (gloo) without EPLB and then with it, side by side. About 2 minutes on 2 cores.
# Prints balancedness per pass, MoE step time, the slowest rank's expert compute time,
# rebalances, slots moved, stall, and "weights verified: N/N slots" after all the moves;
# writes eplb_report/report.{txt,json,png}.
set -euo pipefail
python -m eplb_plugin.launch_server --compare \
    --ep-size 4 --ep-num-redundant-experts 4 \
    --eplb-rebalance-num-iterations 50 --num-passes 300 \
    --model-preset tiny --hidden-size 256 --moe-intermediate-size 512 --batch-tokens 256 \
    --report-dir "${REPORT_DIR:-eplb_report}" "$@"
