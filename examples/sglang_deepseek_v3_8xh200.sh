#!/usr/bin/env bash
# DeepSeek-V3 on one node of 8 x H200 (141 GB): EP8, DP attention, EPLB with the plugin's
# policy, stat recorder. Meant for: 8 x H200 with sglang 0.5.23 and eplb-plugin installed.
# Run status: NOT run (written and checked against sglang 0.5.23's flags only).
set -euo pipefail
export EPLB_PLUGIN_CONFIG='{"eplb_transfer_budget_mb": 2048, "eplb_rebalance_interval_s": 600}'
python -m sglang.launch_server \
  --model-path deepseek-ai/DeepSeek-V3 --trust-remote-code \
  --tp 8 --ep-size 8 --attn-dp-size 8 \
  --moe-a2a-backend deepep --deepep-mode auto \
  --enable-eplb --eplb-algorithm eplb_plugin \
  --ep-num-redundant-experts 32 \
  --eplb-rebalance-num-iterations 1000 --eplb-rebalance-layers-per-chunk 4 \
  --expert-distribution-recorder-mode stat \
  --enable-expert-distribution-metrics \
  --host 127.0.0.1 --port 30000
