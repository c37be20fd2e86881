"""``vllm-prepack bench ray``: token-aware dispatch vs static row shards across vLLM replicas,
and the driver alone at corpus scale.

Engines: 2 replicas (Ray actors, one core each on CPU), one engine each with the plugin. The same
job runs under four policies: contiguous row shards (Ray Data / vLLM's data-parallel example),
round-robin rows, and token-aware dispatch to the free replica with the window in input order
("arrival": mixed-length units) or longest first ("longest": homogeneous units). Job files come
shuffled, or concatenated as merged datasets often are (short chats first, then long documents).
Reported: makespan, each replica's busy time, makespan against the ideal (sum of busy time /
replicas, from the same run).

Driver alone: an embedding-shaped JSONL corpus (text prompts) run through replicas that return at
once (no engine), so every second and byte measured is the driver's: start to first unit sent,
dispatch CPU per request (the driver's own work: read, weigh, window, units), driver CPU per
request (the whole process, Ray's calls and threads included), driver peak RSS. Each size runs
in a fresh process.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_prepack.argtypes import at_least_one, at_least_zero
from vllm_prepack.bench.report import header, table
from vllm_prepack.models import RAY_BENCH_MODEL as BENCH_MODEL
from vllm_prepack.workloads import WORKLOADS

POLICIES = ("rows", "round-robin", "tokens/arrival", "tokens/longest")


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


def policy_options(policy: str, n: int, replicas: int) -> dict:
    """run_job options: static baselines pin lines to replicas (the window holds the whole job)."""
    if policy == "rows":
        size = -(-n // replicas)
        return dict(owner=lambda line: (line - 1) // size, window=n + 1)
    if policy == "round-robin":
        return dict(owner=lambda line: line % replicas, window=n + 1)
    return dict(order=policy.split("/")[1])


ENGINE = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=512,
              enable_prefix_caching=False, enforce_eager=True)


def engine_job(args, model: str, lines: list[str], env: dict | None = None, **options):
    """`lines` through fresh replicas (one core each, the plugin on), stopped afterwards; the
    JobReport. `options` go to run_job."""
    from vllm_prepack.batch import run_job
    from vllm_prepack.batch_input import Source
    from vllm_prepack.batch_output import JsonlWriter
    from vllm_prepack.replica import start_replicas

    replicas = start_replicas(model, args.replicas, "generate", ENGINE, num_cpus=1,
                              default_max_tokens=args.max_tokens, env=env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return run_job(Source(lines), JsonlWriter(Path(tmp) / "out.jsonl"), replicas,
                           max_tokens=args.max_tokens, progress=False, **options)
    finally:
        replicas.stop()


def engine_rows(args, model: str, timelines: dict) -> list[dict]:
    rows = []
    for workload in args.workloads:
        for order in args.orders:
            lines = job(workload, args.prompts, order, args.max_tokens)
            results = {}
            for policy in POLICIES:
                report = engine_job(args, model, lines,
                                    **policy_options(policy, len(lines), args.replicas))
                busy = [r["busy_s"] for r in report.replicas]
                timelines[(workload, order, policy)] = [
                    [(a - report.started_at, b - report.started_at) for a, b in r["timeline"]]
                    for r in report.replicas]
                ideal = sum(busy) / len(busy)
                results[policy] = report.wall_s
                rows.append({
                    "workload": workload, "order": order, "policy": policy,
                    "makespan s": report.wall_s,
                    "busy s per replica": " / ".join(f"{b:.1f}" for b in busy),
                    "makespan / ideal": report.wall_s / ideal,
                })
            for row in rows[-len(POLICIES):]:
                row["speedup vs rows"] = results["rows"] / row["makespan s"]
    return rows


RAY_DATA_LLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
                    "VLLM_CPU_KVCACHE_SPACE": "1"}


def ray_data_llm_rows(args, model: str) -> list[dict]:
    """A skewed bimodal job (concatenated) through Ray Data LLM with its default row batching,
    with the plugin inside it, with the plugin behind token_batches, and through vllm-prepack
    batch. Each on a fresh Ray cluster; every engine gets the same settings and environment (one
    thread, not pinned: Ray Data LLM has no per-replica core binding). Ray Data LLM starts its
    engines inside the run, so each system also runs a 2-prompt job, and the difference is the
    job's own time."""
    import time

    import ray

    lines = job("bimodal", args.ray_data_llm, "concatenated", args.max_tokens)
    results = []
    for system in ("Ray Data LLM, row batches", "Ray Data LLM + plugin",
                   "Ray Data LLM + plugin + token_batches", "vllm-prepack batch",
                   "vllm-prepack batch, engine core in its own process"):
        walls = []
        for subset in (lines[:1] + lines[-1:], lines):
            ray.init(num_cpus=2 * args.replicas, include_dashboard=False, log_to_driver=False)
            t = time.perf_counter()
            if system.startswith("vllm-prepack batch"):
                done = _prepack_batch(args, model, subset, own_process="own" in system)
            else:
                done = _ray_data_llm(args, model, subset, plugin="plugin" in system,
                                     balance="token_batches" in system)
            walls.append(time.perf_counter() - t)
            ray.shutdown()
        results.append({"system": system, "rows": done, "wall s": walls[1],
                        "2-prompt wall s": walls[0], "job s (difference)": walls[1] - walls[0]})
    base = results[0]["job s (difference)"]
    for row in results:
        row["job speedup vs Ray Data LLM"] = base / row["job s (difference)"]
    return results


