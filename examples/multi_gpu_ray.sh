#!/usr/bin/env bash
# NOT RUN HERE: these machines have no GPU, and vLLM's CPU backend forces its own executor.
# The same engine arguments turn the plugin on under Ray; the vllm.general_plugins entry point
# loads it (and the model-runner hook) in every Ray worker, the scheduler runs in EngineCore.
set -euo pipefail
MODEL=${1:?usage: examples/multi_gpu_ray.sh MODEL}

# Tensor parallelism over 4 GPUs with vLLM's Ray executor:
vllm serve "$MODEL" --tensor-parallel-size 4 --distributed-executor-backend ray \
  --scheduler-cls vllm_prepack.PrepackScheduler --additional-config '{"prepack": {}}'

# Data parallelism, one engine per GPU pair, placed by Ray:
# vllm serve "$MODEL" --data-parallel-size 4 --tensor-parallel-size 2 --data-parallel-backend ray \
#   --scheduler-cls vllm_prepack.PrepackScheduler --additional-config '{"prepack": {}}'

# A token-balanced batch job over 8 single-GPU replicas (this project's driver); with
# --gpus-per-replica 2, 4 tensor-parallel replicas of 2 GPUs each:
# vllm-prepack batch --model "$MODEL" --input prompts.jsonl --output results.jsonl \
#   --replicas 8 --gpus-per-replica 1 --engine-args '{"max_model_len": 8192}'
