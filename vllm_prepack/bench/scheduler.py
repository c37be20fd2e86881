"""``vllm-prepack bench scheduler``: plain vLLM vs the plugin, side by side in one run.

Three parts, each a ratio against plain vLLM measured in the same process:
1. synthetic backlogs on vLLM's real scheduler, driven without a model (forward steps, the lower
   bound ceil(prompt tokens / budget), time to first token in steps, scheduler time per step),
   and the same under Poisson arrivals at several offered loads;
2. scheduler time per step with 1k, 10k and 100k waiting requests;
3. real engines on CPU: an all-MiniLM-L6-v2 embedding job (chunked prefill off) and generation
   on a random-weight ~100M-parameter Llama (chunked prefill on), short and long outputs.
Steps are reported as steps and seconds as seconds; none is converted into the other.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_prepack.bench.report import header, summary, table
from vllm_prepack.packing import lower_bound_steps
from vllm_prepack.workloads import WORKLOADS, prompt_lengths, token_ids


@dataclass
class Outcome:
    steps: int
    ttft_steps: list[float]
    ttft_s: list[float]
    sched_s: list[float]
    wall: float = float("nan")
    tokens: int = 0
    fill: list[float] = field(default_factory=list)  # scheduled tokens / budget, per step


def comparison_rows(label: str, plain: Outcome, packed: Outcome, lb: int, **extra) -> list[dict]:
    rows = []
    for name, o in (("plain vLLM", plain), ("prepack", packed)):
        ttft = summary(o.ttft_steps)
        row = {
            "workload": label,
            "scheduler": name,
            "steps": o.steps,
            "LB": lb,
            "steps/LB": o.steps / lb,
            "TTFT mean (steps)": ttft["mean"],
            "p50": ttft["p50"],
            "p99": ttft["p99"],
            "sched ms/step": 1e3 * sum(o.sched_s) / max(1, len(o.sched_s)),
        }
        if o.ttft_s:
            secs = summary(o.ttft_s)
            row.update({
                "wall s": o.wall,
                "tok/s": o.tokens / o.wall,
                "TTFT mean s": secs["mean"],
                "TTFT p50 s": secs["p50"],
                "TTFT p99 s": secs["p99"],
            })
        row.update(extra)
        rows.append(row)
    ratio = {
        "workload": label,
        "scheduler": "ratio prepack/plain",
        "steps": packed.steps / plain.steps,
        "TTFT mean (steps)": summary(packed.ttft_steps)["mean"] / summary(plain.ttft_steps)["mean"],
        "p50": summary(packed.ttft_steps)["p50"] / summary(plain.ttft_steps)["p50"],
        "p99": summary(packed.ttft_steps)["p99"] / summary(plain.ttft_steps)["p99"],
    }
    if packed.ttft_s:
        ratio.update({
            "wall s": packed.wall / plain.wall,
            "tok/s": (packed.tokens / packed.wall) / (plain.tokens / plain.wall),
            "TTFT mean s": summary(packed.ttft_s)["mean"] / summary(plain.ttft_s)["mean"],
            "TTFT p50 s": summary(packed.ttft_s)["p50"] / summary(plain.ttft_s)["p50"],
            "TTFT p99 s": summary(packed.ttft_s)["p99"] / summary(plain.ttft_s)["p99"],
        })
    return rows + [ratio]


# ---- 1. synthetic backlogs, engine-free ----------------------------------------------------


def simulate(model_dir, lengths, prepack: bool, budget: int, chunked: bool,
             arrivals: list[int] | None = None, options: dict | None = None) -> Outcome:
    """Drive vLLM's scheduler without a model. `arrivals[i]`: the step at which request i is
    submitted (default: all at step 1, a backlog). TTFT counts steps from submission.
    `options`: the plugin's options (additional_config["prepack"])."""
    from vllm_prepack.scheduler import fake_step, make_request, standalone_scheduler

    scheduler = standalone_scheduler(
        model_dir, prepack=prepack, budget=budget, max_model_len=budget,
        chunked_prefill=chunked, max_num_seqs=1024, num_blocks=1_000_000,
        additional_config={"prepack": options or {}},
    )
    arrivals = arrivals or [1] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: arrivals[i])
    submitted, first, sched_s, step = 0, {}, [], 0
    while submitted < len(order) or scheduler.has_requests():
        step += 1
        if step > 20 * len(lengths) + max(arrivals):
            raise RuntimeError(f"simulation made no progress after {step} steps")
        while submitted < len(order) and arrivals[order[submitted]] <= step:
            i = order[submitted]
            scheduler.add_request(make_request(str(i), lengths[i]))
            submitted += 1
        t = time.perf_counter()
        out = scheduler.schedule()
        sched_s.append(time.perf_counter() - t)
        for req_id in fake_step(scheduler, out):  # max_tokens=1: finishing is the first token
            first[req_id] = step - arrivals[int(req_id)] + 1
    return Outcome(step, list(first.values()), [], sched_s)


