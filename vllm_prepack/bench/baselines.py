"""Orderings from the field, re-implemented as vLLM schedulers for side-by-side benchmarks.

SGLang's ``schedule_policy.py`` orders its waiting queue by shortest prefill first (the prompt
length its radix cache does not hold; here vLLM's own prefix lookup, as the plugin uses) or by
highest response ratio next (HRRN: (wait + service) / service). Here each is a ``RequestQueue`` sorted once per
step, swapped into vLLM's own ``Scheduler``, so every ordering is admitted by the same mechanism
(budget, KV allocation, head-of-line stop with chunked prefill off) as FCFS and the plugin.
Wait and service are counted in steps (service = uncached prompt tokens / step budget), so the
engine-free benchmarks, whose steps take microseconds, rank requests as a GPU engine would.
They extend the sync ``Scheduler``: compare them with async scheduling off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from vllm_prepack.cost import StepCost
from vllm_prepack.packing import pack_rows
from vllm_prepack.touchpoints import cached_prefix_tokens, internal

if TYPE_CHECKING:  # annotations only
    from vllm.v1.request import Request


class _SortedQueue(internal.RequestQueue):
    """A waiting queue re-sorted by `key` at the start of every step (kept reversed, so the
    next request pops off the end); prepended requests (preempted or skipped) go to the
    front, as in vLLM's FCFS queue."""

    def __init__(self, key) -> None:
        self._key = key
        self._front: list[Request] = []
        self._rest: list[Request] = []
        self.arrival_step: dict[str, int] = {}
        self.step = 0

    def sort(self, step: int) -> None:
        self.step = step
        self._rest.sort(key=self._key, reverse=True)

    def rest(self) -> list[Request]:
        """The requests behind the prepended ones, in the order they pop."""
        return self._rest[::-1]

    def arrange(self, order: list[Request]) -> None:
        """Put the rest in this order (the first pops next)."""
        self._rest = order[::-1]

    def add_request(self, request: Request) -> None:
        self.arrival_step.setdefault(request.request_id, self.step)
        self._rest.append(request)

    def prepend_request(self, request: Request) -> None:
        self._front.insert(0, request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        self._front[:0] = list(requests)

    def peek_request(self) -> Request:
        if self._front:
            return self._front[0]
        if self._rest:
            return self._rest[-1]
        raise IndexError("empty queue")

    def pop_request(self) -> Request:
        request = self._front.pop(0) if self._front else self._rest.pop()
        self.arrival_step.pop(request.request_id, None)
        return request

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = {r.request_id for r in requests}
        self._front = [r for r in self._front if r.request_id not in gone]
        self._rest = [r for r in self._rest if r.request_id not in gone]
        for rid in gone:
            self.arrival_step.pop(rid, None)

    def __bool__(self) -> bool:
        return bool(self._front or self._rest)

    def __len__(self) -> int:
        return len(self._front) + len(self._rest)

    def __iter__(self) -> Iterator[Request]:
        yield from self._front
        yield from reversed(self._rest)


class _OrderedScheduler(internal.Scheduler):
    def _order_key(self, request: Request):
        raise NotImplementedError

    def _remaining(self, request: Request) -> int:
        """Prompt tokens still to compute, less a prefix-cache hit (vLLM's lookup)."""
        tokens = request.num_tokens - request.num_computed_tokens
        if request.num_computed_tokens == 0 and self.cache_config.enable_prefix_caching:
            tokens -= cached_prefix_tokens(self, request)
        return max(1, tokens)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting = _SortedQueue(self._order_key)

    def schedule(self, *args, **kwargs):
        self.waiting.sort(self.current_step + 1)
        self._arrange()
        return super().schedule(*args, **kwargs)

    def _arrange(self) -> None:
        """Reorder what the sort left (a queue order that no per-request key gives)."""


class SPFScheduler(_OrderedScheduler):
    """Shortest (remaining) prefill first, ties by arrival."""

    def _order_key(self, request: Request):
        return (self._remaining(request), request.arrival_time)


class HRRNScheduler(_OrderedScheduler):
    """Highest response ratio next: (wait + service) / service, in steps."""

    def _order_key(self, request: Request):
        service = self._remaining(request) / self.max_num_scheduled_tokens
        wait = self.waiting.step - self.waiting.arrival_step.get(request.request_id, self.waiting.step)
        return (-(wait + service) / service, request.arrival_time)


class FFDScheduler(_OrderedScheduler):
    """Offline first-fit decreasing, then shortest first over the bins: every step the waiting
    prompts are packed into bins of the step budget (fewest steps), and the bins go in Smith's
    order in seconds, most requests per second of step first (with a step's fixed cost a near
    0 that is shortest first; with a large a, the fullest bins). The step cost is given
    (``step_cost``, the simulated engine's): a bound on what packing alone can reach, not an
    online policy."""

    step_cost: StepCost | None = None  # None: every step costs the same

    def _order_key(self, request: Request):
        return request.arrival_time

    def _arrange(self) -> None:
        requests = self.waiting.rest()
        if requests:
            lengths = [min(self._remaining(r), self.max_num_scheduled_tokens) for r in requests]
            bins = pack_rows(lengths, self.max_num_scheduled_tokens)

            def density(members: list[int]) -> float:
                tokens = sum(lengths[i] for i in members)
                seconds = 1.0 if self.step_cost is None else self.step_cost.seconds(tokens, len(members))
                return len(members) / seconds

            bins.sort(key=lambda members: -density(members))
            self.waiting.arrange([requests[i] for members in bins
                                  for i in sorted(members, key=lambda i: lengths[i])])
