"""Plain vLLM vs vLLM with the plugin, offline. Run: python examples/offline_generate.py MODEL_DIR"""

import sys

from vllm import LLM, SamplingParams


def main(model: str) -> None:
    llm = LLM(
        model=model,
        scheduler_cls="vllm_prepack.PrepackScheduler",
        additional_config={"prepack": {"aging_steps": 64, "max_swaps": 4}},
    )
    prompts = ["Hello", "Summarise the following document: " + "lorem ipsum " * 300, "Hi!"]
    for out in llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0)):
        print(repr(out.outputs[0].text))


if __name__ == "__main__":  # vLLM spawns its engine process
    main(sys.argv[1])