def synthetic(model_dir, n: int, budget: int, seed: int, options: dict | None = None) -> str:
    out = []
    for chunked in (False, True):
        rows = []
        for name in WORKLOADS:
            # a prompt needs room for its output token inside max_model_len (= the budget)
            lengths = prompt_lengths(name, n, seed=seed, max_len=budget - 1)
            lb = lower_bound_steps(lengths, budget)
            plain = simulate(model_dir, lengths, False, budget, chunked)
            packed = simulate(model_dir, lengths, True, budget, chunked, options=options)
            rows += comparison_rows(name, plain, packed, lb)
        mode = "on" if chunked else "off"
        out.append(
            f"**Synthetic backlogs, chunked prefill {mode}** ({n} prompts per workload, all "
            f"waiting at step 0, budget {budget} tokens = max_model_len, max_tokens=1, prompts "
            f"capped at {budget - 1}; vLLM's real scheduler driven without a model"
            f"{_with(options)})\n\n"
            + table(rows, ["workload", "scheduler", "steps", "LB", "steps/LB",
                           "TTFT mean (steps)", "p50", "p99", "sched ms/step"])
        )
    return "\n".join(out)


def _with(options: dict | None) -> str:
    return f"; plugin options {json.dumps(options)}" if options else ""


def poisson_arrivals(lengths: list[int], budget: int, load: float, seed: int) -> list[int]:
    """Submission steps of a Poisson process offering `load` x the budget in prompt tokens."""
    rng = random.Random(f"arrivals:{seed}")
    rate = load * budget / statistics.fmean(lengths)  # requests per step
    t, steps = 0.0, []
    for _ in lengths:
        t += rng.expovariate(rate)
        steps.append(int(t) + 1)
    return steps


def arrivals(model_dir, n: int, budget: int, seed: int, loads: list[float],
             options: dict | None = None) -> str:
    rows = []
    for chunked in (False, True):
        for name in ("mmlu", "bimodal"):
            lengths = prompt_lengths(name, n, seed=seed, max_len=budget - 1)
            for load in loads:
                submit = poisson_arrivals(lengths, budget, load, seed)
                plain = simulate(model_dir, lengths, False, budget, chunked, submit)
                packed = simulate(model_dir, lengths, True, budget, chunked, submit, options)
                label = f"{name}, load {load:g}, chunked {'on' if chunked else 'off'}"
                rows += comparison_rows(label, plain, packed, lower_bound_steps(lengths, budget))
    return (
        f"**Arrivals instead of a backlog** ({n} prompts per row arriving as a seeded Poisson "
        f"process that offers `load` x the budget in prompt tokens per step; budget {budget}, "
        f"max_tokens=1; TTFT counted in steps from each request's arrival; vLLM's real scheduler "
        f"driven without a model{_with(options)}). Below load 1 the queue is mostly short and there is little "
        f"to reorder; near and above it a backlog builds and the policy matters.\n\n"
        + table(rows, ["workload", "scheduler", "steps", "TTFT mean (steps)", "p50", "p99",
                       "sched ms/step"])
    )


