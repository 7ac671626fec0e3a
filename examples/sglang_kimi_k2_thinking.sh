#!/usr/bin/env bash
# Kimi-K2-Thinking (384 experts, top-8) with the plugin. Meant for: 2 nodes x 8 x H200
# (run once per node, NODE_RANK=0/1, MASTER=host:port of node 0). Run status: NOT run.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${MASTER:?set MASTER=host:port of node 0}"
python -m sglang.launch_server \
  --model-path moonshotai/Kimi-K2-Thinking --trust-remote-code \
  --tp 16 --ep-size 16 --attn-dp-size 16 --nnodes 2 --node-rank "$NODE_RANK" --dist-init-addr "$MASTER" \
  --moe-a2a-backend deepep --deepep-mode auto \
  --enable-eplb --eplb-algorithm eplb_plugin --ep-num-redundant-experts 32 \
  --expert-distribution-recorder-mode stat \
  --eplb-transfer-budget-mb 2048 --eplb-drift-threshold 0.9 \
  --host 127.0.0.1 --port 30000
