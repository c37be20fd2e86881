"""``vllm-prepack bench ray``: token-balanced shards vs row shards across vLLM replicas.

2 replicas (Ray actors, one core each on CPU), one engine each with the plugin. The same job runs
under three policies: token balancing with tail stealing (this project), contiguous row shards
(Ray Data / vLLM's data-parallel example) and round-robin rows. Job files come shuffled, or
concatenated as merged datasets often are (the short chats first, then the long documents).
Reported: makespan (job wall time), each replica's busy time, imbalance (max/mean busy) and the
makespan against the ideal (sum of busy time / replicas, from the same run).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vllm_prepack.bench.report import header, table
from vllm_prepack.models import DecoderShape

BENCH_MODEL = DecoderShape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=8, intermediate_size=1408, vocab_size=8192,
                           initializer_range=0.02)


def job(workload: str, n: int, order: str, max_tokens: int) -> list[str]:
    from vllm_prepack.workloads import prompt_lengths, token_ids

    lengths = prompt_lengths(workload, n, seed=5, max_len=1500)
    if order == "concatenated":
        lengths.sort()
    else:
        random.Random(5).shuffle(lengths)
    prompts = token_ids(lengths, vocab_size=BENCH_MODEL.vocab_size, seed=5)
    return [json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": max_tokens})
            for i, p in enumerate(prompts)]


def main(args) -> str:
    import tempfile
    from pathlib import Path

    import ray

    from vllm_prepack.batch import Writer, estimate_weights, parse_lines, run_job, start_replicas
    from vllm_prepack.models import decoder_model

    ray.init(num_cpus=args.replicas, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    model = str(decoder_model(BENCH_MODEL))
    engine = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=512,
                  enable_prefix_caching=False)
    rows, figures = [], ""
    for workload in args.workloads:
        for order in args.orders:
            timelines = {}
            lines = job(workload, args.prompts, order, args.max_tokens)
            items, _ = parse_lines(lines, args.max_tokens, "generate")
            estimate_weights(items)
            results = {}
            for policy in ("rows", "round-robin", "tokens"):
                replicas = start_replicas(model, args.replicas, "generate", engine, num_cpus=1)
                with tempfile.TemporaryDirectory() as tmp:
                    report = run_job(items, Writer(Path(tmp) / "out.jsonl"), replicas,
                                     policy=policy, progress=False)
                for actor in replicas:
                    ray.kill(actor)
                busy = [r["busy_s"] for r in report.replicas]
                timelines[policy] = [[(a - report.started_at, b - report.started_at)
                                      for a, b in r["timeline"]] for r in report.replicas]
                ideal = sum(busy) / len(busy)
                results[policy] = report.wall_s
                rows.append({
                    "workload": workload, "order": order, "policy": policy,
                    "makespan s": report.wall_s,
                    "busy s per replica": " / ".join(f"{b:.1f}" for b in busy),
                    "imbalance max/mean": max(busy) / ideal,
                    "makespan / ideal": report.wall_s / ideal,
                })
            for row in rows[-3:]:
                row["speedup vs rows"] = results["rows"] / row["makespan s"]
            if args.report is not None:
                from vllm_prepack.bench.plots import replica_timelines

                args.report.mkdir(parents=True, exist_ok=True)
                png = replica_timelines(args.report / f"ray_{workload}_{order}.png", timelines,
                                        f"{workload}, {order}: busy time per replica")
                figures += f"\n![{workload} {order} timelines]({png.name})\n"
    ray.shutdown()
    text = (
        header("bench ray") + "\n"
        f"**{args.replicas} replicas on this machine (one core each), random-weight Llama "
        f"{BENCH_MODEL.name} fp32, {args.prompts} prompts per job (synthetic lengths), "
        f"max_tokens={args.max_tokens}, plugin on in every replica**\n\n"
        + table(rows, ["workload", "order", "policy", "makespan s", "busy s per replica",
                       "imbalance max/mean", "makespan / ideal", "speedup vs rows"])
        + figures
    )
    if args.report is not None:
        (args.report / "summary_ray.md").write_text(text)
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=["bimodal", "mmlu"])
    parser.add_argument("--orders", nargs="+", default=["shuffled", "concatenated"],
                        choices=["shuffled", "concatenated"])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--report", type=Path, help="also write PNG timelines and a summary here")