# ---- 2. scheduler time per step at scale ---------------------------------------------------


def scale(model_dir, sizes: list[int], budget: int, steps: int = 30) -> str:
    from vllm_prepack.scheduler import fake_step, make_request, standalone_scheduler

    rows = []
    for waiting in sizes:
        lengths = prompt_lengths("mmlu", waiting, seed=0, max_len=budget - 1)
        per = {}
        for prepack in (False, True):
            scheduler = standalone_scheduler(
                model_dir, prepack=prepack, budget=budget, max_model_len=budget,
                chunked_prefill=True, max_num_seqs=1024, num_blocks=1_000_000,
            )
            for i, n in enumerate(lengths):
                scheduler.add_request(make_request(str(i), n))
            times, admitted = [], 0
            for _ in range(steps):
                t = time.perf_counter()
                out = scheduler.schedule()
                times.append(time.perf_counter() - t)
                admitted += len(out.scheduled_new_reqs)
                fake_step(scheduler, out)
            stats = getattr(scheduler, "prepack_stats", None)
            per[prepack] = (1e3 * summary(times)["p50"], admitted / steps,
                            1e3 * stats.plan_seconds / stats.steps if stats else 0.0)
            del scheduler
            gc.collect()
        (plain_ms, plain_adm, _), (pack_ms, pack_adm, plan_ms) = per[False], per[True]
        rows.append({
            "waiting requests": waiting,
            "plain vLLM ms/step (p50)": plain_ms,
            "prepack ms/step (p50)": pack_ms,
            "added ms/step": pack_ms - plain_ms,
            "of which planning": plan_ms,
            "admitted/step plain": plain_adm,
            "admitted/step prepack": pack_adm,
            "µs per admitted, plain": 1e3 * plain_ms / plain_adm,
            "µs per admitted, prepack": 1e3 * pack_ms / pack_adm,
        })
    return (
        f"**Scheduler time per step** (p50 of {steps} steps of `Scheduler.schedule()`, budget "
        f"{budget}, chunked prefill on, mmlu-shaped backlog). Shortest-first admits more (shorter) "
        f"requests per step, and vLLM's own work per admitted request is most of the added time; "
        f"'of which planning' is the plugin's policy alone (mean).\n\n" + table(rows)
    )


# ---- 3. real engines -------------------------------------------------------------------------


def _engine_outcome(run, prompts, budget: int) -> Outcome:
    results = run.results
    tokens = sum(len(p) for p in prompts) + sum(len(r.token_ids or ()) for r in results)
    return Outcome(
        steps=run.steps,
        ttft_steps=[r.first_step for r in results],
        ttft_s=[r.first_time for r in results],
        sched_s=run.schedule_seconds,
        wall=run.wall,
        tokens=tokens,
        fill=[t / budget for t in run.step_tokens],
    )


def compare_engines(engines, prompts, params, repeats: int, budget: int) -> tuple[Outcome, Outcome]:
    """Plain and prepack runs, alternating which goes first (warm-up before); the faster wall of
    each is kept."""
    from vllm_prepack.engine import run_stepwise

    warm = prompts[: min(8, len(prompts))]
    for llm in engines:
        run_stepwise(llm, warm, params)
    best = [None, None]
    for repeat in range(repeats):
        for i in alternating(len(engines), repeat):
            outcome = _engine_outcome(run_stepwise(engines[i], prompts, params), prompts, budget)
            if best[i] is None or outcome.wall < best[i].wall:
                best[i] = outcome
    return best[0], best[1]


def alternating(n: int, repeat: int) -> list[int]:
    """Run order for one repeat: forwards, then backwards, so neither side always goes first."""
    return list(range(n)) if repeat % 2 == 0 else list(range(n))[::-1]


