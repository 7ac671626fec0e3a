#!/usr/bin/env bash
# Install sglang 0.5.23's EPLB modules beside the CPU torch (2.13.0): first the modules its
# import chain needs, under constraints.txt (which holds torch at the CPU build), then sglang
# itself with --no-deps, last. In that order pip's resolver never sees sglang's own pins
# (torch==2.14.1, flashinfer, sgl-kernel, ... which a CPU machine neither has nor needs), so it
# reports no dependency conflict; installed the other way round, every later install prints
# a 49-line "pip's dependency resolver does not currently take into account ..." ERROR (a
# re-run first removes the sglang an earlier run installed, for the same reason).
# `pip check` still lists sglang's unmet pins afterwards: that is the --no-deps install, and
# expected (only the EPLB modules are imported; see README, "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
# A sglang left by an earlier run would be checked (and its pins reported) by the next step.
if python -m pip show -q sglang >/dev/null 2>&1; then
  python -m pip uninstall -q -y sglang
fi
python -m pip install -q -c constraints.txt \
  aiohttp "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0" dill einops fastapi gguf IPython \
  msgspec numpy "openai==2.8.0" orjson packaging partial_json_parser pillow psutil pybase64 pydantic \
  "pyzmq>=25.1.2" requests "sentencepiece==0.2.1" tqdm "transformers==5.19.0" triton "uvicorn>=0.51" \
  setproctitle uvloop
python -m pip install -q -c constraints.txt --no-deps "sglang==0.5.23"
