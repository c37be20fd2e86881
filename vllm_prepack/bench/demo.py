"""``vllm-prepack demo``: plain vLLM vs vLLM with the plugin, on an embedded model and batch.

No arguments, no downloads: builds (and caches) a small random-weight Llama, submits a built-in
backlog of mixed-length prompts to both engines, runs each side several times in alternating
order, and prints the medians on one screen, with whether greedy outputs are identical. vLLM's
logs stay quiet unless ``-v``.
"""

from __future__ import annotations

import argparse
import os

from vllm_prepack.argtypes import at_least_one
from vllm_prepack.models import DEMO_MODEL


def main(args) -> int:
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")
    from vllm import SamplingParams

    from vllm_prepack.bench.engines import build_engines, engine_table
    from vllm_prepack.bench.report import header, summary, table
    from vllm_prepack.models import decoder_model
    from vllm_prepack.workloads import prompt_lengths, token_ids

    model = decoder_model(DEMO_MODEL)
    print(f"building plain vLLM and vLLM + prepack engines on a random-weight Llama "
          f"({DEMO_MODEL.hidden_size}h x {DEMO_MODEL.num_hidden_layers} layers) ...", flush=True)
    lengths = prompt_lengths("bimodal", args.prompts, seed=0, max_len=1500)
    prompts = token_ids(lengths, vocab_size=DEMO_MODEL.vocab_size, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    with build_engines(model, args.budget, ("fcfs", "prepack"), dtype="float32",
                       max_model_len=2048, enable_chunked_prefill=not args.whole_prompts,
                       enable_prefix_caching=False, seed=0) as engines:
        print(f"running each {args.repeats} times, alternating ...", flush=True)
        rows, outcomes = engine_table("demo", engines, prompts, params, args.repeats, args.budget,
                                      lengths)
    for row in rows:
        row["scheduler"] = {"fcfs": "plain vLLM", "prepack": "vllm-prepack"}[row["scheduler"]]
    print(header("demo: plain vLLM vs vllm-prepack"))
    print(f"{len(prompts)} prompts (synthetic bimodal lengths, {sum(lengths)} prompt tokens), all "
          f"submitted at once; max_tokens={args.max_tokens}, budget {args.budget}, chunked prefill "
          f"{'off' if args.whole_prompts else 'on'}; median wall of {args.repeats} runs per side\n")
    print(table(rows, ["scheduler", "steps", "wall s", "tok/s vs FCFS", "TTFT mean s", "TTFT p99 s",
                       "mean vs FCFS", "p99 vs FCFS", "outputs = FCFS"]))
    plain, packed = outcomes["fcfs"], outcomes["prepack"]
    identical = rows[1]["outputs = FCFS"] == "yes"
    print(f"\nmean time to first token: {summary(packed.ttft_s)['mean']:.2f} s vs "
          f"{summary(plain.ttft_s)['mean']:.2f} s; greedy outputs identical to plain vLLM: "
          f"{'yes' if identical else 'NO'}")
    return 0 if identical else 1


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=at_least_one, default=128,
                        help="prompts of the embedded workload")
    parser.add_argument("--max-tokens", type=at_least_one, default=16,
                        help="tokens generated per prompt")
    parser.add_argument("--budget", type=at_least_one, default=512,
                        help="token budget of a step (max_num_batched_tokens)")
    parser.add_argument("--repeats", type=at_least_one, default=3,
                        help="timed runs of each engine (the median is shown)")
    parser.add_argument("--whole-prompts", action="store_true", help="chunked prefill off")
    # SUPPRESS: not given here, the command's own -v (before "demo") stands
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="the plugin's decisions at debug level, and vLLM's logs (the "
                             "demo silences them otherwise)")


def use_demo_model(args) -> None:
    """``vllm-prepack serve`` without --model: the demo model, served as "demo" (engine
    arguments given with --engine-args win)."""
    from vllm_prepack.models import decoder_model

    args.model = str(decoder_model(DEMO_MODEL))
    args.model_id = args.model_id or "demo"
    args.engine_args = {**dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=512,
                               enforce_eager=True), **args.engine_args}


def use_demo_job(args) -> None:
    """``vllm-prepack batch`` without --input: the embedded job, the demo model and a bimodal
    workload as JSONL lines (engine arguments given with --engine-args win)."""
    import json

    from vllm_prepack.models import decoder_model
    from vllm_prepack.workloads import prompt_lengths, token_ids

    lengths = prompt_lengths("bimodal", 256, seed=1, max_len=1500)
    args.input = [json.dumps({"id": f"demo-{i}", "prompt_token_ids": p})
                  for i, p in enumerate(token_ids(lengths, vocab_size=DEMO_MODEL.vocab_size, seed=1))]
    kwargs = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=512,
                  enable_prefix_caching=False)
    kwargs.update(args.engine_args or {})
    args.model, args.engine_args = str(decoder_model(DEMO_MODEL)), kwargs