def _plots(report: Path | None, name: str, title: str, plain: Outcome, packed: Outcome) -> str:
    """TTFT distribution and budget fill per step, plain vs prepack; markdown image links."""
    if report is None:
        return ""
    from vllm_prepack.bench import plots

    report.mkdir(parents=True, exist_ok=True)
    series = {"plain vLLM": plain, "prepack": packed}
    ttft = plots.ttft_cdf(report / f"{name}_ttft.png", {k: o.ttft_s for k, o in series.items()},
                          f"{title}: time to first token")
    fill = plots.budget_fill(report / f"{name}_fill.png", {k: o.fill for k, o in series.items()},
                             f"{title}: budget fill per step")
    return f"\n![{title} TTFT]({ttft.name}) ![{title} fill]({fill.name})\n"


def embedding_job(n: int, budget: int, repeats: int, report: Path | None = None) -> str:
    from vllm import PoolingParams

    from vllm_prepack.engine import build_llm
    from vllm_prepack.models import minilm_model

    model = minilm_model()
    kw = dict(runner="pooling", max_model_len=256, max_num_batched_tokens=budget, seed=0)
    engines = [build_llm(model, False, **kw), build_llm(model, True, **kw)]
    lengths = prompt_lengths("mmlu", n, seed=11, max_len=256)
    prompts = token_ids(lengths, vocab_size=30000, seed=11, first_id=1000)
    plain, packed = compare_engines(engines, prompts, PoolingParams(task="embed"), repeats, budget)
    lb = lower_bound_steps(lengths, budget)
    return (
        f"**Embedding job, all-MiniLM-L6-v2 (real weights), chunked prefill off** ({n} prompts, "
        f"mmlu-shaped synthetic lengths capped at 256, budget {budget}; best wall of {repeats})\n\n"
        + table(comparison_rows("embed", plain, packed, lb), ENGINE_COLUMNS)
        + _plots(report, "embed", "embedding job", plain, packed)
    )


ENGINE_COLUMNS = ["workload", "scheduler", "steps", "LB", "steps/LB", "wall s", "tok/s",
                   "TTFT mean s", "TTFT p50 s", "TTFT p99 s", "TTFT mean (steps)", "p99",
                   "sched ms/step"]


def generation_job(n: int, budget: int, max_tokens: list[int], repeats: int,
                   report: Path | None = None) -> str:
    from vllm import SamplingParams

    from vllm_prepack.engine import build_llm
    from vllm_prepack.models import BENCH_100M, decoder_model

    model = decoder_model(BENCH_100M)
    kw = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=budget,
              enable_chunked_prefill=True, enable_prefix_caching=False, seed=0)
    engines = [build_llm(model, False, **kw), build_llm(model, True, **kw)]
    lengths = prompt_lengths("bimodal", n, seed=12, max_len=2000)
    prompts = token_ids(lengths, vocab_size=BENCH_100M.vocab_size, seed=12)
    rows, figures = [], ""
    for tokens in max_tokens:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        plain, packed = compare_engines(engines, prompts, params, repeats, budget)
        rows += comparison_rows(f"bimodal, {tokens} out", plain, packed, lower_bound_steps(lengths, budget))
        figures += _plots(report, f"generate_{tokens}", f"generation, {tokens} out", plain, packed)
    return (
        f"**Generation, random-weight Llama ~100M params (fp32), chunked prefill on** ({n} "
        f"prompts, bimodal synthetic lengths, budget {budget}; best wall of {repeats}; LB "
        f"counts prefill tokens only)\n\n" + table(rows, ENGINE_COLUMNS) + figures
    )


