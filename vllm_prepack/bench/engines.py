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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vllm_prepack.bench.harness import SCHEDULERS, Outcome, rows_for
from vllm_prepack.config import plugin_engine_kwargs
from vllm_prepack.cost import StepCost
from vllm_prepack.replica import in_process_env
from vllm_prepack.touchpoints import delay_model_execution, engine_scheduler, observe_schedule
from vllm_prepack.workloads import token_ids


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
    step_cost: dict | None = None  # the plugin's step-cost model after the run (its report)


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
    model = getattr(scheduler, "step_cost_model", None)
    return Run(results, step, time.perf_counter() - start, timings, tokens,
               model.report() if model is not None else None)


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


ENGINE_COLUMNS = ["workload", "scheduler", "steps", "steps/bound", "TTFT mean (steps)", "wall s",
                  "tok/s vs FCFS", "TTFT mean s", "TTFT p99 s", "mean vs FCFS", "p99 vs FCFS",
                  "outputs = FCFS"]


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
        cost=run.step_cost,
    )


def compare_engines(engines, prompts, params, repeats: int, budget: int
                    ) -> tuple[list[list[Outcome]], list[Run]]:
    """Every engine's runs, alternating which goes first (one warm-up each before): one list of
    `repeats` outcomes per engine, and each engine's first run (its outputs)."""
    warm = prompts[: min(8, len(prompts))]
    for engine in engines:
        engine.run(warm, params)
    runs: list[list[Outcome]] = [[] for _ in engines]
    first: list[Run] = []
    for repeat in range(repeats):
        for i in alternating(len(engines), repeat):
            run = engines[i].run(prompts, params)
            if repeat == 0:
                first.append(run)
            runs[i].append(engine_outcome(run, prompts, budget))
    return runs, first


# one-step calibration jobs: their tokens, as shares of the most a step holds (the top half,
# where a backlog's steps are: the line is the cost's tangent there), at each of two prompt
# counts (the per-sequence cost apart from the per-step one)
PROBE_SHARES = (1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)
PROBE_SEQS = (4, 16)
PROBE_SEEDS = 1 << 20  # calibration prompts' seeds start here, apart from any workload's


