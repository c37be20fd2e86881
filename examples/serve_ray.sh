#!/usr/bin/env bash
# An OpenAI server on Ray Serve: Ray Serve LLM with the plugin in every replica and the token
# router in front (vllm-prepack serve). Ctrl-C stops it. Health: GET /-/healthz.
set -euo pipefail

# On a CPU host: the embedded demo model, two replicas, one core each.
vllm-prepack serve --replicas 2 --port 8000
# python -c "from openai import OpenAI; print(OpenAI(base_url='http://127.0.0.1:8000/v1', \
#   api_key='none').completions.create(model='demo', prompt='Hello', max_tokens=8))"

# An embedding model (pooling runner): /v1/embeddings. On a CPU host float32 (vLLM's default
# cast to float16 is several times slower on CPUs).
# vllm-prepack serve --model ./all-MiniLM-L6-v2 --model-id minilm \
#   --engine-args '{"runner": "pooling", "dtype": "float32"}'

# Not run yet (written and tested on CPU machines; no multi-GPU machine with vLLM and Ray
# has run it): 8 replicas of one GPU each, then 4 tensor-parallel replicas of 2 GPUs each,
# on a Ray cluster started beforehand (ray start --head on the first node, ray start
# --address=HEAD:6379 on the others), listening on every interface.
# vllm-prepack serve --address auto --model meta-llama/Llama-3.1-8B-Instruct --model-id llama \
#   --replicas 8 --gpus-per-replica 1 --host 0.0.0.0 --engine-args '{"max_model_len": 8192}'
# vllm-prepack serve --address auto --model Qwen/Qwen2.5-32B-Instruct --model-id qwen32 \
#   --replicas 4 --gpus-per-replica 2 --host 0.0.0.0 --engine-args '{"max_model_len": 8192}'
# Many replicas behind several ingress replicas (HTTP front ends, a router each): a fixed
# number of them gives each router its own share of the replicas (8 routers, 8 replicas each).
# vllm-prepack serve --address auto --model meta-llama/Llama-3.1-8B-Instruct --model-id llama \
#   --replicas 64 --gpus-per-replica 1 --ingress-replicas 8 --host 0.0.0.0
# Ray's own routers instead of the token router, for comparison: --router requests | prefix;
# plain vLLM (no plugin): --plain --router requests.