def hook_overhead(n: int, repeats: int) -> str:
    """The model-runner layout hook: step time with it recording vs off, side by side."""
    import timeit

    from vllm import SamplingParams

    from vllm_prepack._patches.runner_layout import layout_report, recorder
    from vllm_prepack.demo import DEMO_MODEL
    from vllm_prepack.engine import build_llm, run_stepwise
    from vllm_prepack.models import decoder_model

    model = decoder_model(DEMO_MODEL)
    kw = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=512,
              enable_chunked_prefill=True, enable_prefix_caching=False, seed=0)
    engines = {"hook off": build_llm(model, {}, **kw),
               "hook recording": build_llm(model, {"record_layout": True}, **kw)}
    prompts = token_ids(prompt_lengths("bimodal", n, seed=13, max_len=1500), DEMO_MODEL.vocab_size, 13)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for llm in engines.values():
        run_stepwise(llm, prompts[:8], params)
    best = {}
    names = list(engines)
    for repeat in range(repeats):
        for i in alternating(len(names), repeat):
            run = run_stepwise(engines[names[i]], prompts, params)
            best[names[i]] = min(best.get(names[i], float("inf")), run.wall / run.steps)

    class Runner:  # the off path: one instance-dict lookup per forward
        pass

    runner = Runner()
    runner._prepack_recorder = None
    off_ns = min(timeit.repeat(lambda: recorder(runner), number=100_000, repeat=5)) / 100_000 * 1e9
    [report] = engines["hook recording"].collective_rpc(layout_report)
    share = report["hook_seconds_mean"] / report["forward_seconds_mean"]
    rows = [{"configuration": name, "ms/step (end to end)": 1e3 * seconds,
             "vs hook off": seconds / best["hook off"]} for name, seconds in best.items()]
    return (
        f"**Model-runner hook cost** (random-weight Llama {DEMO_MODEL.hidden_size}h x "
        f"{DEMO_MODEL.num_hidden_layers} layers, fp32 CPU, {n} prompts, 32 tokens out, "
        f"best of {repeats}). Off: each forward pays one dictionary lookup, {off_ns:.0f} ns "
        f"measured. Recording, timed inside the hook: {1e3 * report['hook_seconds_mean']:.3f} ms "
        f"per forward = {100 * share:.2f}% of the forward's {1e3 * report['forward_seconds_mean']:.1f} ms. "
        f"The end-to-end A/B below alternates whole runs on a 2-core machine, whose run-to-run "
        f"noise is larger than the effect.\n\n" + table(rows)
    )


def main(args) -> str:
    from vllm_prepack.engine import in_process
    from vllm_prepack.models import TINY, decoder_model

    in_process()
    parts = [header("bench scheduler")]
    if "synthetic" in args.parts:
        parts.append(synthetic(decoder_model(TINY), args.prompts, args.budget, args.seed,
                               args.prepack_options))
    if "arrivals" in args.parts:
        parts.append(arrivals(decoder_model(TINY), args.prompts, args.budget, args.seed, args.loads,
                              args.prepack_options))
    if "scale" in args.parts:
        parts.append(scale(decoder_model(TINY), args.scale_sizes, args.budget))
    if "embed" in args.parts:
        parts.append(embedding_job(args.embed_prompts, 1024, args.repeats, args.report))
    if "generate" in args.parts:
        parts.append(generation_job(args.gen_prompts, 512, args.max_tokens, args.repeats,
                                    args.report))
    if "hook" in args.parts:
        parts.append(hook_overhead(args.gen_prompts, args.repeats))
    text = "\n".join(parts)
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "summary.md").write_text(text)
    return text


def add_arguments(parser) -> None:
    parts = ["synthetic", "arrivals", "scale", "embed", "generate", "hook"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--report", type=Path, help="also write PNG plots and summary.md here")
    parser.add_argument("--prompts", type=int, default=1000, help="synthetic prompts per workload")
    parser.add_argument("--budget", type=int, default=1024, help="synthetic/scale token budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepack-options", type=json.loads, default=None, metavar="JSON",
                        help="the plugin's options for the synthetic and arrivals parts, e.g. "
                             "'{\"aging_drain_factor\": null}' (default: the plugin's defaults)")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.8, 0.95, 1.05],
                        help="offered loads for the arrivals part (1 = the budget, in prompt tokens)")
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--embed-prompts", type=int, default=1000)
    parser.add_argument("--gen-prompts", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=2)
