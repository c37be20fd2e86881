"""Real vLLM engines for tests, benchmarks and the demo: built with test defaults, stepped one
schedule + forward at a time, and compared side by side.

Step-level figures (forward steps, time to first token in steps and seconds) need the engine
core in this process: ``in_process()`` sets the in-process environment before an engine is
built, so that each ``LLMEngine.step()`` is exactly one schedule + forward. Production code
(the batch replicas, Ray Data, serving) takes the user's engine arguments instead and never
imports this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm_prepack.bench.harness import SCHEDULERS, Outcome, rows_for
from vllm_prepack.config import plugin_engine_kwargs
from vllm_prepack.replica import in_process_env
from vllm_prepack.touchpoints import delay_model_execution, engine_scheduler, observe_schedule


def in_process() -> None:
    os.environ.update(in_process_env())


def build_llm(model: str, prepack: bool | dict = False, **engine_kwargs):
    """An ``LLM`` for tests, benchmarks and the demo; ``prepack`` is False (plain vLLM), True,
    or the plugin's options. Defaults to eager mode (a short start on CPU), unlike the
    production paths, which take the user's engine arguments unchanged."""
    from vllm import LLM

    kwargs = dict(enforce_eager=True, disable_log_stats=True)
    kwargs.update(engine_kwargs)
    return LLM(model=str(model), **plugin_engine_kwargs(kwargs, prepack))


@dataclass
class Result:
    index: int
    prompt_len: int
    token_ids: list[int] | None = None
    text: str | None = None
    embedding: list[float] | None = None
    first_step: int | None = None  # the step whose output carried the first token
    first_time: float | None = None  # seconds from the start of the run
    finish_step: int | None = None
    finished: bool = False


@dataclass
class Run:
    results: list[Result]
    steps: int
    wall: float
    schedule_seconds: list[float] = field(default_factory=list)  # the scheduler's own time
    step_tokens: list[int] = field(default_factory=list)  # tokens scheduled per step


def run_stepwise(
    llm,
    prompts: Sequence[Sequence[int]],
    params,
    *,
    priorities: Sequence[int] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Run:
    """Submit all prompts (a backlog), then step the engine until every request finishes."""
    engine = llm.llm_engine
    scheduler = engine_scheduler(llm)
    timings: list[float] = []
    tokens: list[int] = []

    def observed(seconds: float, output) -> None:
        timings.append(seconds)
        tokens.append(output.total_num_scheduled_tokens)

    stop_observing = observe_schedule(scheduler, observed) if scheduler is not None else None
    results = [Result(i, len(p)) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(
            str(i),
            {"prompt_token_ids": list(prompt)},
            params,
            priority=priorities[i] if priorities else 0,
        )
    step = 0
    try:
        while engine.has_unfinished_requests():
            step += 1
            outputs = engine.step()
            now = time.perf_counter() - start
            for out in outputs:
                _record(results[int(out.request_id)], out, step, now)
            if on_step is not None:
                on_step(step)
    finally:
        if stop_observing is not None:
            stop_observing()
    return Run(results, step, time.perf_counter() - start, timings, tokens)


def _record(result: Result, out, step: int, now: float) -> None:
    embedding = getattr(getattr(out, "outputs", None), "data", None)
    if embedding is not None:  # PoolingRequestOutput
        result.embedding = embedding.tolist()
    elif out.outputs and out.outputs[0].token_ids:
        result.token_ids = list(out.outputs[0].token_ids)
        result.text = out.outputs[0].text
    else:
        return
    if result.first_step is None:
        result.first_step, result.first_time = step, now
    if out.finished:
        result.finished, result.finish_step = True, step


ENGINE_COLUMNS = ["workload", "scheduler", "steps", "steps/bound", "wall s", "tok/s vs FCFS",
                  "TTFT mean s", "TTFT p99 s", "mean vs FCFS", "p99 vs FCFS", "outputs = FCFS"]


def engine_outcome(run, prompts, budget: int) -> Outcome:
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


def compare_engines(engines, prompts, params, repeats: int, budget: int
                    ) -> tuple[list[list[Outcome]], list[Run]]:
    """Every engine's runs, alternating which goes first (one warm-up each before): one list of
    `repeats` outcomes per engine, and each engine's first run (its outputs)."""
    warm = prompts[: min(8, len(prompts))]
    for llm in engines:
        run_stepwise(llm, warm, params)
    runs: list[list[Outcome]] = [[] for _ in engines]
    first: list[Run] = []
    for repeat in range(repeats):
        for i in alternating(len(engines), repeat):
            run = run_stepwise(engines[i], prompts, params)
            if repeat == 0:
                first.append(run)
            runs[i].append(engine_outcome(run, prompts, budget))
    return runs, first


def median_run(outcomes: list[Outcome]) -> Outcome:
    """The run with the median wall time (the lower middle one for an even count)."""
    ranked = sorted(outcomes, key=lambda o: o.wall)
    return ranked[(len(ranked) - 1) // 2]


def alternating(n: int, repeat: int) -> list[int]:
    """Run order for one repeat: forwards, then backwards, so neither side always goes first."""
    return list(range(n)) if repeat % 2 == 0 else list(range(n))[::-1]


def build_engines(model, budget: int, names, step_delay: float = 0.0, **kw) -> dict:
    """One engine per scheduler name (SCHEDULERS), the same engine arguments for all;
    `step_delay` seconds of sleep in every model execution (a GPU's fixed step cost)."""
    engines = {}
    for name in names:
        cls = SCHEDULERS[name]
        if name == "prepack":
            engines[name] = build_llm(model, True, max_num_batched_tokens=budget, **kw)
        else:
            extra = {"scheduler_cls": cls} if cls else {}
            engines[name] = build_llm(model, False, max_num_batched_tokens=budget, **kw, **extra)
    if step_delay:
        for llm in engines.values():
            delay_model_execution(llm, step_delay)
    return engines


def engine_table(label: str, engines: dict, prompts, params, repeats: int, budget: int,
                 lengths: list[int] | None) -> tuple[list[dict], dict[str, Outcome]]:
    """Median-wall run of each engine (alternating order), and whether its outputs equal FCFS's."""
    runs, first = compare_engines(list(engines.values()), prompts, params, repeats, budget)
    outcomes = {name: median_run(r) for name, r in zip(engines, runs)}
    outputs = dict(zip(engines, first))
    same = {name: {"outputs = FCFS": "-" if name == "fcfs" else _same_outputs(
        outputs["fcfs"].results, run.results)} for name, run in outputs.items()}
    return rows_for(label, outcomes, lengths, budget, **same), outcomes


def _same_outputs(a: list[Result], b: list[Result]) -> str:
    if a[0].embedding is not None:
        worst = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra.embedding, rb.embedding))
        return f"max |diff| {worst:.1e}"
    return "yes" if [r.token_ids for r in a] == [r.token_ids for r in b] else "NO"
