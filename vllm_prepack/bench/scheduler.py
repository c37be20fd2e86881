"""``vllm-prepack bench scheduler``: FCFS vLLM, SGLang's orderings and the plugin, side by side.

Every part runs each scheduler on the same requests (the real engines each in a process of
its own, run in turn):
1. synthetic backlogs on vLLM's real scheduler, driven without a model (forward steps against
   the bounds ceil(prompt tokens / budget) and offline first-fit decreasing, time to first token
   in steps), and the same under Poisson arrivals at several offered loads;
2. scheduler time per step with 1k, 10k and 100k waiting requests (1M with fewer baselines
   beside it), and the pure policy's plan alone (``policy``: no vLLM, warm and with the caches
   evicted);
3. real engines on CPU: all-MiniLM-L6-v2 embedding jobs (chunked prefill off), generation on a
   random-weight ~100M-parameter Llama (chunked prefill on), and generation with prefix caching
   on over shared system prompts.
Schedulers: ``fcfs`` (plain vLLM), ``spf`` and ``hrrn`` (SGLang's shortest-prefill-first and
highest-response-ratio-next, bench/baselines.py) and ``prepack``. Steps are reported as steps and
seconds as seconds; none is converted into the other, but for the embedding job's wall floor,
a model's figure from the step cost calibrated on that engine, and labelled so.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from types import SimpleNamespace

from vllm_prepack.argtypes import at_least, at_least_one, non_negative, positive, prepack_options
from vllm_prepack.bench.engines import (
    ENGINE_COLUMNS,
    PROBE_SEQS,
    PROBE_SHARES,
    FlatSteps,
    alternating,
    build_engines,
    calibrate,
    engine_table,
)
from vllm_prepack.bench.harness import (
    ONLINE,
    SCHEDULERS,
    SLOW_FIRST_STEPS,
    NoisyStepCost,
    Outcome,
    fake_step,
    lower_bound_steps,
    make_request,
    poisson_arrivals,
    poisson_seconds,
    rows_for,
    simulate,
    standalone_scheduler,
)
from vllm_prepack.bench.report import cell, header, summary, table
from vllm_prepack.config import StarvationWarning
from vllm_prepack.cost import StepCost
from vllm_prepack.models import DecoderShape
from vllm_prepack.policy import FILL_SLACK, PACK_SHARE
from vllm_prepack.workloads import WORKLOADS, prompt_lengths, token_ids

STEP_COLUMNS = ["workload", "scheduler", "steps", "LB", "FFD", "steps/bound", "TTFT mean (steps)",
                "p50", "p99", "mean vs FCFS", "p99 vs FCFS"]


# ---- 1. synthetic backlogs and arrivals, engine-free -----------------------------------------


def synthetic(model_dir, n: int, budget: int, seed: int, options: dict | None = None) -> str:
    out = []
    for chunked in (False, True):
        rows = []
        for name in WORKLOADS:
            # a prompt needs room for its output token inside max_model_len (= the budget)
            lengths = prompt_lengths(name, n, seed=seed, max_len=budget - 1)
            outcomes = {s: simulate(model_dir, lengths, s, budget, chunked,
                                    options=options if s == "prepack" else None)
                        for s in SCHEDULERS}
            rows += rows_for(name, outcomes, lengths, budget)
        mode = "on" if chunked else "off"
        out.append(
            f"**Synthetic backlogs, chunked prefill {mode}** ({n} prompts per workload, all "
            f"waiting at step 0, budget {budget} tokens = max_model_len, max_tokens=1, prompts "
            f"capped at {budget - 1}; vLLM's real scheduler driven without a model{_with(options)}). "
            f"LB = ceil(prompt tokens / budget); FFD = the steps offline first-fit decreasing "
            f"needs for whole prompts; steps/bound divides by the larger.\n\n"
            + table(rows, STEP_COLUMNS + ["sched ms/step"])
        )
    return "\n".join(out)


def _with(options: dict | None) -> str:
    return f"; plugin options {json.dumps(options)}" if options else ""


def arrivals(model_dir, n: int, budget: int, seed: int, loads: list[float],
             options: dict | None = None) -> str:
    rows = []
    for chunked in (False, True):
        for name in ("mmlu", "bimodal", "trimodal"):
            lengths = prompt_lengths(name, n, seed=seed, max_len=budget - 1)
            for load in loads:
                submit = poisson_arrivals(lengths, budget, load, seed)
                outcomes = {s: simulate(model_dir, lengths, s, budget, chunked, submit,
                                        options if s == "prepack" else None)
                            for s in SCHEDULERS}
                label = f"{name}, load {load:g}, chunked {'on' if chunked else 'off'}"
                rows += rows_for(label, outcomes, None, budget)
    return (
        f"**Arrivals instead of a backlog** ({n} prompts per row arriving as a seeded Poisson "
        f"process that offers `load` x the budget in prompt tokens per step; budget {budget}, "
        f"max_tokens=1; TTFT counted in steps from each request's arrival; vLLM's real scheduler "
        f"driven without a model{_with(options)}).\n\n"
        + table(rows, ["workload", "scheduler", "steps", "TTFT mean (steps)", "p50", "p99",
                       "mean vs FCFS", "p99 vs FCFS"])
    )


# ---- 1b. in seconds: a step costs a + b x tokens ------------------------------------------------

TOKEN_SECONDS = 1e-5  # b in the engine-free rows (only a / b matters to every order)
COST_BACKLOGS = ("mmlu", "wikitext512", "heavytail", "bimodal", "trimodal")
COST_ARRIVALS = ("mmlu", "bimodal", "trimodal")
# the plugin's frontier: packing always at four bin slacks (the share of the makespan the bins
# may give up to leave gaps open: 0.0075-0.03 trade makespan for mean TTFT, 0.015 the default;
# 0, offline FFD's bins over the whole backlog, FFD's makespan), and never packing, with deadlines
# (the default's) and without (the latency end: shortest first alone, SPF's schedule; the
# deadlines' price is the gap)
FRONTIER = ({"pack_fixed_share": 0.0, "bin_fill_slack": 0.0},
            {"pack_fixed_share": 0.0, "bin_fill_slack": 0.0075},
            {"pack_fixed_share": 0.0, "bin_fill_slack": 0.015},
            {"pack_fixed_share": 0.0, "bin_fill_slack": 0.03},
            {"pack_fixed_share": 1.0},
            {"pack_fixed_share": 1.0, "aging_drain_factor": None})
MARK = 1.02  # the engine-free marks: mean TTFT against the best baseline, makespan against FFD
ROUNDING = 1e-9  # relative: the same steps' costs summed in another order differ in the last bits
COST_COLUMNS = ["workload", "a (tokens)", "scheduler", "steps", "TTFT mean s", "TTFT p99 s",
                "makespan s", "mean vs best", "p99 vs FCFS", "makespan vs FFD"]


def cost_rows(label: str, fixed_tokens: float, outcomes: dict[str, Outcome]) -> list[dict]:
    """Seconds against the baselines of the same run: mean TTFT against the best baseline's,
    p99 against FCFS's, the makespan against offline FFD's."""
    stats = {name: summary(o.ttft_s) for name, o in outcomes.items()}
    best = _best_mean(outcomes)
    return [{"workload": label, "a (tokens)": fixed_tokens, "scheduler": name, "steps": o.steps,
             "TTFT mean s": stats[name]["mean"], "TTFT p99 s": stats[name]["p99"],
             "makespan s": o.wall, "mean vs best": stats[name]["mean"] / best,
             "p99 vs FCFS": stats[name]["p99"] / stats["fcfs"]["p99"],
             "makespan vs FFD": o.wall / outcomes["ffd"].wall}
            for name, o in outcomes.items()]


def in_seconds(model_dir, n: int, budget: int, seed: int, fixed_tokens: list[float],
               loads: list[float], options: dict | None = None, noise: float = 0.0,
               warmup: float = 1.0) -> str:
    """Every scheduler on the same requests, each step charged a + b x tokens on a simulated
    clock (the plugin learns a and b from it); backlogs and Poisson arrivals, chunked prefill
    off and on; then the plugin's frontier over its options (FRONTIER), and the baselines whose
    point (mean TTFT, makespan) no point of it matches or beats on both. `noise`, `warmup`: each
    step's time off by that Gaussian share, the first steps (warmup - 1) x a full step's time
    slower (``NoisyStepCost``), as an engine's are."""
    out, frontier, cover = [], [], []

    def clock(truth: StepCost) -> StepCost | NoisyStepCost:
        """A run's clock: the truth, or a fresh noisy one (each run's noise from its start)."""
        return NoisyStepCost(truth, noise, seed, warmup, budget) if noise or warmup != 1 else truth

    for chunked in (False, True):
        rows = []
        for name in COST_BACKLOGS:
            lengths = prompt_lengths(name, n, seed=seed, max_len=budget - 1)
            for fixed in fixed_tokens:
                truth = StepCost(fixed * TOKEN_SECONDS, TOKEN_SECONDS)
                outcomes = {s: simulate(model_dir, lengths, s, budget, chunked, options=options
                                        if s == "prepack" else None, cost=clock(truth))
                            for s in SCHEDULERS}
                rows += cost_rows(f"{name}, backlog", fixed, outcomes)
                if not chunked and fixed:
                    points = {_point_label(point): simulate(
                        model_dir, lengths, "prepack", budget, False,
                        options={**(options or {}), **point}, cost=clock(truth))
                        for point in FRONTIER}
                    frontier += [{"workload": name, "a (tokens)": fixed, "options": label,
                                  **_point(o, outcomes)} for label, o in points.items()]
                    run = _point_label(options) if options else "default"
                    cover.append({"workload": name, "a (tokens)": fixed,
                                  **_coverage({run: outcomes["prepack"], **points}, outcomes)})
        for name in COST_ARRIVALS:
            lengths = prompt_lengths(name, n, seed=seed, max_len=budget - 1)
            for fixed in fixed_tokens:
                truth = StepCost(fixed * TOKEN_SECONDS, TOKEN_SECONDS)
                for load in loads:
                    submit = poisson_seconds(lengths, budget, load, truth, seed)
                    outcomes = {s: simulate(model_dir, lengths, s, budget, chunked, submit,
                                            options if s == "prepack" else None, clock(truth))
                                for s in SCHEDULERS}
                    rows += cost_rows(f"{name}, load {load:g}", fixed, outcomes)
        mode = "on" if chunked else "off"
        out.append(f"**In seconds, chunked prefill {mode}** ({n} prompts per row; budget {budget}; "
                   f"a step of T tokens over n requests takes a + b x T, b = {TOKEN_SECONDS * 1e6:g} "
                   f"us, a given in tokens of work (a / b){_noise(noise, warmup)}; backlogs all "
                   f"waiting at 0, or Poisson "
                   f"arrivals offering `load` x what full steps process; vLLM's real scheduler "
                   f"driven without a model{_with(options)}). ffd: offline first-fit decreasing over "
                   f"the waiting prompts every step, bins in Smith's order, told a and b.\n\n"
                   + table(rows, COST_COLUMNS))
    out.append("**The plugin's frontier over its options** (backlogs, chunked prefill off, the "
               f"same requests and clock as above; `pack_fixed_share` 0 always packs, 1 never, "
               f"{PACK_SHARE:g} is the default; `bin_fill_slack` {FILL_SLACK:g} is the "
               f"default).\n\n" + table(frontier))
    out.append("**Each baseline's point against the plugin's** (the default and the frontier "
               "above): 'no plugin point as good' names the baselines no point of the plugin's "
               "matches or beats on both mean TTFT and makespan, each with how much worse the "
               "nearest point is on its worse axis; 'both marks' the points with mean TTFT "
               f"<= {MARK:g}x the best baseline's and makespan <= {MARK:g}x FFD's.\n\n"
               + table(cover))
    return "\n".join(out)