def calibrate(engine, params, budget: int, max_len: int, vocab_size: int, first_id: int = 3,
              repeats: int = 5) -> StepCost:
    """What a step costs on `engine` (a + b x tokens + c x sequences, seconds), fitted to
    one-step jobs of PROBE_SEQS prompts at PROBE_SHARES of the most such a step holds (the
    budget, or the fewest prompts' worth of `max_len`), each the median wall of `repeats`, the
    jobs taken in turn, forwards then backwards, so that a drift of the machine falls on all
    alike rather than on the slope. A backlog's own steps are nearly all full, too alike to
    tell a from b. The engine's work per job (starting it, stepping until it ends) falls in a,
    its work per request (adding it, returning its output) in c. Every job's prompts are new,
    so no prefix cache shortens a repeat; one job first warms the engine up, uncounted."""
    most = min(budget, min(PROBE_SEQS) * max_len)
    jobs = list(dict.fromkeys((max(n, round(share * most)) // n, n)
                              for share in PROBE_SHARES for n in PROBE_SEQS))
    walls: dict[tuple[int, int], list[float]] = {job: [] for job in jobs}
    seed = PROBE_SEEDS
    engine.run(token_ids([most // PROBE_SEQS[0]] * PROBE_SEQS[0], vocab_size, seed=seed,
                         first_id=first_id), params)
    for repeat in range(repeats):
        for i in alternating(len(jobs), repeat):
            length, n = jobs[i]
            seed += 1
            run = engine.run(token_ids([length] * n, vocab_size, seed=seed, first_id=first_id),
                             params)
            if run.steps != 1:
                raise ValueError(f"a calibration job of {n} x {length} tokens took {run.steps} "
                                 f"steps, not one: it needs chunked prefill off and one-step "
                                 f"requests (embeddings, or one generated token)")
            walls[length, n].append(run.wall)
    return fit_step_cost([(length * n, n, statistics.median(w))
                          for (length, n), w in walls.items()])


class FlatSteps(ValueError):
    """Step times that do not grow with tokens: nothing to fit a slope to."""


def fit_step_cost(points: Sequence[tuple[float, float, float]]) -> StepCost:
    """Least squares seconds = a + b x tokens + c x sequences over (tokens, sequences,
    seconds) points, with a and c at least 0: where the free fit puts one below 0 (a cost
    convex in tokens, noise), the best fit with it held at 0. Not ``cost.StepCostModel``, which
    draws towards a prior, forgets old steps and clips outliers: right online, a bias here."""
    import numpy as np

    x = np.array([(1.0, t, n) for t, n, _ in points])
    y = np.array([s for *_, s in points])
    if np.linalg.matrix_rank(x) < 3:
        raise ValueError("a step-cost fit needs steps of at least two sizes and two prompt "
                         "counts, not all in proportion")
    best = None
    for columns in ((0, 1, 2), (1, 2), (0, 1), (1,)):  # b always; a and c where >= 0
        solved, *_ = np.linalg.lstsq(x[:, columns], y, rcond=None)
        theta = dict.fromkeys(range(3), 0.0) | dict(zip(columns, map(float, solved)))
        if theta[0] < 0 or theta[2] < 0:
            continue
        residual = float(np.sum((x @ np.array([theta[0], theta[1], theta[2]]) - y) ** 2))
        if best is None or residual < best[0]:
            best = residual, theta
    a, b, c = (best[1][i] for i in range(3))  # b alone is always feasible
    if b <= 0:
        raise FlatSteps(f"step times do not grow with tokens (slope {b:.3g} s a token): "
                         f"flat within the probes' noise, a fixed cost per step that dominates "
                         f"at these sizes, or noise alone")
    return StepCost(a, b, c)


def median_run(outcomes: list[Outcome]) -> Outcome:
    """The run with the median wall time (the lower middle one for an even count)."""
    ranked = sorted(outcomes, key=lambda o: o.wall)
    return ranked[(len(ranked) - 1) // 2]


def alternating(n: int, repeat: int) -> list[int]:
    """Run order for one repeat: forwards, then backwards, so neither side always goes first."""
    return list(range(n)) if repeat % 2 == 0 else list(range(n))[::-1]


class EngineProcess:
    """One engine in a process of its own, running one job at a time when asked.

    Engines built in one process share its allocator, thread pools and caches, and one engine's
    runs can pay for another's (the plugin's MiniLM engine once took 1.08-1.18x SPF's seconds
    for SPF's very steps there, BENCHMARKS.md). Each engine alone in its process, run in turn,
    compares schedulers rather than neighbours."""

    def __init__(self, model, prepack: bool | dict, step_delay: float, engine_kwargs: dict) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, name="bench-engine",
                                        args=(child, str(model), prepack, step_delay, engine_kwargs))
        try:
            self._process.start()
        finally:
            child.close()

    def ready(self) -> None:
        """Wait until the engine is built (engines build concurrently)."""
        self._reply()

    def run(self, prompts, params) -> Run:
        self._conn.send((list(map(list, prompts)), params))
        return self._reply()

    def _reply(self):
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the bench engine's process died (exit code "
                               f"{self._process.exitcode}); its log says why") from None
        if kind == "error":
            raise RuntimeError(f"the bench engine's process failed:\n{value}")
        return value

    def close(self, timeout: float = 60.0) -> None:
        self._conn.close()  # the process ends at the closed pipe
        self._process.join(timeout=timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _serve(conn, model: str, prepack, step_delay: float, engine_kwargs: dict) -> None:
    """The engine process: build, then run what the parent sends until it closes the pipe or
    dies. It ends normally, releasing what the engine registered with multiprocessing's
    resource tracker (an ``os._exit`` left it reported as leaked at the parent's exit)."""
    import threading
    import traceback

    def orphaned() -> None:  # the parent died mid-run: stop burning the machine's cores
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    in_process()
    try:
        llm = build_llm(model, prepack, **engine_kwargs)
        if step_delay:
            delay_model_execution(llm, step_delay)
        conn.send(("ready", None))
        while True:
            try:
                prompts, params = conn.recv()
            except EOFError:
                break
            conn.send(("run", run_stepwise(llm, prompts, params)))
    except Exception:  # the parent raises it, naming the cause
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Engines(dict):
    """Name -> EngineProcess; a context manager that ends the processes."""

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float = 60.0) -> None:
        """End every engine's process, even when ending one fails (the first failure raised)."""
        errors = []
        for engine in self.values():
            try:
                engine.close(timeout)
            except BaseException as e:  # noqa: BLE001 (re-raised below, after the rest)
                errors.append(e)
        self.clear()
        if errors:
            raise errors[0]


def build_engines(model, budget: int, names, step_delay: float = 0.0,
                  variants: dict[str, dict] | None = None, **kw) -> Engines:
    """One engine per scheduler name (SCHEDULERS), and one with the plugin per `variants`
    entry (a row name -> the plugin's options), each in its own process, the same engine
    arguments for all; `step_delay` seconds of sleep in every model execution (a GPU's fixed
    step cost)."""
    engines = Engines()
    specs = {name: ((True, {}) if name == "prepack" else
                    (False, {"scheduler_cls": SCHEDULERS[name]} if SCHEDULERS[name] else {}))
             for name in names}
    specs.update({name: (dict(options), {}) for name, options in (variants or {}).items()})
    try:
        for name, (prepack, extra) in specs.items():
            engines[name] = EngineProcess(model, prepack, step_delay,
                                          dict(max_num_batched_tokens=budget, **kw, **extra))
        for engine in engines.values():
            engine.ready()
    except BaseException:
        engines.close(timeout=1.0)
        raise
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
