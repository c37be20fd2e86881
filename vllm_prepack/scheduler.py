"""The packing scheduler for vLLM: ``PrepackScheduler`` over vLLM's ``Scheduler`` / ``AsyncScheduler``.

Enable with ``scheduler_cls="vllm_prepack.PrepackScheduler"`` and options in
``additional_config={"prepack": {...}}`` (``config.plugin_engine_kwargs``).

How it hooks in, without copying vLLM's scheduling loop: vLLM's ``Scheduler.schedule()`` first
gives running requests their tokens, then walks ``self.waiting`` (a ``RequestQueue``) from its
head, admitting each request that fits and stopping at the first that does not (chunked prefill
off) or chunking it (on). We replace ``self.waiting`` with ``PackingRequestQueue`` and, just
before each ``schedule()``, plan the step with the pure policy in ``policy.py`` from the token
budget the running requests leave. The queue then presents the planned requests first, so vLLM's
own mechanism (KV allocation, LoRA limits, prefix caching, encoder budget, preemption) admits
them. Whatever vLLM decides is final; the plan only decides the order.

The plan also gets the step cost (``cost.py``: a + b x tokens + c x sequences, fitted online
from the whole steps this scheduler times between one ``update_from_output`` and the next) and,
for a plain full-attention KV cache, the blocks free after the running requests take theirs.
Where the fit cannot yet tell whether packing pays and a deep backlog of whole prompts waits,
the step's token budget is halved for once (a probe; ``touchpoints.token_budget_cap``): vLLM's
own loop fills the smaller step, and its time sets a apart from b.

The budget the plan needs is a mirror of vLLM's running phase (``_running_phase``); with
``debug_layout`` (and in every test) it is checked against what vLLM then scheduled, every step.
Every vLLM internal read or overridden here is listed in ``touchpoints.py`` (the registry), which
also holds the one place each difference between vLLM releases is handled; ``REQUIRED_ATTRIBUTES``
is checked at engine start, so a vLLM that renamed one fails there, naming it.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm_prepack.config import CONFIG_KEY, PrepackConfig, StarvationWarning
from vllm_prepack.cost import MIN_STEPS
from vllm_prepack.policy import Entry, Plan, StepLimits
from vllm_prepack.routing import LoadReport
from vllm_prepack.touchpoints import (
    REQUIRED_ATTRIBUTES,
    TESTED_VLLM,
    active_adapters,
    admitted_req_ids,
    attach_plan,
    attach_step_cost,
    cached_prefix_tokens,
    capture_sizes,
    check_vllm_version,
    check_waiting_order,
    free_kv_blocks,
    internal,
    kv_block_accounting,
    kv_cache_tokens,
    long_prefill_threshold,
    passed_over,
    prefills_deferred,
    running_load,
    token_budget_cap,
)

if TYPE_CHECKING:  # annotations only: nothing is imported from vLLM but through touchpoints
    from vllm.v1.request import Request

logger = logging.getLogger("vllm_prepack")

REFRESH_PER_STEP = 256  # prefix-cache lookups of waiting requests per step
LOG_COST_EVERY = 1024  # steps between debug log lines of the fitted step cost (-v)
MAX_REMEMBERED_DEADLINES = 65_536  # deadlines kept for re-entry (priority policy), newest


@dataclass
class _RunningPhase:
    """The mirror's prediction of vLLM's running phase for the coming step."""

    tokens: dict[str, int]  # request id -> tokens vLLM will give it
    input_left: int  # vLLM's input budget after them (draft slots included)
    defer_prefills: bool  # DP prefill balancing holds new prefills back this step


class BudgetMismatch(AssertionError):
    """What vLLM gave its running requests differs from the plugin's mirror of its arithmetic:
    the plan was made for a budget that was not there (a vLLM change to port)."""


class PackingRequestQueue(internal.RequestQueue):
    """vLLM's waiting queue, ordered by the packing policy instead of arrival."""

    def __init__(self, config: PrepackConfig, policy, cached_tokens=None, kv_blocks=None,
                 vllm_skips=None) -> None:
        self._set = config.waiting_set()
        # requests vLLM's loop passes over for their status (a grammar still compiling), by id:
        # kept out of the plan until `vllm_skips` (vLLM's check, request -> bool; None: none
        # is) lets them go. Planned, each would hold budget that vLLM then fills past the plan.
        self._vllm_skips = vllm_skips
        self._parked: dict[str, Request] = {}
        self._by_priority = policy == internal.SchedulingPolicy.PRIORITY
        self._cached_tokens = cached_tokens  # request -> tokens a prefix-cache hit would skip
        self._kv_blocks = kv_blocks  # touchpoints.KVBlocks, None: KV blocks not tracked
        # prefix caching: waiting requests by their first block, and the blocks of requests
        # admitted last step (their siblings may hit the cache now)
        self._groups: dict[object, set[str]] = {}
        self._refreshed: set = set()  # groups looked up again already (once per group)
        self._to_refresh: deque[str] = deque()  # request ids to look up, REFRESH_PER_STEP a step
        # deadlines of requests vLLM took from this queue, for their re-entry (priority policy)
        self._dues: OrderedDict[str, float] = OrderedDict()
        # the step's plan, its entries in order: peeks and pops walk it, where a lookup a peek
        # in a dict of 100k would pay its cache misses alone between vLLM's work on each request
        self._planned: list[Entry] = []
        self._cursor = 0
        self._step = 0
        self._now = time.time()

    # ---- the per-step plan ------------------------------------------------------------------

    def begin_step(self, limits: StepLimits, step: int) -> Plan:
        self._step, self._now = step, time.time()
        if self._parked:
            self._unpark()
        self._refresh_cached()
        plan = self._set.plan(limits, step, self._now)
        self._planned = plan.entries
        if self._set.stop is not None:  # offered past the plan: it does not fit, vLLM stops
            self._planned.append(self._set.stop)
        self._cursor = 0
        return plan

    def end_step(self) -> None:
        self._planned, self._cursor = [], 0

    def _next(self) -> Entry:
        """The plan's next request still waiting (IndexError where none is): one that left
        (popped, aborted) has let go of its request."""
        planned = self._planned
        while self._cursor < len(planned):
            entry = planned[self._cursor]
            if entry.item is not None:
                return entry
            self._cursor += 1
        # Past the plan (vLLM found more room than estimated): the policy's next choice.
        return self._set.entries[self._set.first(self._step, self._now)]

    def _park(self, request: Request) -> bool:
        """Keep `request` out of the plan if vLLM would pass it over now."""
        if self._vllm_skips is None or not self._vllm_skips(request):
            return False
        self._parked[request.request_id] = request
        return True

    def _unpark(self) -> None:
        """The parked requests vLLM would now take join the plan as arrivals of this step.
        Not at the front, where vLLM's own queue keeps a request it passed over: there a long
        one would stop a step of whole prompts, or wait for its KV blocks with every request
        behind it, as in vLLM (vllm#31731); it was never waiting for the scheduler before."""
        ready = [request for request in self._parked.values() if not self._vllm_skips(request)]
        for request in ready:
            del self._parked[request.request_id]
            self._admit(request)

    def _unparked(self, request: Request) -> bool:
        """Out of the parked requests, if it is one (aborted, or its grammar failed)."""
        return bool(self._parked) and self._parked.pop(request.request_id, None) is not None

    def _refresh_cached(self) -> None:
        """The first admission from a group of requests that share a first block cached that
        prefix: the others are looked up again, REFRESH_PER_STEP a step (O(1) per request)."""
        for _ in range(min(REFRESH_PER_STEP, len(self._to_refresh))):
            entry = self._set.entries.get(self._to_refresh.popleft())
            request = entry.item if entry is not None else None
            if request is not None and request.num_computed_tokens == 0:
                uncached = request.num_tokens - self._cached_tokens(request)
                self._set.resize(request.request_id, uncached, self._blocks(request, uncached))

    def _group(self, request: Request):
        if self._cached_tokens is None or not request.block_hashes:
            return None
        return request.block_hashes[0]

    def _leave_group(self, request: Request, admitted: bool) -> None:
        group = self._group(request)
        if group is None:
            return
        members = self._groups.get(group)
        if members is not None:
            members.discard(request.request_id)
            if not members:
                del self._groups[group]
                self._refreshed.discard(group)
            elif admitted and group not in self._refreshed:
                self._refreshed.add(group)
                self._to_refresh.extend(members)

    # ---- RequestQueue -----------------------------------------------------------------------

    def _blocks(self, request: Request, uncached: int) -> int:
        return 0 if self._kv_blocks is None else self._kv_blocks.to_admit(request.num_tokens, uncached)

    def _entry(self, request: Request) -> Entry:
        lora = request.lora_request
        length = request.num_tokens - request.num_computed_tokens
        if request.num_computed_tokens == 0 and self._cached_tokens is not None:
            length -= self._cached_tokens(request)
        return Entry(
            key=request.request_id,
            length=length,
            blocks=self._blocks(request, length),
            priority=request.priority if self._by_priority else 0,
            step=self._step,
            time=request.arrival_time,
            group=lora.lora_int_id if lora is not None and lora.lora_int_id > 0 else None,
            item=request,
        )

    def add_request(self, request: Request) -> None:
        if not self._park(request):
            self._admit(request)

    def _admit(self, request: Request) -> None:
        self._set.add(self._entry(request))
        self._join_group(request)

    @property
    def tokens(self) -> int:
        """Prompt tokens waiting to be planned (less what the prefix cache holds, as ordered
        by; not the parked requests')."""
        return self._set.tokens

    @property
    def parked_tokens(self) -> int:
        """Prompt tokens of the parked requests (a few, while their grammars compile)."""
        if not self._parked:
            return 0
        return sum(r.num_tokens - r.num_computed_tokens for r in self._parked.values())

    def _join_group(self, request: Request) -> None:
        group = self._group(request)
        if group is not None:
            self._groups.setdefault(group, set()).add(request.request_id)

    def prepend_request(self, request: Request) -> None:
        self.prepend_requests((request,))

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        requests = [r for r in requests if not self._park(r)]
        for request in requests:
            self._join_group(request)
        if self._by_priority:
            # vLLM's priority queue has no front: it re-inserts by (priority, arrival). These
            # requests (preempted, or skipped this step) come back overdue with the deadline
            # they had, so they go first within their level, in deadline order.
            for request in requests:
                due = self._dues.pop(request.request_id, self._step)
                self._set.add(self._entry(request), due=min(due, self._step))
        else:
            # Same front order as FCFSRequestQueue.prepend_requests (deque.extendleft).
            self._set.pin([self._entry(r) for r in requests[::-1]])

    def peek_request(self) -> Request:
        return self._next().item

    def pop_request(self) -> Request:
        entry = self._next()
        if self._by_priority and not entry.pinned:  # its deadline, before removal clears it
            self._dues[entry.key] = entry.due
            if len(self._dues) > MAX_REMEMBERED_DEADLINES:
                self._dues.popitem(last=False)
        request = self._remove(entry.key)
        if self._cached_tokens is not None:
            self._leave_group(request, admitted=True)
        return request

    def _remove(self, key: str) -> Request:
        """Out of the policy, its request let go: the removed entry may stay referenced a
        while (a stale row of an admission order), the request must not."""
        entry = self._set.remove(key)
        request, entry.item = entry.item, None
        return request

    def remove_request(self, request: Request) -> None:
        if self._unparked(request):
            return
        self._remove(request.request_id)
        self._leave_group(request, admitted=False)

    def remove_requests(self, requests: Iterable[Request]) -> None:
        # vLLM removes aborted requests from every waiting queue: absent ones are fine.
        for request in requests:
            if self._unparked(request):
                continue
            if request.request_id in self._set:
                self._remove(request.request_id)
                self._leave_group(request, admitted=False)

    def __bool__(self) -> bool:
        """Whether vLLM's loop has a request to take: not the parked ones (vLLM's only truth
        test of its waiting queue is that loop's; its counts take ``len``)."""
        return bool(self._set.entries)

    def __len__(self) -> int:
        return len(self._set.entries) + len(self._parked)

    def __iter__(self) -> Iterator[Request]:
        yield from (self._set.entries[key].item for key in self._set)
        yield from self._parked.values()