def _noise(noise: float, warmup: float) -> str:
    text = (f", each step's time then off by a Gaussian {100 * noise:g}% of itself (seeded, the "
            f"same for every scheduler)" if noise else "")
    if warmup != 1:
        text += (f", the first {SLOW_FIRST_STEPS} steps of each run {warmup - 1:g} full steps' "
                 f"time slower, whatever they hold (a warm-up)")
    return text


def _point_label(options: dict) -> str:
    """`key value, ...`: numbers as printed in the tables, anything else (a name, null) as JSON."""
    def shown(value) -> str:
        plain = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"{value:g}" if plain else json.dumps(value)
    return ", ".join(f"{key} {shown(value)}" for key, value in options.items())


def _mean(o: Outcome) -> float:
    return summary(o.ttft_s)["mean"]


def _best_mean(outcomes: dict[str, Outcome]) -> float:
    """The best baseline's mean TTFT (the plugin's run left out)."""
    return min(_mean(o) for name, o in outcomes.items() if name != "prepack")


def _coverage(points: dict[str, Outcome], outcomes: dict[str, Outcome]) -> dict:
    """The baselines whose (mean TTFT, makespan) no plugin point matches or beats on both, each
    with how far the nearest point is (on its worse axis), and the plugin's points that meet
    both marks."""
    means = {label: _mean(p) for label, p in points.items()}

    def behind(label: str, b: Outcome) -> float:
        """How much worse point `label` is than `b` on its worse axis (<= 0: as good on both)."""
        return max(means[label] / _mean(b), points[label].wall / b.wall) - 1

    nearest = {name: min(behind(label, b) for label in points)
               for name, b in outcomes.items() if name != "prepack"}
    above = [f"{name} (+{100 * gap:.3g}%)" for name, gap in nearest.items() if gap > ROUNDING]
    best, ffd = _best_mean(outcomes), outcomes["ffd"].wall
    marks = [label for label, p in points.items()
             if means[label] <= MARK * best and p.wall <= MARK * ffd]
    return {"no plugin point as good": ", ".join(above) or "none",
            "both marks": "; ".join(marks) or "none"}