def _ray_data_llm(args, model: str, lines: list[str], plugin: bool, balance: bool) -> int:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from vllm_prepack.ray_data import plugin_engine_kwargs, token_batches

    params = dict(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    config = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=plugin_engine_kwargs(ENGINE) if plugin else dict(ENGINE),
        concurrency=args.replicas, log_engine_metrics=False,
        placement_group_config={"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": RAY_DATA_LLM_ENV},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    processor = build_processor(
        config, preprocess=lambda row: dict(key=row["key"], tokenized_prompt=row["ids"],
                                            sampling_params=params),
        postprocess=lambda row: dict(key=row["key"]))
    ds = ray.data.from_items([{"key": i, "ids": json.loads(line)["prompt_token_ids"]}
                              for i, line in enumerate(lines)])
    if balance:
        ds = token_batches(ds, config.batch_size,
                           tokens=lambda row: len(row["ids"]) + args.max_tokens)
    return processor(ds).count()


def _prepack_batch(args, model: str, lines: list[str], own_process: bool) -> int:
    """``own_process``: vLLM's engine core in a process of its own, as Ray Data LLM's AsyncLLM
    runs it (replicas here default to an in-process core on CPU)."""
    env = {**RAY_DATA_LLM_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if own_process else "0"}
    return engine_job(args, model, lines, env=env).written


class InstantReplica:
    """A stand-in replica that returns a minimal record per line at once: no engine, no parse."""

    def __init__(self, *args, **kwargs):
        self.busy, self.timeline = 0.0, []

    def describe(self) -> dict:
        return {"busy_s": 0.0, "timeline": []}

    def run(self, lines: list[int], raw: bytes, output: str):
        from vllm_prepack.batch_record import encode

        records = [{"line": line, "id": None, "error": None} for line in lines]
        return encode(records, output), {"requests": len(lines), "errors": 0, "tokens": 0}


def corpus(path: Path, n: int) -> None:
    """An embedding corpus: text prompts of mmlu-shaped token lengths (4 characters a token)."""
    from vllm_prepack.workloads import prompt_lengths

    words = "the of and to in is was for on that with by as at from".split()
    rng = random.Random(3)
    with path.open("w") as f:
        for start in range(0, n, 100_000):
            for i, tokens in enumerate(prompt_lengths("mmlu", min(100_000, n - start), seed=start)):
                text = " ".join(rng.choice(words) for _ in range(tokens))
                f.write(json.dumps({"id": start + i, "prompt": text}) + "\n")


def driver_alone(path: str, replicas: int, unit_tokens: int) -> dict:
    """Run in a fresh process (peak RSS is per process): the job over instant replicas."""
    import resource
    import time

    import ray

    from vllm_prepack.batch import run_job
    from vllm_prepack.batch_input import Source
    from vllm_prepack.batch_output import JsonlWriter
    from vllm_prepack.replica import start_replicas

    ray.init(num_cpus=replicas, include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    actors = start_replicas("none", replicas, "embed", {}, replica_cls=InstantReplica, num_cpus=1)
    start_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        cpu = time.process_time()
        report = run_job(Source(path), JsonlWriter(Path(tmp) / "out.jsonl"), actors, max_tokens=0,
                         unit_tokens=unit_tokens, progress=False)
        cpu = time.process_time() - cpu
    ray.shutdown()
    return {"replica start s": start_s, "first unit sent s": report.first_dispatch_s,
            "wall s": report.wall_s, "requests": report.written,
            "dispatch CPU us/request": 1e6 * report.dispatch_cpu_s / report.written,
            "driver CPU us/request": 1e6 * cpu / report.written,
            "wall us/request": 1e6 * report.wall_s / report.written,
            "driver peak RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ray_data_first_batch(path: str) -> dict:
    """The alternative data path, in a fresh process: Ray Data reading the same JSONL, seconds
    to its first batch of rows and to the whole file."""
    import time

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    batches = iter(ray.data.read_json(path).iter_batches(batch_size=256))
    next(batches)
    first = time.perf_counter() - t
    for _ in batches:
        pass
    result = {"Ray Data read_json: first batch s": first,
              "Ray Data read_json: all rows s": time.perf_counter() - t}
    ray.shutdown()
    return result


def _fresh_process(call: str) -> dict:
    code = f"import json; from vllm_prepack.bench.ray import *; print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def driver_rows(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.scale_lines:
            path = Path(tmp) / f"corpus-{n}.jsonl"
            corpus(path, n)
            row = _fresh_process(f"driver_alone({str(path)!r}, {args.replicas}, {args.unit_tokens})")
            row.update(_fresh_process(f"ray_data_first_batch({str(path)!r})"))
            rows.append({"input lines": n, "input MiB": path.stat().st_size / 2**20, **row})
            path.unlink()
    return rows


def main(args) -> str:
    import ray

    from vllm_prepack.models import decoder_model

    text = header("bench ray") + "\n"
    if args.scale_lines:
        rows = driver_rows(args)
        text += (f"**The driver alone: {args.replicas} stand-in replicas that return at once (no "
                 f"engine, no parsing), an embedding corpus of text lines, unit_tokens="
                 f"{args.unit_tokens}; each size in a fresh process**\n\n"
                 + table(rows, ["input lines", "input MiB", "replica start s", "first unit sent s",
                                "wall s", "dispatch CPU us/request", "driver CPU us/request",
                                "wall us/request",
                                "driver peak RSS MiB", "Ray Data read_json: first batch s",
                                "Ray Data read_json: all rows s"]) + "\n")
    model = str(decoder_model(BENCH_MODEL))
    if args.ray_data_llm:
        rows = ray_data_llm_rows(args, model)
        text += (f"**vs Ray Data LLM: {args.replicas} replicas, bimodal job concatenated (chats, "
                 f"then documents), {args.ray_data_llm} prompts, max_tokens={args.max_tokens}, "
                 f"random-weight Llama {BENCH_MODEL.name} fp32, Ray Data LLM's default batch of "
                 "32 rows, this project's default units; same engine settings and environment "
                 f"everywhere ({', '.join(f'{k}={v}' for k, v in RAY_DATA_LLM_ENV.items())})**\n\n"
                 + table(rows, ["system", "rows", "wall s", "2-prompt wall s", "job s (difference)",
                                "job speedup vs Ray Data LLM"]) + "\n")
    if args.prompts:
        ray.init(num_cpus=args.replicas, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False)
        timelines: dict = {}
        rows = engine_rows(args, model, timelines)
        ray.shutdown()
        text += (
            f"**{args.replicas} replicas on this machine (one core each), random-weight Llama "
            f"{BENCH_MODEL.name} fp32, {args.prompts} prompts per job (synthetic lengths), "
            f"max_tokens={args.max_tokens}, plugin on in every replica**\n\n"
            + table(rows, ["workload", "order", "policy", "makespan s", "busy s per replica",
                           "makespan / ideal", "speedup vs rows"]))
        if args.report is not None:
            from vllm_prepack.bench.plots import replica_timelines

            args.report.mkdir(parents=True, exist_ok=True)
            for workload in args.workloads:
                for order in args.orders:
                    per_policy = {p: timelines[(workload, order, p)] for p in POLICIES}
                    png = replica_timelines(args.report / f"ray_{workload}_{order}.png", per_policy,
                                            f"{workload}, {order}: busy time per replica")
                    text += f"\n![{workload} {order} timelines]({png.name})\n"
    if args.report is not None:
        (args.report / "summary_ray.md").write_text(text)
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--replicas", type=at_least_one, default=2,
                        help="vLLM engines per job")
    parser.add_argument("--workloads", nargs="+", default=["bimodal", "mmlu"], choices=WORKLOADS,
                        help="synthetic prompt-length mixes of the engine jobs")
    parser.add_argument("--orders", nargs="+", default=["shuffled", "concatenated"],
                        choices=["shuffled", "concatenated"],
                        help="the order of the job's lines (concatenated: a mix's modes one after "
                             "the other)")
    parser.add_argument("--prompts", type=at_least_zero, default=192,
                        help="per engine job; 0 skips engines")
    parser.add_argument("--max-tokens", type=at_least_one, default=16,
                        help="tokens generated per prompt")
    parser.add_argument("--scale-lines", type=at_least_one, nargs="*", default=[],
                        help="driver-alone corpus sizes, e.g. 10000 100000 1000000")
    parser.add_argument("--unit-tokens", type=at_least_one, default=8192,
                        help="tokens (prompt + expected output) per unit of work sent to a "
                             "replica")
    parser.add_argument("--ray-data-llm", type=at_least_zero, default=0, metavar="PROMPTS",
                        help="a skewed bimodal job of PROMPTS through Ray Data LLM (with and "
                             "without the plugin) and vllm-prepack batch; 0 skips it")
    parser.add_argument("--report", type=Path, help="also write PNG timelines and a summary here")