@dataclass
class StepRecord:
    """What the plugin planned and what vLLM then scheduled, for one step."""

    step: int
    budget: int  # tokens left for waiting requests after running ones
    waiting: int  # requests in vLLM's waiting queue when the step was planned (parked ones too)
    planned: Plan
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
    budget_checks: int = 0  # steps whose running-phase mirror was checked against vLLM
    last: StepRecord | None = None
    history: list[StepRecord] = field(default_factory=list)
    keep_history: bool = False


class PrepackScheduler(internal.Scheduler):
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
        if self.prepack_config.may_starve:
            warnings.warn(f"additional_config[{CONFIG_KEY!r}] turns every aging bound off "
                          "(aging_steps, aging_seconds, aging_drain_factor): shortest-first then "
                          "holds a long prompt for as long as shorter ones keep arriving",
                          StarvationWarning, stacklevel=2)
        supported = check_vllm_version()
        super().__init__(vllm_config, *args, **kwargs)
        missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(self, name)]
        if missing:
            raise RuntimeError(
                f"vllm-prepack was checked on vLLM {', '.join(TESTED_VLLM)}; this vLLM's "
                f"Scheduler has no {', '.join(missing)} (see vllm_prepack/touchpoints.py)"
            )
        check_waiting_order(self)
        assert not self.waiting, "the waiting queue is swapped before any request arrives"
        cached = ((lambda request: cached_prefix_tokens(self, request))
                  if vllm_config.cache_config.enable_prefix_caching else None)
        self._kv_blocks = kv_block_accounting(self)
        self._cache_tokens = kv_cache_tokens(self, self._kv_blocks)  # for the load report
        self.waiting = PackingRequestQueue(self.prepack_config, self.policy, cached, self._kv_blocks,
                                           vllm_skips=lambda request: passed_over(self, request))
        spec = vllm_config.speculative_config
        self._draft_slots = spec.max_num_new_slots_for_drafting if spec is not None else 0
        self.prepack_stats = PrepackStats()
        # check the running-budget mirror against vLLM every step (tests turn it on everywhere)
        self.verify_budget = self.prepack_config.debug_layout or not supported
        self._iteration = None  # this step's context/generation split, until make_stats takes it
        self._capture_sizes = capture_sizes(vllm_config) if self.prepack_config.cuda_graph_topup else ()
        self.step_cost_model = self.prepack_config.step_cost_model(self.max_num_scheduled_tokens)
        self._publisher = None
        self._reports = 0
        self._arrived = 0  # new requests taken, into either waiting queue (the load report)
        self._newest_arrival = 0.0  # the newest one's arrival time
        if self.prepack_config.load_endpoint:
            from vllm_prepack.load_channel import LoadPublisher

            self._publisher = LoadPublisher(self.prepack_config.load_endpoint)
            # idle and up: routers hear it (and its budget) before its first request
            self._publisher.publish(self.load_report())
        self.prepack_clock = time.perf_counter  # step times (the engine-free bench sets its clock)
        self._last_step_end: float | None = None  # when the last busy step ended

    def add_request(self, request) -> None:
        """vLLM's, counting new requests for the load report (the token router drops its
        charges by this count; a request with n samples arrives as n): each new request id
        once, whichever of vLLM's queues it enters, and not a streaming session's next input,
        which comes under its old id. An engine that was idle (its last request ended by an
        abort, a stop string, after the step's update) times no step from before."""
        new = request.request_id not in self.requests
        if not self.has_unfinished_requests():  # idle since the last step: not timed from it
            self._last_step_end = None
        super().add_request(request)
        if new:
            self._arrived += 1
            self._newest_arrival = max(self._newest_arrival, request.arrival_time)

    def schedule(self, *args, **kwargs):
        started = time.perf_counter()
        waiting = len(self.waiting)
        throttle = kwargs.get("throttle_prefills", args[0] if args else False)
        capacity = self.max_num_scheduled_tokens
        probe = self._probe_tokens()
        with token_budget_cap(self, probe):
            phase = self._running_phase(throttle)
            limits = self._step_limits(phase, capacity, probe is not None)
            planned = self.waiting.begin_step(limits, self.current_step + 1)
            plan_seconds = time.perf_counter() - started
            try:
                output = super().schedule(*args, **kwargs)
            finally:
                self.waiting.end_step()
        self._record(output, limits, planned, waiting, plan_seconds)
        if self._publisher is not None:
            self._publisher.publish(self.load_report(output.total_num_scheduled_tokens,
                                                     len(output.num_scheduled_tokens)))
        if self.verify_budget:
            self._check_running(phase.tokens, output)
        if self.prepack_config.debug_layout:
            # the model-runner hook checks the forward against this (same object in-process;
            # pickled with the SchedulerOutput to workers)
            attach_plan(output, {p.key: p.tokens for p in planned})
        if self.prepack_config.record_layout:  # layout_report shows the step cost in force
            attach_step_cost(output, self.step_cost_model.report())
        if self.log_stats:
            self._iteration = internal.compute_iteration_details(output)
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        """vLLM's update, then the step's time for the step-cost model: from the end of the
        previous busy step to the end of this one, the whole iteration as the engine runs it
        (scheduling, the forward, this update, the engine loop). A step that began after the
        engine idled (no unfinished requests) is not measured. Not ``has_requests()``: an
        engine its caller steps (``LLM.generate`` in-process) ends a job with finished
        requests still to clear, and the next job's first step would read the time between
        the jobs (in the bench, the other engines' runs: seconds, read as one step)."""
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        now = self.prepack_clock()
        tokens = scheduler_output.total_num_scheduled_tokens
        if self._last_step_end is not None and tokens > 0:
            model = self.step_cost_model
            model.observe(tokens, len(scheduler_output.num_scheduled_tokens), now - self._last_step_end)
            if model.steps == MIN_STEPS or model.steps % LOG_COST_EVERY == 0:
                logger.debug("step cost: %s", model.report())
        busy = self.has_unfinished_requests()
        self._last_step_end = now if busy else None
        if self._publisher is not None and not busy:  # idle now: no step will report it
            self._publisher.publish(self.load_report())
        return outputs

    def _probe_tokens(self) -> int | None:
        """The step-cost model's probe, where its answer can change the schedule: whole
        prompts (with chunked prefill every step of a backlog is full whatever the order, and
        packing is off) and a deep waiting backlog (``cost.PROBE_BACKLOG_STEPS``)."""
        if self.scheduler_config.enable_chunked_prefill:
            return None
        return self.step_cost_model.probe_tokens(self.waiting.tokens)

    def make_stats(self, *args, **kwargs):
        """vLLM's stats, plus this step's context/generation split for the Prometheus logger
        (vLLM fills it itself only with enable_logging_iteration_details)."""
        stats = super().make_stats(*args, **kwargs)
        details, self._iteration = self._iteration, None  # once per step: no double counting
        if stats is not None and stats.iteration_details is None and details is not None:
            stats.iteration_details = internal.SchedulerIterationDetails(
                iteration_index=self.current_step,
                num_ctx_requests=details.num_ctx_requests,
                num_ctx_tokens=details.num_ctx_tokens,
                num_generation_requests=details.num_generation_requests,
                num_generation_tokens=details.num_generation_tokens,
                elapsed_ms=self._step_ms(),
            )
        return stats

    def load_report(self, step_tokens: int = 0, step_seqs: int = 0) -> LoadReport:
        """This replica's load once the step just scheduled (of `step_tokens` over `step_seqs`
        requests) has run, for the token router, with that step's time as the step-cost model
        predicts it once it has measured steps (the router counts the part still to run)."""
        prefill, decoding = running_load(self)
        self._reports += 1
        model = self.step_cost_model
        seconds = (model.current.seconds(step_tokens, step_seqs)
                   if step_tokens and model.steps >= MIN_STEPS else 0.0)
        return LoadReport(
            seq=self._reports, time=time.time(),
            waiting_tokens=self.waiting.tokens + self.waiting.parked_tokens,
            prefill_tokens=prefill, decoding=decoding, budget=self.max_num_scheduled_tokens,
            newest_arrival=self._newest_arrival,
            requests=len(self.waiting) + len(self.kv_holding_waiting) + len(self.running),
            arrived=self._arrived,
            step_tokens=step_tokens, step_seconds=seconds, cache_tokens=self._cache_tokens)

    def _step_ms(self) -> float:
        """This step's time so far (the stats of a step are made at its end), 0 when unmeasured:
        the Prometheus logger fits the same step-cost model to it."""
        if self._last_step_end is None:
            return 0.0
        return 1e3 * (self.prepack_clock() - self._last_step_end)

    # ---- mirrors of vLLM's arithmetic -------------------------------------------------------

    def _step_limits(self, phase: _RunningPhase, capacity: int, probe: bool = False) -> StepLimits:
        """What vLLM's waiting phase will have, after running requests and the requests
        already holding KV blocks (drained first); `capacity`: a full step's tokens (a probe
        step's budget is lower)."""
        used = sum(phase.tokens.values())
        budget = self.max_num_scheduled_tokens - used
        if self._pause_state != internal.PauseState.UNPAUSED or phase.defer_prefills:
            budget = 0  # PAUSED_NEW admits only requests holding KV blocks; deferred: none
        budget -= self._kv_holding_tokens(min(budget, phase.input_left - self._draft_slots))
        seats = self.max_num_active_reqs - len(self.running) - self.num_waiting_for_streaming_input
        free_blocks, watermark = None, 0
        if self._kv_blocks is not None:
            free_blocks, watermark = free_kv_blocks(self)
            free_blocks -= sum(self._kv_blocks.to_extend(self.requests[rid].num_computed_tokens, n)
                               for rid, n in phase.tokens.items())
            most = self._kv_blocks.most_to_admit(max(0, budget), max(0, min(seats, budget)),
                                                 self.max_model_len)
            if free_blocks >= most + watermark:
                free_blocks = None  # no plan can run short of blocks: none checked per request
        groups: frozenset = frozenset()
        max_groups = None
        if self.lora_config:
            max_groups = self.lora_config.max_loras
            groups = active_adapters(self, phase.tokens)
        return StepLimits(
            budget=budget,
            seats=seats,
            chunked_prefill=bool(self.scheduler_config.enable_chunked_prefill),
            min_chunk_tokens=self.prepack_config.min_chunk_tokens,
            capture_sizes=self._capture_sizes,
            used_tokens=used,
            groups=groups,
            max_groups=max_groups,
            input_budget=phase.input_left,
            overhead=self._draft_slots,
            capacity=capacity,
            cost=self.step_cost_model.current,
            share_sd=self.step_cost_model.fitted_share_sd(),
            cost_learning=self.step_cost_model.learning,
            free_blocks=free_blocks,
            watermark_blocks=watermark,
            running=bool(self.running),
            probe=probe,
        )

    def _kv_holding_tokens(self, budget: int) -> int:
        """vLLM drains ``kv_holding_waiting`` (requests that hold KV blocks) before ``waiting``,
        first come first served, passing over blocked ones: the tokens it will take. One that
        does not fit takes the rest (chunked prefill) or stops the step (whole prompts)."""
        taken = 0
        if not self.kv_holding_waiting:  # mostly empty: a truth test, no iterator
            return taken
        for request in self.kv_holding_waiting:
            if self._is_blocked_waiting_status(request.status):
                continue
            tokens = request.num_tokens - request.num_computed_tokens
            if tokens > budget - taken:
                return budget  # chunked: it takes the rest; whole prompts: vLLM stops there
            taken += tokens
        return taken

    def _running_phase(self, throttle_prefills: bool = False) -> _RunningPhase:
        """Tokens the running phase of the coming schedule() gives each running request, and
        the input budget it leaves (vllm/v1/core/sched/scheduler.py, the same in 0.31-0.34 but
        for when prefills are held back, touchpoints.prefills_deferred, and the long-prefill
        cap, touchpoints.long_prefill_threshold; checked against vLLM every step with
        debug_layout)."""
        budget = self.max_num_scheduled_tokens
        input_left = self.scheduler_config.max_num_batched_tokens
        draft_slots = self._draft_slots
        threshold = long_prefill_threshold(self)
        if threshold > 0:  # the counts only where a threshold is set: a call the step saved
            requests = sum(self.get_request_counts())
            if requests <= 1:
                threshold = 0
            elif self.adaptive_long_prefill_threshold:
                threshold = max(threshold, input_left // requests)
        defer_prefills = prefills_deferred(self, throttle_prefills)
        phase = _RunningPhase({}, input_left, defer_prefills)
        if self._pause_state == internal.PauseState.PAUSED_ALL:
            return phase
        step = self.current_step + 1
        used = 0
        for request in self.running:
            if used >= budget or phase.input_left <= draft_slots:
                break
            placeholders = request.num_output_placeholders
            if (
                placeholders > 0
                and request.num_computed_tokens + 2 - placeholders
                >= request.num_prompt_tokens + request.max_tokens
            ):
                continue
            if step < request.next_decode_eligible_step:
                continue
            if defer_prefills and request.is_prefill_chunk:
                continue
            tokens = request.num_tokens_with_spec + placeholders - request.num_computed_tokens
            if 0 < threshold < tokens:
                tokens = threshold
            tokens = min(
                tokens,
                budget - used,
                phase.input_left - draft_slots,
                self.max_model_len - request.num_computed_tokens - self.num_sampled_tokens_per_step,
            )
            if tokens > 0:
                phase.tokens[request.request_id] = tokens
                used += tokens
                phase.input_left -= tokens + draft_slots
        return phase

    def _check_running(self, predicted: dict[str, int], output) -> None:
        """Fail loudly where vLLM gave running requests other tokens than the plan assumed.
        Steps that preempted are skipped: vLLM then gives the freed budget to others."""
        if output.preempted_req_ids:
            return
        actual = {rid: output.num_scheduled_tokens.get(rid, 0) for rid in predicted}
        actual.update({r.request_id: output.num_scheduled_tokens[r.request_id]
                       for r in self.running if r.request_id in output.num_scheduled_tokens
                       and r.request_id not in predicted
                       and r.request_id not in self.prepack_stats.last.scheduled_new})
        if actual != predicted:
            diff = {rid: (predicted.get(rid, 0), actual.get(rid, 0))
                    for rid in set(actual) | set(predicted) if predicted.get(rid, 0) != actual.get(rid, 0)}
            raise BudgetMismatch(
                f"step {self.current_step}: running requests got other tokens than the plugin "
                f"planned for (request: (planned, scheduled)) {dict(sorted(diff.items())[:5])}"
            )
        self.prepack_stats.budget_checks += 1

    def _record(self, output, limits: StepLimits, planned: Plan, waiting: int, seconds: float):
        stats = self.prepack_stats
        new_ids = admitted_req_ids(output)
        stats.steps += 1
        stats.plan_seconds += seconds
        stats.admitted += len(new_ids)
        stats.admitted_as_planned += len({e.key for e in planned.codes}.intersection(new_ids))
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


class PrepackAsyncScheduler(PrepackScheduler, internal.AsyncScheduler):
    """The packing policy over vLLM's ``AsyncScheduler`` (the GPU default)."""