def _point(o: Outcome, outcomes: dict[str, Outcome]) -> dict:
    mean = _mean(o)
    return {"steps": o.steps, "TTFT mean s": mean, "mean vs best": mean / _best_mean(outcomes),
            "makespan vs FFD": o.wall / outcomes["ffd"].wall}


# ---- 2. scheduler time per step at scale ---------------------------------------------------


# The plugin's step cost in the scale rows, fixed (no learning from this bench's step times, which
# have no forward in them): a CPU-like step (orders like SPF) and a GPU-like one (packs: the
# filler reserve and the exchange run, the heavier plan)
SCALE_COSTS = {"a = 0": 0.0, "a = 1024 tokens": 1024.0}
SCALE_SEATS = 1024  # requests a step may start (max_num_seqs)


def _scale_options(options: dict | None, fixed: float) -> dict:
    """The plugin's options in the scale rows: the step cost fixed at `fixed` tokens of work."""
    return {**(options or {}), "learn_step_cost": False, "step_cost_fixed_tokens": fixed}


def _time_side_by_side(model_dir, runs: dict[str, tuple], lengths, budget: int, chunked: bool,
                       steps: int) -> dict[str, dict]:
    """`steps` schedule() calls of each run (label -> (scheduler, additional_config, requests
    added shortest first)), each a fresh scheduler over the same backlog of `lengths`, a step
    of each in turn, the first rotating: a drift of the machine falls on every run alike, and
    each schedule() finds the cache as the others left it (an engine's step leaves it colder).
    Shortest first, FCFS admits what SPF and the plugin admit at the cost of vLLM's own queue:
    the baseline of the plugin's added cost. Every run's requests are made in arrival order
    and only queued shortest first: made in the order admitted, they would lie in memory in
    that order, and vLLM's own work on them would run faster than on anything a reordering
    queue admits."""
    schedulers = {}
    for label, (name, additional_config, shortest_first) in runs.items():
        scheduler = standalone_scheduler(
            model_dir, scheduler=name, budget=budget, max_model_len=budget,
            chunked_prefill=chunked, max_num_seqs=SCALE_SEATS, num_blocks=1_000_000, verify=False,
            additional_config=additional_config,
        )
        requests = [make_request(str(i), length) for i, length in enumerate(lengths)]
        if shortest_first:
            requests.sort(key=lambda request: request.num_tokens)
        for request in requests:
            scheduler.add_request(request)
        stats = getattr(scheduler, "prepack_stats", None)
        if stats is not None:
            stats.keep_history = True
        schedulers[label] = scheduler
    times = {label: [] for label in runs}
    admitted = dict.fromkeys(runs, 0)
    labels = list(runs)
    for step in range(steps):
        shift = step % len(labels)
        for label in labels[shift:] + labels[:shift]:
            scheduler = schedulers[label]
            t = time.perf_counter()
            out = scheduler.schedule()
            times[label].append(time.perf_counter() - t)
            admitted[label] += len(out.scheduled_new_reqs)
            fake_step(scheduler, out)
    results = {}
    for label, scheduler in schedulers.items():
        ms = 1e3 * summary(times[label])["p50"]
        result = results[label] = {"ms": ms, "admitted": admitted[label] / steps,
                                   "us per admitted": 1e3 * ms * steps / admitted[label]}
        stats = getattr(scheduler, "prepack_stats", None)
        if stats is not None:
            plan = [r.plan_seconds for r in stats.history]
            result.update(plan_p50=1e3 * summary(plan)["p50"], plan_max=1e3 * max(plan))
    del schedulers, scheduler
    gc.collect()
    return results


# the scale part's baselines: vLLM's FCFS, SGLang's SPF, and FCFS on a shortest-first queue
SCALE_BASELINES = {"fcfs": "FCFS", "spf": "SPF", "presorted": "FCFS on a shortest-first backlog"}
_BASELINE_NOTES = {
    "fcfs": "Shortest-first admits more (shorter) requests per step than FCFS, and vLLM's own "
            "work per admitted request is most of the added time.",
    "spf": "SPF is SGLang's ordering as a baseline: the waiting queue sorted every step, as "
           "SGLang's scheduler does, admitting what the plugin admits.",
    "presorted": "FCFS on a shortest-first backlog (requests made in arrival order, as for every "
                 "scheduler here, and queued shortest first) admits what the plugin admits at "
                 "the cost of vLLM's own queue: the plugin's added cost per admitted request is "
                 "its step time (p50) less that one's, over the requests it admitted.",
}


