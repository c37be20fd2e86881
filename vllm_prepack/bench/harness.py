"""The engine-free harness: vLLM's real scheduler driven without a model.

Tests and benchmarks build a real ``Scheduler`` (plain, a baseline ordering, or the plugin),
feed it requests and what a model runner would return, and count forward steps and time to
first token in steps; ``rows_for`` turns outcomes into table rows against FCFS. Real engines
are in ``bench/engines.py``. Production code never imports this module.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

from vllm_prepack.bench.report import summary
from vllm_prepack.config import load_object
from vllm_prepack.cost import StepCost
from vllm_prepack.packing import pack_rows

# vLLM's FCFS, two baselines from the field (bench/baselines.py), and the plugin
SCHEDULERS = {
    "fcfs": None,
    "spf": "vllm_prepack.bench.baselines.SPFScheduler",
    "hrrn": "vllm_prepack.bench.baselines.HRRNScheduler",
    "ffd": "vllm_prepack.bench.baselines.FFDScheduler",
    "prepack": "vllm_prepack.scheduler.PrepackScheduler",
}
ONLINE = ("fcfs", "spf", "hrrn", "prepack")  # the schedulers engines run (ffd needs the cost)


SLOW_FIRST_STEPS = 2  # an engine's first steps, that NoisyStepCost's `warmup` slows


class NoisyStepCost:
    """A step cost whose every step is off by a seeded Gaussian share of itself (`noise`), as an
    engine's timings are, the first SLOW_FIRST_STEPS each taking (`warmup` - 1) x a full step's
    cost (`budget` tokens) more, whatever they hold: an engine's first kernels and allocations
    cost what they cost, not what the step carries (charged in proportion to it, a first step
    that happens to be part-full, as FCFS's often are, would read as a cheaper warm-up). Each
    scheduler of a row gets its own, with the same seed: the same noise, step by step."""

    def __init__(self, truth: StepCost, noise: float, seed: int = 0, warmup: float = 1.0,
                 budget: int = 0) -> None:
        if warmup < 1.0:
            raise ValueError(f"a warm-up slows the first steps: warmup must be >= 1, got {warmup}")
        if warmup != 1.0 and budget <= 0:
            raise ValueError("a warm-up is charged in full steps: give the step budget")
        self.truth, self.noise = truth, noise
        self._warmup_seconds = (warmup - 1.0) * truth.seconds(budget)
        self._rng = random.Random(f"step-noise:{seed}")
        self._steps = 0

    def seconds(self, tokens: int, seqs: int = 0) -> float:
        self._steps += 1
        noise = max(0.0, 1 + self._rng.gauss(0, self.noise))
        slow = self._warmup_seconds if self._steps <= SLOW_FIRST_STEPS else 0.0
        return (self.truth.seconds(tokens, seqs) + slow) * noise


def lower_bound_steps(lengths, budget: int) -> int:
    """No schedule finishes the prefills of `lengths` in fewer steps of `budget` tokens."""
    if budget <= 0:
        raise ValueError("budget must be positive")
    return -(-sum(lengths) // budget)


def ffd_steps(lengths, budget: int) -> int:
    """Steps offline first-fit decreasing needs for whole prompts of `lengths`: where prompts
    are a large part of the budget, no schedule reaches ceil(tokens / budget), and this is the
    practical bound to report beside it."""
    return len(pack_rows(lengths, budget))


def standalone_scheduler(
    model_dir: str,
    *,
    scheduler: str = "prepack",
    async_scheduling: bool = False,
    budget: int = 256,
    max_model_len: int = 256,
    chunked_prefill: bool = False,
    prefix_caching: bool = False,
    policy: str = "fcfs",
    max_num_seqs: int = 256,
    num_blocks: int = 10_000,
    block_size: int = 16,
    additional_config: dict | None = None,
    verify: bool | None = True,
    speculative_config: dict | None = None,
    **engine_args,
):
    """A real vLLM scheduler (one of SCHEDULERS) built without an engine or a model. `verify`:
    the plugin checks its mirror of vLLM's running budget every step (as with debug_layout);
    None leaves the plugin's own setting. `engine_args`: more of vLLM's engine arguments."""
    import torch

    from vllm_prepack.touchpoints import internal

    vllm_config = internal.EngineArgs(
        model=str(model_dir),
        skip_tokenizer_init=True,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=chunked_prefill,
        enable_prefix_caching=prefix_caching,
        scheduling_policy=policy,
        additional_config=additional_config or {},
        speculative_config=speculative_config,
        **engine_args,
    ).create_engine_config()
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = internal.FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=16,
                                      dtype=torch.float32)
    kv_cache_config = internal.KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[internal.KVCacheGroupSpec(["layer"], spec)],
    )
    if SCHEDULERS[scheduler] is None:
        cls = internal.AsyncScheduler if async_scheduling else internal.Scheduler
    else:
        cls = load_object(SCHEDULERS[scheduler])
    scheduler = cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=internal.StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=False,
    )
    if verify is not None and hasattr(scheduler, "verify_budget"):
        scheduler.verify_budget = verify
    return scheduler


def make_request(request_id: str, prompt_len: int, max_tokens: int = 1, priority: int = 0,
                 arrival_time: float | None = None):
    from vllm import SamplingParams

    from vllm_prepack.touchpoints import internal

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return internal.Request(
        request_id=request_id,
        prompt_token_ids=[(i % 97) + 3 for i in range(prompt_len)],
        sampling_params=params,
        pooling_params=None,
        arrival_time=arrival_time,
        priority=priority,
    )


def fake_step(scheduler, output, token: int = 5) -> list[str]:
    """Feed the scheduler what a model runner would return; returns the finished request ids."""
    from vllm_prepack.touchpoints import internal, runner_output_fields

    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        # schedule() has already advanced num_computed_tokens past this step's tokens
        sampled.append([token] if request.num_computed_tokens >= request.num_tokens else [])
    runner_output = internal.ModelRunnerOutput(
        req_ids=req_ids,
        sampled_token_ids=sampled,
        **runner_output_fields(req_ids),
    )
    engine_outputs = scheduler.update_from_output(output, runner_output)
    return [
        o.request_id
        for outs in engine_outputs.values()
        for o in outs.outputs
        if o.finish_reason is not None
    ]


@dataclass
class Outcome:
    steps: int
    ttft_steps: list[float]
    ttft_s: list[float]
    sched_s: list[float]
    wall: float = float("nan")  # seconds: an engine's wall time, or a simulated makespan
    tokens: int = 0
    fill: list[float] = field(default_factory=list)  # scheduled tokens / budget, per step
    cost: dict | None = None  # the plugin's step-cost model at the end (its report)


def simulate(model_dir, lengths, scheduler: str, budget: int, chunked: bool,
             arrivals: list[float] | None = None, options: dict | None = None,
             cost: StepCost | NoisyStepCost | None = None) -> Outcome:
    """Drive one of SCHEDULERS without a model. `options`: the plugin's options
    (additional_config["prepack"]).

    Without `cost`, time is steps: `arrivals[i]` is the step at which request i is submitted
    (default: all at step 1, a backlog) and TTFT counts steps from submission. With `cost`,
    each step takes cost.seconds(tokens, sequences) on a simulated clock, which the plugin's
    step-cost model learns from as it would from an engine's (and the ffd baseline is told);
    `arrivals` are then seconds, and the outcome carries TTFT in seconds and the makespan."""
    sched = standalone_scheduler(
        model_dir, scheduler=scheduler, budget=budget, max_model_len=budget,
        chunked_prefill=chunked, max_num_seqs=1024, num_blocks=1_000_000,
        additional_config={"prepack": options or {}},
    )
    clock = [0.0]
    if cost is not None and scheduler == "prepack":
        sched.prepack_clock = lambda: clock[0]
    if cost is not None and scheduler == "ffd":
        sched.step_cost = getattr(cost, "truth", cost)  # told the cost, not the noise
    arrivals = arrivals or [1 if cost is None else 0.0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: arrivals[i])
    submitted, first, first_s, sched_s, fill, step = 0, {}, {}, [], [], 0
    joined: dict[str, int] = {}  # request id -> the step it was submitted at
    while submitted < len(order) or sched.has_requests():
        step += 1
        if step > 20 * len(lengths) + (max(arrivals) if cost is None else 0):
            raise RuntimeError(f"simulation made no progress after {step} steps")
        now = step if cost is None else clock[0]
        if cost is not None and not sched.has_requests() and arrivals[order[submitted]] > now:
            clock[0] = now = arrivals[order[submitted]]  # idle until the next arrival
        while submitted < len(order) and arrivals[order[submitted]] <= now:
            i = order[submitted]
            sched.add_request(make_request(str(i), lengths[i]))
            joined[str(i)] = step
            submitted += 1
        t = time.perf_counter()
        out = sched.schedule()
        sched_s.append(time.perf_counter() - t)
        fill.append(out.total_num_scheduled_tokens / budget)
        if cost is not None:
            clock[0] += cost.seconds(out.total_num_scheduled_tokens, len(out.num_scheduled_tokens))
        for req_id in fake_step(sched, out):  # max_tokens=1: finishing is the first token
            first[req_id] = step - joined[req_id] + 1
            if cost is not None:
                first_s[req_id] = clock[0] - arrivals[int(req_id)]
    outcome = Outcome(step, list(first.values()), list(first_s.values()), sched_s, fill=fill)
    if cost is not None:
        outcome.wall = clock[0]
        model = getattr(sched, "step_cost_model", None)
        outcome.cost = model.report() if model is not None else None
    return outcome


def poisson_seconds(lengths: list[int], budget: int, load: float, cost: StepCost, seed: int) -> list[float]:
    """Arrival times (seconds) of a Poisson process offering `load` x what full steps of
    `budget` tokens process per second under `cost`."""
    rng = random.Random(f"arrivals:{seed}")
    tokens_per_s = budget / cost.seconds(budget, 0)
    rate = load * tokens_per_s / statistics.fmean(lengths)
    t, out = 0.0, []
    for _ in lengths:
        t += rng.expovariate(rate)
        out.append(t)
    return out


def poisson_arrivals(lengths: list[int], budget: int, load: float, seed: int) -> list[int]:
    """Submission steps of a Poisson process offering `load` x the budget in prompt tokens."""
    rng = random.Random(f"arrivals:{seed}")
    rate = load * budget / statistics.fmean(lengths)  # requests per step
    t, steps = 0.0, []
    for _ in lengths:
        t += rng.expovariate(rate)
        steps.append(int(t) + 1)
    return steps


def rows_for(label: str, outcomes: dict[str, Outcome], lengths: list[int] | None, budget: int,
             **extra) -> list[dict]:
    """One row per scheduler; ratios against FCFS (plain vLLM) measured in the same run."""
    base = outcomes["fcfs"]
    base_ttft = summary(base.ttft_s or base.ttft_steps)
    lb = lower_bound_steps(lengths, budget) if lengths else None
    ffd = ffd_steps(lengths, budget) if lengths and max(lengths) <= budget else None
    rows = []
    for name, o in outcomes.items():
        steps_ttft = summary(o.ttft_steps)
        ttft = summary(o.ttft_s or o.ttft_steps)
        row = {"workload": label, "scheduler": name, "steps": o.steps}
        if lb is not None:
            row.update({"LB": lb, "FFD": ffd if ffd is not None else "n/a",
                        "steps/bound": o.steps / max(lb, ffd or 0)})
        row.update({
            "TTFT mean (steps)": steps_ttft["mean"], "p50": steps_ttft["p50"], "p99": steps_ttft["p99"],
            "mean vs FCFS": ttft["mean"] / base_ttft["mean"],
            "p99 vs FCFS": ttft["p99"] / base_ttft["p99"],
            "sched ms/step": 1e3 * sum(o.sched_s) / max(1, len(o.sched_s)),
        })
        if o.ttft_s:
            row.update({"wall s": o.wall, "tok/s vs FCFS": (o.tokens / o.wall) / (base.tokens / base.wall),
                        "TTFT mean s": ttft["mean"], "TTFT p99 s": ttft["p99"]})
        row.update(extra.get(name, {}))
        rows.append(row)
    return rows


