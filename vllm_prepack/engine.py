"""Build vLLM engines with or without the plugin, and drive them step by step.

Step-level figures (forward steps, time to first token in steps and seconds) need the engine
core in this process: ``in_process()`` sets VLLM_ENABLE_V1_MULTIPROCESSING=0 before an engine is
built, so that each ``LLMEngine.step()`` is exactly one schedule + forward.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm_prepack.config import plugin_engine_kwargs


def in_process() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def build_llm(model: str, prepack: bool | dict = False, **engine_kwargs):
    """An ``LLM`` for tests, benchmarks and the demo; ``prepack`` is False (plain vLLM), True,
    or the plugin's options. Defaults to eager mode (a short start on CPU); production paths
    (the batch replicas, Ray Data) take the user's engine arguments unchanged instead."""
    from vllm import LLM

    kwargs = dict(enforce_eager=True, disable_log_stats=True)
    kwargs.update(engine_kwargs)
    return LLM(model=str(model), **plugin_engine_kwargs(kwargs, prepack))


def engine_scheduler(llm):
    """The engine's scheduler object when the engine core runs in this process, else None."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    return getattr(core, "scheduler", None)


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
    if scheduler is not None:
        _instrument(scheduler, timings, tokens)
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
        if scheduler is not None:
            del scheduler.schedule  # drop the timing wrapper
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


def _instrument(scheduler, timings: list[float], tokens: list[int]) -> None:
    """Time each schedule() call and keep its token count (an instance attribute, removed
    after the run)."""
    inner = scheduler.schedule

    def timed(*args, **kwargs):
        t = time.perf_counter()
        output = inner(*args, **kwargs)
        timings.append(time.perf_counter() - t)
        tokens.append(output.total_num_scheduled_tokens)
        return output

    scheduler.schedule = timed