def _baseline_columns(row: dict, got: dict[str, dict], key: str, column: str) -> None:
    """`row`'s columns of FCFS's and SPF's `key`, where they ran."""
    for name in ("fcfs", "spf"):
        if name in got:
            row[column.format(SCALE_BASELINES[name])] = got[name][key]


ADDED_US = "prepack's added µs per admitted"
# the columns whose spread over the repeated timings of a row is shown beside their median
SPREAD_COLUMNS = ("planning ms (p50)", "planning ms (max)", ADDED_US)


def _scale_rows(got: dict[str, dict], chunked: bool, waiting: int) -> list[dict]:
    """One row per plugin step cost from one side-by-side timing."""
    presorted_label = SCALE_BASELINES["presorted"]
    rows = []
    for cost in SCALE_COSTS:
        pack = got[cost]
        row = {"chunked prefill": "on" if chunked else "off",
               "waiting requests": waiting, "plugin's step cost": cost}
        _baseline_columns(row, got, "ms", "{} ms/step (p50)")
        row["prepack ms/step (p50)"] = pack["ms"]
        row["planning ms (p50)"] = pack["plan_p50"]
        row["planning ms (max)"] = pack["plan_max"]
        _baseline_columns(row, got, "admitted", "admitted/step {}")
        row["admitted/step prepack"] = pack["admitted"]
        _baseline_columns(row, got, "us per admitted", "µs per admitted, {}")
        row["µs per admitted, prepack"] = pack["us per admitted"]
        if "presorted" in got:
            presorted = got["presorted"]
            row[f"{presorted_label}, ms/step (p50)"] = presorted["ms"]
            row[f"admitted/step, {presorted_label}"] = presorted["admitted"]
            row[ADDED_US] = 1e3 * (pack["ms"] - presorted["ms"]) / pack["admitted"]
        rows.append(row)
    return rows


def _median_row(runs: list[dict]) -> dict:
    """The median of each column over the repeated timings of one row, and the range of the
    SPREAD_COLUMNS (a machine's state moves a single timing by more than a change does)."""
    row = {}
    for column, first in runs[0].items():
        values = [run[column] for run in runs]
        row[column] = statistics.median(values) if isinstance(first, float) else first
        if column in SPREAD_COLUMNS:
            row[f"{column}, range"] = f"{cell(min(values))} to {cell(max(values))}"
    return row


