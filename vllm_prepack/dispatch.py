"""Token-aware dispatch of a streamed batch job: pure Python, no Ray, no vLLM.

Requests enter a bounded window as the input is read; a replica that is free takes a work unit
worth about ``unit_tokens`` tokens (prompt + expected output), so work goes wherever there is
capacity and replicas end together without a plan made up front. Every step is a heap push or
pop, so a job of n requests costs O(n log W) for a window of W requests, whatever n is; ``ops``
counts those heap operations (the scale test checks the bound by counting, not timing).

Unit size: full while input is still arriving. Once the reader is exhausted the whole rest of
the job is in the window, and units shrink to what is left / (2 x live replicas), never below
unit_tokens / 8 (guided self-scheduling): the last units are small, so no replica is left with a
long one while the others idle.

``order``: "longest" hands out the heaviest requests first (LPT over the window: units are
homogeneous, the job ends on short requests); "arrival" keeps input order (units mix lengths,
which leaves the in-engine packer short fillers). ``vllm-prepack bench ray`` measures both.

``owner`` (line -> replica) pins requests to replicas: the static baselines (row shards,
round-robin) that the bench compares against. A dead replica's requests, pinned or in flight,
go to a shared pool that every live replica takes from.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

ORDERS = ("longest", "arrival")


@dataclass
class Unit:
    id: int
    replica: int
    entries: list[tuple]  # heap entries: (key, seq, line, tokens, payload)

    @property
    def lines(self) -> list[int]:
        return [e[2] for e in self.entries]

    @property
    def payloads(self) -> list:
        return [e[4] for e in self.entries]

    @property
    def tokens(self) -> float:
        return sum(e[3] for e in self.entries)


class Dispatcher:
    def __init__(self, replicas: int, unit_tokens: float, order: str = "longest",
                 owner: Callable[[int], int] | None = None):
        if replicas < 1:
            raise ValueError("need at least one replica")
        if unit_tokens <= 0:
            raise ValueError("unit_tokens must be positive")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
        self.unit_tokens = float(unit_tokens)
        self.order = order
        self.owner = owner
        self.alive = set(range(replicas))
        self.heaps: dict[int | None, list] = {None: []}  # replica (pinned) or None (shared)
        self.size = 0  # requests waiting in the window
        self.tokens = 0.0  # their tokens
        self.exhausted = False  # the reader has nothing more
        self.inflight: dict[int, Unit] = {}
        self._pending: dict[int, int] = {}  # replica -> its units in flight
        self.ops = 0
        self._seq = 0
        self._units = 0

    def add(self, lines: list[int], tokens: list[float], payloads: list) -> None:
        """A block of requests from the reader (parallel lists)."""
        seqs = range(self._seq, self._seq + len(lines))
        self._seq += len(lines)
        keys = [-t for t in tokens] if self.order == "longest" else seqs
        entries = zip(keys, seqs, lines, tokens, payloads)
        if self.owner is not None:
            for entry in entries:
                self._push(self.owner(entry[2]), entry)
            return
        heap, push = self.heaps[None], heapq.heappush
        for entry in entries:
            push(heap, entry)
        self.size += len(lines)
        self.tokens += sum(tokens)
        self.ops += len(lines)

    def _push(self, where: int | None, entry: tuple) -> None:
        if where is not None and where not in self.alive:
            where = None
        heapq.heappush(self.heaps.setdefault(where, []), entry)
        self.size += 1
        self.tokens += entry[3]
        self.ops += 1

    def budget(self) -> float:
        if not self.exhausted:
            return self.unit_tokens
        share = self.tokens / (2 * max(1, len(self.alive)))
        return min(self.unit_tokens, max(self.unit_tokens / 8, share))

    def take(self, replica: int) -> Unit | None:
        """The next unit for a free replica: its pinned requests first, then the shared pool."""
        if replica not in self.alive:
            raise ValueError(f"replica {replica} is not alive")
        budget, picked, tokens, pop = self.budget(), [], 0.0, heapq.heappop
        for heap in (self.heaps.get(replica), self.heaps[None]):
            while heap and (not picked or tokens + heap[0][3] <= budget):
                entry = pop(heap)
                picked.append(entry)
                tokens += entry[3]
            if picked:
                break
        if not picked:
            return None
        self.ops += len(picked)
        self.size -= len(picked)
        self.tokens -= tokens
        unit = Unit(self._units, replica, picked)
        self._units += 1
        self.inflight[unit.id] = unit
        self._pending[replica] = self._pending.get(replica, 0) + 1
        return unit

    def done(self, unit_id: int) -> Unit:
        unit = self.inflight.pop(unit_id)
        self._pending[unit.replica] -= 1
        return unit

    def lost(self, replica: int) -> int:
        """A replica died: its units in flight and its pinned requests go back to the shared
        pool. Returns how many units were requeued."""
        self.alive.discard(replica)
        if not self.alive:
            raise RuntimeError("every replica died")
        units = [u for u in self.inflight.values() if u.replica == replica]
        self._pending.pop(replica, None)
        for unit in units:
            self.inflight.pop(unit.id)
            for entry in unit.entries:
                self._push(None, entry)
        for entry in self.heaps.pop(replica, []):
            self.size -= 1
            self.tokens -= entry[3]
            self._push(None, entry)
        return len(units)

    def pending(self, replica: int) -> int:
        return self._pending.get(replica, 0)

    def pinned_waiting(self) -> list[int]:
        """Live replicas with pinned requests in the window. A full window of lines pinned to a
        replica with nothing in flight stops the reader; only a top-up of that replica (not of
        the one that just finished) frees it."""
        return [r for r, heap in self.heaps.items() if r is not None and heap]

    @property
    def finished(self) -> bool:
        return self.exhausted and self.size == 0 and not self.inflight


def balanced_batches(weights: list[float], batch_size: int) -> list[list[int]]:
    """Indices of `weights` in row batches of exactly `batch_size` (the last may be short) whose
    weight sums are close: heaviest first to the lightest batch with room (LPT with a row cap),
    O(n log n). This turns an engine's row batching into token batching."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(weights)
    count = -(-n // batch_size)
    room = [batch_size] * count
    if count:
        room[-1] = n - (count - 1) * batch_size
    batches: list[list[int]] = [[] for _ in range(count)]
    heap = [(0.0, b) for b in range(count)]
    for i in sorted(range(n), key=lambda i: -weights[i]):
        load, b = heapq.heappop(heap)
        batches[b].append(i)
        room[b] -= 1
        if room[b]:
            heapq.heappush(heap, (load + weights[i], b))
    return batches
