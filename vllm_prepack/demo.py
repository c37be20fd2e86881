"""``vllm-prepack demo``: plain vLLM vs vLLM with the plugin, on an embedded model and batch.

No arguments, no downloads: builds (and caches) a small random-weight Llama, submits a built-in
backlog of mixed-length prompts to both engines, and prints the comparison and whether greedy
outputs are identical.
"""

from __future__ import annotations

from vllm_prepack.models import DEMO_MODEL


def main(args) -> int:
    from vllm_prepack.engine import in_process

    in_process()
    from vllm import SamplingParams

    from vllm_prepack.bench.report import header, table
    from vllm_prepack.bench.scheduler import ENGINE_COLUMNS, compare_engines, comparison_rows
    from vllm_prepack.engine import build_llm, run_stepwise
    from vllm_prepack.models import decoder_model
    from vllm_prepack.packing import lower_bound_steps
    from vllm_prepack.workloads import prompt_lengths, token_ids

    model = decoder_model(DEMO_MODEL)
    kw = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=args.budget,
              enable_chunked_prefill=True, enable_prefix_caching=False, seed=0)
    engines = [build_llm(model, False, **kw), build_llm(model, True, **kw)]
    lengths = prompt_lengths("bimodal", args.prompts, seed=0, max_len=1500)
    prompts = token_ids(lengths, vocab_size=DEMO_MODEL.vocab_size, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    plain, packed = compare_engines(engines, prompts, params, repeats=1, budget=args.budget)
    outputs = [[r.token_ids for r in run_stepwise(llm, prompts, params).results] for llm in engines]
    identical = outputs[0] == outputs[1]
    print(header("demo: plain vLLM vs vllm-prepack"))
    print(f"model: random-weight Llama {model.name} (fp32, CPU); {len(prompts)} prompts "
          f"(synthetic bimodal lengths, {sum(lengths)} prompt tokens), max_tokens={args.max_tokens}, "
          f"budget {args.budget}, chunked prefill on, all submitted at once\n")
    print(table(comparison_rows("demo", plain, packed, lower_bound_steps(lengths, args.budget)),
                ENGINE_COLUMNS))
    print(f"greedy outputs identical to plain vLLM: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--budget", type=int, default=512)


def demo_job(engine_kwargs: dict) -> tuple[str, list[str], dict]:
    """The embedded batch job: the demo model and a bimodal workload as JSONL lines."""
    import json

    from vllm_prepack.models import decoder_model
    from vllm_prepack.workloads import prompt_lengths, token_ids

    lengths = prompt_lengths("bimodal", 256, seed=1, max_len=1500)
    lines = [json.dumps({"id": f"demo-{i}", "prompt_token_ids": p})
             for i, p in enumerate(token_ids(lengths, vocab_size=DEMO_MODEL.vocab_size, seed=1))]
    kwargs = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=512,
                  enable_prefix_caching=False)
    kwargs.update(engine_kwargs)
    return str(decoder_model(DEMO_MODEL)), lines, kwargs