def scale(model_dir, sizes: list[int], budget: int, steps: int = 30,
          options: dict | None = None, baselines: Sequence[str] = tuple(SCALE_BASELINES),
          repeats: int = 1) -> str:
    """`baselines`: those of SCALE_BASELINES to run beside the plugin (each holds its own copy
    of the backlog: at 1M waiting, about 5 GB of vLLM requests each). `repeats`: timings of
    each row, each from fresh schedulers, reported as their median (and range)."""
    baselines = list(dict.fromkeys(baselines))
    unknown = [name for name in baselines if name not in SCALE_BASELINES]
    if unknown:
        raise ValueError(f"unknown scale baselines {unknown}; choose from {list(SCALE_BASELINES)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rows = []
    for chunked in (True, False):
        for waiting in sizes:
            lengths = prompt_lengths("mmlu", waiting, seed=0, max_len=budget - 1)
            runs = {name: ("fcfs" if name == "presorted" else name, None, name == "presorted")
                    for name in baselines}
            for cost, fixed in SCALE_COSTS.items():
                runs[cost] = ("prepack", {"prepack": _scale_options(options, fixed)}, False)
            timed = [_scale_rows(_time_side_by_side(model_dir, runs, lengths, budget, chunked,
                                                    steps), chunked, waiting)
                     for _ in range(repeats)]
            rows += timed[0] if repeats == 1 else [_median_row(list(r)) for r in zip(*timed)]
    notes = " ".join(_BASELINE_NOTES[name] for name in baselines)
    repeated = (f" Each row is the median of {repeats} such timings, each from fresh "
                f"schedulers (the range beside the columns it names)." if repeats > 1 else "")
    return (
        f"**Scheduler time per step** ({steps} steps of `Scheduler.schedule()` from a full "
        f"backlog, budget {budget}, mmlu-shaped lengths, the schedulers of a row side by side, "
        f"a step of each in turn; baselines: "
        f"{', '.join(SCALE_BASELINES[name] for name in baselines) or 'none'}; ms/step and µs "
        f"per admitted request are each schedule() call whole).{repeated} {notes} The plugin "
        f"runs with its step cost fixed ({', '.join(SCALE_COSTS)}): a = 0 orders like SPF; at "
        f"a = 1024 tokens it packs (filler reserve and exchange with chunked prefill off). "
        f"'planning' is the plugin's own time in a step, from the start of its schedule() "
        f"through the plan (the running-budget mirror included). Its max is mostly the first "
        f"step, which dates every request of the backlog (one deadline per arrival step, all at "
        f"once here) and, where it packs, starts binning the prompts over half the budget; any "
        f"step's time also holds the collections of Python's garbage collector that fall in "
        f"it{_with(options)}."
        f"\n\n"
        + table(rows)
    )


def _eviction_bytes() -> int:
    """Twice the CPU's largest cache (as sysfs gives it), at least 64 MiB: a copy this large
    between two plans leaves none of the first in any cache."""
    largest = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return max(64 << 20, 2 * largest)


def policy_alone(sizes: list[int], budget: int, steps: int = 30, options: dict | None = None,
                 evict: int | None = None) -> str:
    """The pure policy's plan (``WaitingSet.plan``) from a full backlog, without vLLM: what the
    scale part's planning spends in the policy, apart from vLLM's adapter and queue calls.
    The same backlogs, options, step limits and number of steps as the scale part. Each entry
    carries a token list of its length, as vLLM's request does, so entries lie in memory as
    far apart as they do in an engine. 'cold': a copy of twice the largest cache between
    plans (or `evict` bytes) leaves nothing of the last plan cached. Warm and cold bound an
    engine's step, whose other work (vLLM's scheduling, the forward) evicts some of it."""
    from vllm_prepack.config import PrepackConfig
    from vllm_prepack.policy import Entry, StepLimits

    evict = evict or _eviction_bytes()
    source, sink = bytearray(evict), bytearray(evict)
    rows = []
    for chunked in (True, False):
        for waiting in sizes:
            lengths = prompt_lengths("mmlu", waiting, seed=0, max_len=budget - 1)
            for cost, fixed in SCALE_COSTS.items():
                prepack = {"prepack": _scale_options(options, fixed)}
                config = PrepackConfig.from_additional_config(prepack)
                limits = StepLimits(budget=budget, seats=SCALE_SEATS, chunked_prefill=chunked,
                                    min_chunk_tokens=config.min_chunk_tokens, capacity=budget,
                                    cost=config.step_cost_model(budget).current)
                row = {"chunked prefill": "on" if chunked else "off", "waiting requests": waiting,
                       "plugin's step cost": cost}
                for cold in (False, True):
                    waiting_set = config.waiting_set()
                    for i, length in enumerate(lengths):
                        waiting_set.add(Entry(key=str(i), length=length, time=time.time(),
                                              item=[i] * length))
                    gc.collect()
                    times, admitted = [], 0
                    for step in range(steps):
                        if cold:
                            sink[:] = source
                        started = time.perf_counter()
                        picks = waiting_set.plan(limits, step, time.time())
                        times.append(time.perf_counter() - started)
                        for pick in picks:
                            waiting_set.remove(pick.key)
                        admitted += len(picks)
                    warmth = "cold" if cold else "warm"
                    row[f"planning ms, {warmth} (p50)"] = 1e3 * summary(times)["p50"]
                    row[f"planning ms, {warmth} (first)"] = 1e3 * times[0]
                    rest = max(times[1:], default=math.nan)  # nan: one step, no rest
                    row[f"planning ms, {warmth} (max of the rest)"] = 1e3 * rest
                row["admitted/step"] = admitted / steps
                rows.append(row)
    return (
        f"**The policy alone** ({steps} plans of `WaitingSet.plan` from a full backlog, budget "
        f"{budget}, mmlu-shaped lengths, the plugin's options and step limits as in the scale "
        f"part, each plan's picks then removed, a chunk's prompt too; no vLLM: the running-budget "
        f"mirror and vLLM's queue calls are not in it; 'cold': {evict >> 20} MiB copied "
        f"between plans, so that nothing of the last plan is cached: warm and cold bound an "
        f"engine's step, whose other work evicts some of it; the "
        f"first plan dates the backlog and, where it packs, starts binning the prompts over half "
        f"the budget; a garbage collection may fall in any plan{_with(options)}).\n\n"
        + table(rows)
    )


# ---- 3. real engines -------------------------------------------------------------------------


def _plots(report: Path | None, name: str, title: str, outcomes: dict[str, Outcome]) -> str:
    """TTFT distribution and budget fill per step; markdown image links."""
    if report is None:
        return ""
    from vllm_prepack.bench import plots

    report.mkdir(parents=True, exist_ok=True)
    ttft = plots.ttft_cdf(report / f"{name}_ttft.png", {k: o.ttft_s for k, o in outcomes.items()},
                          f"{title}: time to first token")
    fill = plots.budget_fill(report / f"{name}_fill.png", {k: o.fill for k, o in outcomes.items()},
                             f"{title}: budget fill per step")
    return f"\n![{title} TTFT]({ttft.name}) ![{title} fill]({fill.name})\n"


PACKS_ALWAYS = "prepack, packs always"


CALIBRATION_REPEATS = 5  # runs of each calibration job: its median wall


def embedding_job(n: int, budget: int, repeats: int, report: Path | None = None,
                  step_delay: float = 0.0) -> str:
    from vllm import PoolingParams

    from vllm_prepack.models import minilm_model

    # with a fixed step cost, the other end of the latency/throughput option: packing always
    variants = {PACKS_ALWAYS: {"pack_fixed_share": 0.0}} if step_delay else None
    return _backlog_jobs("Embedding jobs, all-MiniLM-L6-v2 (real weights)", "embed", "embedding",
                         minilm_model(), PoolingParams(task="embed"), ONLINE, variants, n, budget,
                         repeats, report, step_delay, vocab_size=30000, first_id=1000,
                         runner="pooling", dtype="float32", max_model_len=256)


# On a GPU the prefill part's engines share it: each checks at start that this share of the
# GPU's memory, split between them, is free (vLLM's gpu_memory_utilization), and holds a KV cache
# of KV_STEPS full steps (kv_cache_memory_bytes), not one sized from the free memory, which
# would count what the engines starting beside it take: a prefill backlog's requests hold their
# blocks for one step
GPU_SHARE = 0.8
KV_STEPS = 16


def prefill_job(shape: DecoderShape, shape_name: str, n: int, budget: int, repeats: int,
                report: Path | None = None) -> str:
    """The embedding job's backlogs on a random-weight decoder, one token out each (the job is
    its prefills), with packing always beside the default: on a GPU, what a step's own fixed
    cost does to the schedules. HRRN is SPF on a backlog (every request waits as long), so it
    is left out. On a GPU the engines share it (GPU_SHARE, KV_STEPS) and async scheduling is
    off, as on the CPU."""
    import torch
    from vllm import SamplingParams

    from vllm_prepack.models import decoder_model

    cuda = torch.cuda.is_available()
    names = ("fcfs", "spf", "prepack")
    variants = {PACKS_ALWAYS: {"pack_fixed_share": 0.0}}
    dtype = "bfloat16" if cuda else "float32"
    gpu = dict(gpu_memory_utilization=GPU_SHARE / (len(names) + len(variants)),
               kv_cache_memory_bytes=KV_STEPS * budget * shape.kv_bytes_per_token(2),
               async_scheduling=False) if cuda else {}
    device = torch.cuda.get_device_name() if cuda else "CPU"
    return _backlog_jobs(f"Prefill jobs, random-weight {shape_name} ({dtype}, {device}, eager), "
                         f"one token out", f"prefill_{shape_name}", f"prefill, {shape_name}",
                         decoder_model(shape),
                         SamplingParams(max_tokens=1, temperature=0), names, variants, n, budget,
                         repeats, report, 0.0, vocab_size=shape.vocab_size, first_id=3,
                         dtype=dtype, max_model_len=512, enable_chunked_prefill=False,
                         enable_prefix_caching=False, **gpu)


def _backlog_jobs(title: str, tag: str, label: str, model, params, names,
                  variants: dict | None, n: int, budget: int, repeats: int, report: Path | None,
                  step_delay: float, vocab_size: int, first_id: int, **engine_kwargs) -> str:
    """Two backlogs (mmlu-shaped and trimodal, capped at 256 tokens) on each engine, then the
    step cost calibrated on FCFS's engine and the wall no schedule beats at that cost."""
    rows, figures, jobs = [], "", []
    with build_engines(model, budget, names, step_delay=step_delay, variants=variants, seed=0,
                       **engine_kwargs) as engines:
        for workload, seed in (("mmlu", 11), ("trimodal", 12)):
            lengths = prompt_lengths(workload, n, seed=seed, max_len=256)
            prompts = token_ids(lengths, vocab_size=vocab_size, seed=seed, first_id=first_id)
            part, outcomes = engine_table(workload, engines, prompts, params, repeats, budget,
                                          lengths)
            rows += part
            jobs.append((workload, outcomes, lengths))
            # one set of plots per step delay (the embed part runs one table per delay)
            name = f"{tag}_{workload}" + (f"_{step_delay * 1000:g}ms" if step_delay else "")
            figures += _plots(report, name, f"{label} job, {workload}", outcomes)
        # after the jobs: just built, the other engines' processes still slow a step down
        try:
            cost = calibrate(engines["fcfs"], params, budget, max_len=256, vocab_size=vocab_size,
                             first_id=first_id, repeats=CALIBRATION_REPEATS)
        except FlatSteps as e:  # the jobs' tables stand without it
            calibration = f"\n**No step cost fitted on this engine**: {e}.\n"
        else:
            calibration = (f"\n{_wall_floor_note(CALIBRATION_REPEATS)}\n\n"
                           + table([wall_floor(workload, cost, outcomes, lengths, budget)
                                    for workload, outcomes, lengths in jobs])
                           + f"\n\n{MODELLED_NOTE}\n\n"
                           + table([row for workload, outcomes, lengths in jobs
                                    for row in in_model(workload, cost, outcomes, lengths)]))
    delay = (f"; every model execution first sleeps {1e3 * step_delay:g} ms, standing in for a "
             f"GPU's fixed cost per step" if step_delay else "")
    packs = (f"; `{PACKS_ALWAYS}`: the plugin with `pack_fixed_share` 0, the throughput end of "
             f"that option" if variants else "")
    return (
        f"**{title}, chunked prefill off** ({n} prompts each, synthetic lengths capped at 256: "
        f"mmlu-shaped, and the trimodal mix 50% 6-30 / 30% 90-130 / 20% 200-252 tokens; budget "
        f"{budget}; median wall of {repeats}, run order alternating{delay}{packs})\n\n"
        + table(rows, ENGINE_COLUMNS) + _fits_note(jobs, budget) + calibration + figures
    )


def _fits_note(jobs, budget: int) -> str:
    """The step cost each plugin engine had learned by the end of its median run (its model
    keeps learning across the warm-up and the runs): what its schedule acted on."""
    rows = [{"workload": workload, "scheduler": name, "a ms": 1e3 * fit["fixed_s"],
             "b ms/token": 1e3 * fit["per_token_s"], "c ms/prompt": 1e3 * fit["per_seq_s"],
             "f": fit["fixed_share"], "f sd": fit["share_sd"],
             "steps seen": fit["steps"],
             "probes": fit["probes"]}
            for workload, outcomes, _ in jobs for name, o in outcomes.items()
            if (fit := o.cost) is not None]
    if not rows:
        return ""
    return ("\n\n**The step cost the plugin had learned** (each plugin engine's model at the end "
            "of its median run, warm-up and earlier runs included; f = a / (a + (b + c x the "
            "prompts a token brings) x budget), compared with `pack_fixed_share`: the plan packs "
            "from 2 of its standard deviations (f sd, 0 where the choice is not open) above it "
            "until 2 below; probes: "
            "half-budget steps it ran to tell a from the work)\n\n" + table(rows))


def _wall_floor_note(repeats: int) -> str:
    seqs = " and of ".join(map(str, PROBE_SEQS))
    return (
        f"**What a step costs on this engine, and the wall no schedule beats in that model** "
        f"(FCFS's engine, calibrated after the jobs: one-step jobs of {seqs} prompts at "
        f"{len(PROBE_SHARES)} sizes from {min(PROBE_SHARES):.0%} to all of the most such a step "
        f"holds, the median of {repeats} each, fitted to a + b x tokens + c x prompts with a, c "
        f">= 0; 'f' is a's share of a full step of the job's prompts, a / (a + b x budget + c x "
        f"the prompts it holds), what the plugin's `pack_fixed_share` is compared with). 'wall "
        f"at the bound vs SPF's' is a model's figure, not a measurement: a x the step bound "
        f"+ b x the prompt tokens + c x the prompts, over the same with SPF's steps. "
        f"A target below it is beyond every schedule at this step cost.")


def wall_floor(workload: str, cost: StepCost, outcomes: dict[str, Outcome], lengths: list[int],
               budget: int) -> dict:
    """The calibrated step cost, and the wall a schedule at the step bound would take against
    SPF's steps at that cost (the same prompts and tokens: only the steps differ)."""
    bound, tokens, spf = lower_bound_steps(lengths, budget), sum(lengths), outcomes["spf"].steps

    def wall(steps: int) -> float:
        return cost.fixed * steps + cost.per_token * tokens + cost.per_seq * len(lengths)

    return {"workload": workload, "a ms": 1e3 * cost.fixed, "b ms/token": 1e3 * cost.per_token,
            "c ms/prompt": 1e3 * cost.per_seq,
            "f": cost.fixed / cost.seconds(budget, budget * len(lengths) / max(1, tokens)),
            "step bound": bound, "SPF steps": spf,
            "wall at the bound vs SPF's (model)": wall(bound) / wall(spf)}


MODELLED_NOTE = (
    "**Each schedule in that model** (each engine's median run: the step that started each "
    "request; a step costs a + b x its prompts' tokens + c x its prompts at the calibrated a, b, "
    "c; mean TTFT and the end of the last step, against SPF's). A model's figure, not a "
    "measurement: it compares the schedules without the spread between engine processes, "
    "which can move measured seconds by more than the schedules differ.")


def in_model(workload: str, cost: StepCost, outcomes: dict[str, Outcome],
             lengths: list[int]) -> list[dict]:
    """Every engine's schedule timed by the calibrated step cost: each step's tokens and
    prompts from the requests it started (whole prompts, one step each: chunked prefill off),
    a step that starts none at a alone; mean TTFT and wall against SPF's."""

    def timed(o: Outcome) -> tuple[int, float, float]:
        steps = max(o.ttft_steps)
        tokens, seqs = [0] * steps, [0] * steps
        for step, length in zip(o.ttft_steps, lengths, strict=True):
            tokens[step - 1] += length
            seqs[step - 1] += 1
        ends = list(accumulate(map(cost.seconds, tokens, seqs)))
        return steps, statistics.fmean(ends[step - 1] for step in o.ttft_steps), ends[-1]

    times = {name: timed(o) for name, o in outcomes.items()}
    _, spf_mean, spf_wall = times["spf"]
    return [{"workload": workload, "scheduler": name, "steps": steps,
             "TTFT mean s (model)": mean, "wall s (model)": wall,
             "mean vs SPF (model)": mean / spf_mean, "wall vs SPF (model)": wall / spf_wall}
            for name, (steps, mean, wall) in times.items()]


def generation_job(n: int, budget: int, max_tokens: list[int], repeats: int,
                   report: Path | None = None) -> str:
    from vllm import SamplingParams

    from vllm_prepack.models import BENCH_100M, decoder_model

    lengths = prompt_lengths("bimodal", n, seed=12, max_len=2000)
    prompts = token_ids(lengths, vocab_size=BENCH_100M.vocab_size, seed=12)
    rows, figures = [], ""
    with build_engines(decoder_model(BENCH_100M), budget, ONLINE, dtype="float32",
                       max_model_len=2048, enable_chunked_prefill=True,
                       enable_prefix_caching=False, seed=0) as engines:
        for tokens in max_tokens:
            params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
            part, outcomes = engine_table(f"bimodal, {tokens} out", engines, prompts, params,
                                          repeats, budget, lengths)
            rows += part
            figures += _plots(report, f"generate_{tokens}", f"generation, {tokens} out", outcomes)
    return (
        f"**Generation, random-weight Llama ~100M params (fp32), chunked prefill on** ({n} "
        f"prompts, bimodal synthetic lengths, budget {budget}; median wall of {repeats}; bounds "
        f"count prefill tokens only)\n\n" + table(rows, ENGINE_COLUMNS) + figures
    )


def prefix_job(n: int, budget: int, repeats: int) -> str:
    """Prefix caching on (vLLM's default): prompts that share a few long system prompts, and
    documents asked about more than once. Prompts are at most 960 tokens, 968 with the output:
    the model length is the budget (chunked prefill off, vLLM refuses a longer one)."""
    import random

    from vllm import SamplingParams

    from vllm_prepack.models import DEMO_MODEL, decoder_model

    rng = random.Random(14)
    systems = token_ids([rng.randint(200, 400) for _ in range(4)], DEMO_MODEL.vocab_size, seed=15)
    n_docs = max(1, n // 8)
    docs = token_ids([rng.randint(300, 900) for _ in range(n_docs)], DEMO_MODEL.vocab_size, seed=16)
    prompts = []
    for i in range(n):
        tail = token_ids([rng.randint(5, 60)], DEMO_MODEL.vocab_size, seed=100 + i)[0]
        prompts.append(systems[i % len(systems)] + tail if i % 2 else rng.choice(docs) + tail)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with build_engines(decoder_model(DEMO_MODEL), budget, ("fcfs", "spf", "prepack"),
                       dtype="float32", max_model_len=budget, enable_chunked_prefill=False,
                       enable_prefix_caching=True, seed=0) as engines:
        rows, _ = engine_table("shared prefixes", engines, prompts, params, repeats, budget, None)
    return (
        f"**Prefix caching on, chunked prefill off** (random-weight Llama {DEMO_MODEL.hidden_size}h x "
        f"{DEMO_MODEL.num_hidden_layers} layers, fp32; {n} prompts: half one of 4 system prompts "
        f"of 200-400 tokens + a 5-60 token question, half one of {n_docs} documents of 300-900 "
        f"tokens + a question; 8 tokens out; budget {budget}; median wall of {repeats}). The "
        f"plugin orders by uncached length (vLLM's own prefix lookup, refreshed as requests "
        f"arrive).\n\n"
        + table(rows, [c for c in ENGINE_COLUMNS if c != "steps/bound"])
    )


def hook_overhead(n: int, repeats: int) -> str:
    """The model-runner layout hook: step time with it recording vs off, side by side."""
    import timeit

    from vllm import SamplingParams

    from vllm_prepack._patches.runner_layout import layout_report, recorder
    from vllm_prepack.bench.engines import build_llm, run_stepwise
    from vllm_prepack.models import DEMO_MODEL, decoder_model

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

    class Runner:  # the off path: one instance-dict lookup per forward, after the first
        vllm_config = SimpleNamespace(additional_config={})

    runner = Runner()
    recorder(runner)
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
    from vllm_prepack.bench.engines import in_process
    from vllm_prepack.models import TINY, decoder_model

    in_process()
    # the frontier's latency end runs shortest-first without deadlines on purpose
    warnings.filterwarnings("ignore", category=StarvationWarning)
    parts = [header("bench scheduler")]
    if "synthetic" in args.parts:
        parts.append(synthetic(decoder_model(TINY), args.prompts, args.budget, args.seed,
                               args.prepack_options))
    if "arrivals" in args.parts:
        parts.append(arrivals(decoder_model(TINY), args.prompts, args.budget, args.seed, args.loads,
                              args.prepack_options))
    if "seconds" in args.parts:
        parts.append(in_seconds(decoder_model(TINY), args.prompts, args.budget, args.seed,
                                args.fixed_tokens, args.loads, args.prepack_options,
                                args.step_noise, args.step_warmup))
    if "scale" in args.parts:
        parts.append(scale(decoder_model(TINY), args.scale_sizes, args.budget, args.scale_steps,
                           options=args.prepack_options, baselines=args.scale_baselines,
                           repeats=args.scale_repeats))
    if "policy" in args.parts:
        parts.append(policy_alone(args.scale_sizes, args.budget, args.scale_steps,
                                  options=args.prepack_options))
    if "embed" in args.parts:
        for delay in args.step_delays:
            parts.append(embedding_job(args.embed_prompts, 1024, args.repeats, args.report, delay))
    if "prefill" in args.parts:
        from vllm_prepack.models import PREFILL_SHAPES

        parts.append(prefill_job(PREFILL_SHAPES[args.prefill_model], args.prefill_model,
                                 args.embed_prompts, 1024, args.repeats, args.report))
    if "generate" in args.parts:
        parts.append(generation_job(args.gen_prompts, 512, args.max_tokens, args.repeats,
                                    args.report))
    if "prefix" in args.parts:
        parts.append(prefix_job(args.gen_prompts, 1024, args.repeats))
    if "hook" in args.parts:
        parts.append(hook_overhead(args.gen_prompts, args.repeats))
    text = "\n".join(parts)
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "summary.md").write_text(text)
    return text


def add_arguments(parser) -> None:
    parts = ["synthetic", "arrivals", "seconds", "scale", "policy", "embed", "prefill", "generate",
             "prefix", "hook"]
    parser.add_argument("--parts", nargs="+", default=[p for p in parts if p != "prefill"],
                        choices=parts, help="'prefill' (not run by default) is for a GPU")
    parser.add_argument("--report", type=Path, help="also write PNG plots and summary.md here")
    parser.add_argument("--prompts", type=at_least_one, default=1000,
                        help="prompts per workload (synthetic, arrivals, seconds)")
    parser.add_argument("--budget", type=at_least_one, default=1024,
                        help="token budget of a step (synthetic, arrivals, seconds, scale, policy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompt lengths")
    parser.add_argument("--prepack-options", type=prepack_options, default=None, metavar="JSON",
                        help="the plugin's options for the synthetic, arrivals, seconds, scale "
                             "and policy parts, e.g. "
                             "'{\"aging_drain_factor\": null}' (default: the plugin's defaults)")
    parser.add_argument("--loads", type=positive, nargs="+", default=[0.8, 0.95, 1.05],
                        help="offered loads for the arrivals and seconds parts (1 = the budget, "
                             "in prompt tokens)")
    parser.add_argument("--scale-sizes", type=at_least_one, nargs="+",
                        default=[1000, 10_000, 100_000],
                        help="waiting requests in the scale and policy parts")
    parser.add_argument("--scale-steps", type=at_least_one, default=30,
                        help="steps timed from the full backlog in the scale and policy parts "
                             "(a burst of 1M where the plugin packs bins its prompts over half "
                             "the budget in its first 14 plans: more steps read past them; a "
                             "backlog that drains before the last step times empty steps)")
    parser.add_argument("--scale-repeats", type=at_least_one, default=1,
                        help="timings of each scale row, from fresh schedulers each, reported as "
                             "their median and range")
    parser.add_argument("--scale-baselines", nargs="+", default=list(SCALE_BASELINES),
                        choices=SCALE_BASELINES,
                        help="the scale part's baselines (each holds a copy of the backlog: "
                             "'presorted' alone at 1M waiting)")
    parser.add_argument("--fixed-tokens", type=non_negative, nargs="+", default=[0, 64, 256, 1024],
                        help="the 'seconds' part: a step's fixed cost a, in tokens of work (a / b)")
    parser.add_argument("--step-noise", type=non_negative, default=0.0,
                        help="the 'seconds' part: each step's time off by this Gaussian share of "
                             "itself, as an engine's timings are (0: exact)")
    parser.add_argument("--step-warmup", type=at_least(1.0, float), default=1.0,
                        help="the 'seconds' part: each run's first steps take (this - 1) x a "
                             "full step's time more, as an engine's first steps do (1: not "
                             "slowed)")
    parser.add_argument("--step-delays", type=non_negative, nargs="+", default=[0.0],
                        help="the 'embed' part: seconds slept in every model execution (a GPU's "
                             "fixed step cost), one table each")
    parser.add_argument("--embed-prompts", type=at_least_one, default=1000,
                        help="prompts per backlog of the 'embed' and 'prefill' parts")
    from vllm_prepack.models import PREFILL_SHAPES

    parser.add_argument("--prefill-model", default="sheared-1.3b", choices=sorted(PREFILL_SHAPES),
                        help="the 'prefill' part's random-weight decoder")
    parser.add_argument("--gen-prompts", type=at_least_one, default=96,
                        help="prompts per job of the 'generate', 'prefix' and 'hook' parts")
    parser.add_argument("--max-tokens", type=at_least_one, nargs="+", default=[8, 64],
                        help="the 'generate' part: tokens out per request, one table each")
    parser.add_argument("--repeats", type=at_least_one, default=3,
                        help="timed runs of each engine job, reported as the median")
