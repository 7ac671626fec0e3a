#!/usr/bin/env bash
# Qwen3-VL-235B-A22B-Instruct (128 experts, top-8) with the plugin, starting from a saved
# placement. Meant for: 8 x H200. Run status: NOT run.
set -euo pipefail
PLACEMENT=${PLACEMENT:-trivial}  # e.g. a file from `ExpertLocation.save` or a stat dump (.pt)
python -m sglang.launch_server \
  --model-path Qwen/Qwen3-VL-235B-A22B-Instruct \
  --tp 8 --ep-size 8 \
  --enable-eplb --eplb-algorithm eplb_plugin --ep-num-redundant-experts 8 \
  --init-expert-location "$PLACEMENT" \
  --expert-distribution-recorder-mode stat \
  --host 127.0.0.1 --port 30000
