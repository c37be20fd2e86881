"""Offline generation with the plugin switched on, and its greedy outputs against plain vLLM's.

Run: python examples/offline_generate.py [MODEL_DIR]
Without MODEL_DIR it builds the project's small random-weight model folder (no download).
"""

import os
import sys

# vLLM's CPU backend otherwise sizes its KV cache by the machine's memory (~90% of it), which a
# second engine in the same process (plain vLLM, below) cannot get; CUDA builds ignore it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_prepack.config import plugin_engine_kwargs  # noqa: E402
from vllm_prepack.models import decoder_model  # noqa: E402

PROMPTS = ["Hello", "Summarise the following document: " + "lorem ipsum " * 300, "Hi!"]


def generate(model: str, options) -> list[str]:
    # plugin_engine_kwargs adds scheduler_cls and additional_config["prepack"], and checks the
    # options here, before the engine starts (False: plain vLLM, the arguments unchanged)
    llm = LLM(**plugin_engine_kwargs({"model": model}, options))
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    del llm
    return [out.outputs[0].text for out in outputs]


def main(model: str) -> None:
    packed = generate(model, {"aging_drain_factor": 1.0, "max_swaps": 4})
    plain = generate(model, False)
    for text in packed:
        print(repr(text))
    print("greedy outputs identical to plain vLLM:", "yes" if packed == plain else "NO")


if __name__ == "__main__":  # vLLM spawns its engine process
    main(sys.argv[1] if len(sys.argv) > 1 else str(decoder_model()))
