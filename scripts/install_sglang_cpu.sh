#!/usr/bin/env bash
# Install sglang 0.5.23 (no deps) and the modules its EPLB code imports, keeping the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt --no-deps "sglang==0.5.23"
python -m pip install -q -c constraints.txt \
  aiohttp "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0" dill einops fastapi gguf IPython \
  msgspec numpy "openai==2.8.0" orjson packaging partial_json_parser pillow psutil pybase64 pydantic \
  "pyzmq>=25.1.2" requests "sentencepiece==0.2.1" tqdm "transformers==5.19.0" triton "uvicorn>=0.51" \
  setproctitle uvloop
