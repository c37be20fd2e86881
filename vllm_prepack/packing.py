"""Packing policy and bin-packing algorithms: pure Python, no vLLM, no torch.

Everything the scheduler, the HF path and the Ray driver decide lives here, so that it can be
tested exhaustively (hypothesis) without an engine. The vLLM and HF layers only translate their
objects to and from the plain keys and lengths used here.

The per-step policy (``WaitingSet.plan``), for one priority level at a time:

(a) *pinned* requests (resumed after preemption, or deferred by vLLM) keep their place at the
    front; then the oldest request past the aging bound, then the other aged ones first-fit in
    age order (the bound: fixed steps or seconds, or relative to the queue's drain time);
(b) whole prompts, shortest remaining first (SPT: lowest mean time to first token);
(c) best-fit exchange: where the leftover cannot be chunked (chunked prefill off, or under
    min_chunk_tokens), the last picks (short ones, or aged ones after the oldest) are swapped
    for the longest whole prompt that fits the leftover they free (an aged pick only for another
    aged request), so steps stay full and long prompts are consumed steadily instead of piling
    up in a badly packed tail;
(d) only then, with chunked prefill on, a chunk of the next prompt (and, where CUDA graphs pad a
    step anyway, a chunk that fills exactly the padding gap).

A request that must go first but does not fit (chunked prefill off) stops the plan: letting
others overtake it would starve it, which is exactly what the aging bound forbids.
"""

from __future__ import annotations

import bisect
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from sortedcontainers import SortedList

Key = Hashable
AGED_PROBES = 16  # aged requests skipped per step before the first-fit scan gives up: O(1)


@dataclass(slots=True)
class Entry:
    """One waiting request as the policy sees it."""

    key: Key
    length: int  # tokens left to prefill
    priority: int = 0
    seq: int = 0  # admission order, assigned by WaitingSet
    step: int = 0  # scheduler step at admission (aging in steps)
    time: float = 0.0  # monotonic seconds at admission (aging in seconds)
    group: Hashable | None = None  # LoRA adapter (None: no adapter)
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Pick:
    key: Key
    tokens: int  # tokens planned this step (== entry.length unless chunked)
    reason: str  # "pinned" | "aged" | "short" | "fit" | "chunk" | "topup"

    @property
    def chunked(self) -> bool:
        return self.reason in ("chunk", "topup")


@dataclass(frozen=True, slots=True)
class StepLimits:
    """What one step may still take from the waiting set."""

    budget: int  # tokens left after running requests
    seats: int  # requests that may still start
    chunked_prefill: bool = True
    min_chunk_tokens: int = 0  # never start a chunk smaller than this (but see capture_sizes)
    capture_sizes: tuple[int, ...] = ()  # sorted CUDA-graph sizes; () when graphs are off
    used_tokens: int = 0  # tokens already scheduled this step (running requests)
    groups: frozenset = frozenset()  # LoRA ids already active this step
    max_groups: int | None = None  # max_loras; None: no limit


@dataclass(frozen=True, slots=True)
class AgingBound:
    """When a waiting request has waited long enough to go first. `drain_factor` makes the
    bound relative to the queue: a wait of drain_factor x the steps the waiting tokens need
    (what first-come-first-served would roughly make it wait), so it tightens under light
    load, where a fixed bound is far above any FCFS wait, and loosens under a deep backlog."""

    steps: int | None = None
    seconds: float | None = None
    drain_factor: float | None = None

    def expired(self, entry: Entry, step: int, now: float, drain_steps: float = 0.0) -> bool:
        waited = step - entry.step
        return (
            (self.steps is not None and waited >= self.steps)
            or (self.seconds is not None and now - entry.time >= self.seconds)
            or (self.drain_factor is not None and waited >= self.drain_factor * drain_steps)
        )


class _Level:
    """The waiting requests of one priority level, indexed three ways."""

    __slots__ = ("by_length", "fifo", "pinned")

    def __init__(self) -> None:
        self.by_length: SortedList = SortedList()  # (length, seq, key)
        self.fifo: OrderedDict[Key, Entry] = OrderedDict()  # admission order, unpinned only
        self.pinned: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self.fifo) + len(self.pinned)


class WaitingSet:
    """Waiting requests indexed by priority, remaining length and age.

    Adds and removals cost O(log n); ``plan`` costs O((k + swaps) log n) for k picks, so the
    policy scales to 100k waiting requests without re-sorting the queue every step.
    """

    def __init__(self, aging: AgingBound = AgingBound(), max_swaps: int = 4) -> None:
        self.aging = aging
        self.max_swaps = max_swaps
        self._entries: dict[Key, Entry] = {}
        self._levels: dict[int, _Level] = {}
        self._priorities: list[int] = []  # sorted keys of _levels
        self._seq = 0
        self._tokens = 0  # sum of waiting lengths
        self._step_tokens = 1  # the last plan's whole step budget (drain time = tokens / this)

    # ---- membership -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def add(self, entry: Entry) -> None:
        """Admit a request at the back (new arrivals)."""
        self._insert(entry, pinned=False)

    def pin(self, entries: Sequence[Entry]) -> None:
        """Put requests in front of their level, in the given order (resumed or deferred)."""
        for entry in reversed(entries):
            self._insert(entry, pinned=True)

    def _insert(self, entry: Entry, pinned: bool) -> None:
        if entry.key in self._entries:
            raise ValueError(f"request {entry.key!r} is already waiting")
        entry.length = max(1, entry.length)
        entry.pinned = pinned
        if not pinned:
            entry.seq = self._seq
            self._seq += 1
        level = self._levels.get(entry.priority)
        if level is None:
            level = self._levels[entry.priority] = _Level()
            bisect.insort(self._priorities, entry.priority)
        if pinned:
            level.pinned.appendleft(entry)
        else:
            level.fifo[entry.key] = entry
            level.by_length.add((entry.length, entry.seq, entry.key))
        self._entries[entry.key] = entry
        self._tokens += entry.length

    def remove(self, key: Key) -> Entry:
        entry = self._entries.pop(key)
        self._tokens -= entry.length
        level = self._levels[entry.priority]
        if entry.pinned:
            level.pinned.remove(entry)
        else:
            del level.fifo[key]
            level.by_length.remove((entry.length, entry.seq, key))
        if not level:
            del self._levels[entry.priority]
            self._priorities.remove(entry.priority)
        return entry

    def discard(self, key: Key) -> Entry | None:
        return self.remove(key) if key in self._entries else None

    # ---- order ------------------------------------------------------------------------------

    def first(self, step: int = 0, now: float = 0.0) -> Key:
        """The request the policy would start next with an unlimited budget."""
        if not self._entries:
            raise IndexError("no waiting requests")
        level = self._levels[self._priorities[0]]
        if level.pinned:
            return level.pinned[0].key
        oldest = next(iter(level.fifo.values()))
        if self.aging.expired(oldest, step, now, self.drain_steps()):
            return oldest.key
        return level.by_length[0][2]

    def __iter__(self) -> Iterator[Key]:
        """All waiting keys: by level, pinned first, then shortest first."""
        for priority in self._priorities:
            level = self._levels[priority]
            yield from (e.key for e in level.pinned)
            yield from (key for _, _, key in level.by_length)

    # ---- the per-step policy ----------------------------------------------------------------

    def drain_steps(self) -> float:
        """Steps the waiting tokens need at the last planned step budget."""
        return self._tokens / self._step_tokens

    def plan(self, limits: StepLimits, step: int = 0, now: float = 0.0) -> list[Pick]:
        """Choose this step's prefills. The waiting requests are not changed (the step budget
        is kept, for drain_steps)."""
        planner = _Planner(limits)
        self._step_tokens = max(1, limits.budget + limits.used_tokens)
        for priority in self._priorities:
            level = self._levels[priority]
            before = planner.whole_picks
            self._plan_level(level, planner, step, now)
            if planner.whole_picks - before < len(level):
                break  # strict priority: a lower level only gets what a level leaves whole
        planner.top_up()
        return planner.picks

    def _plan_level(self, level: _Level, p: _Planner, step: int, now: float) -> None:
        for entry in level.pinned:
            if not p.take_in_order(entry, "pinned"):
                return
        exchangeable: list[Entry] = []  # aged first-fit and short picks, in plan order
        self._take_aged(level, p, step, now, exchangeable)
        if p.blocked:
            return
        for _, _, key in level.by_length:
            if not p.has_room():
                break
            entry = level.fifo[key]
            if p.taken(key) or not p.group_ok(entry):
                continue
            if entry.length > p.left:
                break
            p.take(entry, "short")
            exchangeable.append(entry)
        self._exchange(level, p, exchangeable, step, now)
        p.chunk_next(level)

    def _take_aged(self, level: _Level, p: _Planner, step: int, now: float,
                   exchangeable: list[Entry]) -> None:
        """(a) Aged requests go first, oldest first: whole, else a chunk, else the step stops.
        With chunked prefill off, only the oldest may stop the step; the other aged ones follow
        first-fit in age order, so an all-aged backlog still packs.
        The head starts every step, so no wait exceeds the bound plus the requests older than it.
        """
        misses, drain = 0, self.drain_steps()
        for index, entry in enumerate(level.fifo.values()):
            if not self.aging.expired(entry, step, now, drain):
                return
            if index == 0 or p.limits.chunked_prefill:  # chunks pack aged FCFS perfectly
                if not p.take_in_order(entry, "aged"):
                    return
            elif not p.has_room():
                return
            elif entry.length <= p.left and p.group_ok(entry):
                p.take(entry, "aged")
                exchangeable.append(entry)
            else:
                misses += 1
                if misses > AGED_PROBES:
                    return

    def _exchange(self, level: _Level, p: _Planner, picks: list[Entry], step: int, now: float) -> None:
        """(c) best fit: swap the last exchangeable picks for longer prompts that fill the step;
        an aged pick only for another aged request, so no younger one overtakes it.

        Only where the leftover cannot become a chunk: a chunk fills it already, and an exchange
        would just delay a shorter prompt.
        """
        if p.limits.chunked_prefill and p.left >= max(1, p.limits.min_chunk_tokens):
            return
        for _ in range(self.max_swaps):
            if not picks or p.left == 0:
                return
            last = picks[-1]
            aged = p.reason(last.key) == "aged"
            best = self._longest_fitting(
                level, p, p.left + last.length, above=last.length,
                accept=(lambda e: self.aging.expired(e, step, now, self.drain_steps())) if aged else None,
            )
            if best is None:
                return
            picks.pop()
            p.untake(last)
            p.take(best, "aged" if aged else "fit")

    @staticmethod
    def _longest_fitting(level: _Level, p: _Planner, room: int, above: int,
                         accept=None) -> Entry | None:
        """Longest untaken prompt with above < length <= room (and `accept`ed),
        O(log n + skipped)."""
        index = level.by_length.bisect_right((room, float("inf"), None)) - 1
        probes = 0
        while index >= 0 and probes < 64:
            length, _, key = level.by_length[index]
            if length <= above:
                return None
            entry = level.fifo[key]
            if not p.taken(key) and p.group_ok(entry) and (accept is None or accept(entry)):
                return entry
            index -= 1
            probes += 1
        return None


class _Planner:
    """Mutable state of one step's plan: the picks and what is left."""

    def __init__(self, limits: StepLimits) -> None:
        self.limits = limits
        self.left = max(0, limits.budget)
        self.seats = max(0, limits.seats)
        self._picks: dict[Key, Pick] = {}  # in plan order
        self._group_counts: Counter = Counter()
        self._chunk_candidate: Entry | None = None
        self.blocked = False  # a must-go-first request did not fit: nothing may overtake it

    @property
    def picks(self) -> list[Pick]:
        return list(self._picks.values())

    def has_room(self) -> bool:
        return self.left > 0 and self.seats > 0

    def taken(self, key: Key) -> bool:
        return key in self._picks

    def reason(self, key: Key) -> str:
        return self._picks[key].reason

    @property
    def whole_picks(self) -> int:
        return sum(1 for pick in self._picks.values() if not pick.chunked)

    def group_ok(self, entry: Entry) -> bool:
        max_groups = self.limits.max_groups
        return (
            entry.group is None
            or max_groups is None
            or entry.group in self.limits.groups
            or self._group_counts[entry.group] > 0
            or len(self.limits.groups | {g for g, n in self._group_counts.items() if n}) < max_groups
        )

    def take(self, entry: Entry, reason: str, tokens: int | None = None) -> None:
        tokens = entry.length if tokens is None else tokens
        self._picks[entry.key] = Pick(entry.key, tokens, reason)
        self.left -= tokens
        self.seats -= 1
        if entry.group is not None:
            self._group_counts[entry.group] += 1

    def untake(self, entry: Entry) -> None:
        self.left += self._picks.pop(entry.key).tokens
        self.seats += 1
        if entry.group is not None:
            self._group_counts[entry.group] -= 1

    def take_in_order(self, entry: Entry, reason: str) -> bool:
        """A must-go-first request: whole, else a chunk, else the plan stops here."""
        if self.taken(entry.key):
            return True
        if not self.has_room() or not self.group_ok(entry):
            self.blocked = True
            return False
        if entry.length <= self.left:
            self.take(entry, reason)
            return True
        if self.limits.chunked_prefill and self.left >= self.limits.min_chunk_tokens:
            self.take(entry, "chunk", self.left)
        self.blocked = True
        return False

    def chunk_next(self, level: _Level) -> None:
        """(d) the shortest prompt that did not fit whole gets a chunk of what is left."""
        if not self.limits.chunked_prefill or not self.has_room():
            return
        for _, _, key in level.by_length:
            entry = level.fifo[key]
            if not self.taken(key) and self.group_ok(entry):
                if self.left >= max(1, self.limits.min_chunk_tokens):
                    self.take(entry, "chunk", self.left)
                else:
                    self._chunk_candidate = entry
                return

    def top_up(self) -> None:
        """Fill the gap up to the next CUDA-graph size: vLLM pads to it anyway."""
        entry = self._chunk_candidate
        if entry is None or not self.limits.capture_sizes or self.seats <= 0:
            return
        total = self.limits.used_tokens + (self.limits.budget - self.left)
        gap = min(padding_gap(total, self.limits.capture_sizes), self.left, entry.length)
        if gap > 0:
            self.take(entry, "topup", gap)


# ---- helpers shared by the scheduler, the HF path, the Ray driver and the benchmarks ---------


def padding_gap(tokens: int, capture_sizes: Sequence[int]) -> int:
    """Tokens a CUDA-graph replay pads a step of `tokens` with (0 when no graph fits)."""
    index = bisect.bisect_left(capture_sizes, tokens)
    return capture_sizes[index] - tokens if tokens > 0 and index < len(capture_sizes) else 0


def lower_bound_steps(lengths: Iterable[int], budget: int) -> int:
    """No schedule finishes the prefills of `lengths` in fewer steps of `budget` tokens."""
    if budget <= 0:
        raise ValueError("budget must be positive")
    return -(-sum(lengths) // budget)


def pack_rows(lengths: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` packed into rows of at most `capacity` tokens.

    With no capacity the longest length is used (the paper's choice: no row grows past the
    padded batch). Rows come out in decreasing fill; each row lists its indices longest first.
    O(n log n) with a sorted index of row gaps (best fit among rows that fit).
    """
    if not lengths:
        return []
    if any(n <= 0 for n in lengths):
        raise ValueError("every prompt needs at least one token")
    capacity = max(lengths) if capacity is None else capacity
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(
            f"prompt {too_long[0]} has {lengths[too_long[0]]} tokens, over the row capacity {capacity}"
        )
    rows: list[list[int]] = []
    gaps = SortedList()  # (gap, row index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = gaps.bisect_left((lengths[i], -1))
        if at < len(gaps):
            gap, row = gaps.pop(at)
        else:
            gap, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        gaps.add((gap - lengths[i], row))
    return rows


@dataclass(frozen=True)
class PackedLayout:
    """Where each prompt sits in the packed rows: the contract between packing and attention.

    rows[r] lists the prompt indices in row r, in placement order; place[i] = (row, start) of
    prompt i. Every row is `width` tokens; the tail after a row's prompts is padding, which
    forms its own sequence so that no real token ever attends to it.
    """

    lengths: tuple[int, ...]
    rows: tuple[tuple[int, ...], ...]
    place: tuple[tuple[int, int], ...]
    width: int

    @classmethod
    def build(cls, lengths: Sequence[int], capacity: int | None = None) -> PackedLayout:
        rows = pack_rows(lengths, capacity)
        place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
        width = 0
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                place[i] = (r, start)
                start += lengths[i]
            width = max(width, start)
        return cls(tuple(lengths), tuple(map(tuple, rows)), tuple(place), width)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padded_tokens(self) -> int:
        """Tokens computed by the packed forward (rows x width)."""
        return len(self.rows) * self.width

    def positions(self) -> list[list[int]]:
        """Position ids per row: restarting at 0 for each prompt and for the padding tail."""
        out = []
        for row in self.rows:
            pos = [p for i in row for p in range(self.lengths[i])]
            out.append(pos + list(range(self.width - len(pos))))
        return out

    def sequence_ids(self) -> list[list[int]]:
        """Sequence id per token (the prompt index; -1 for padding)."""
        return [
            [i for i in row for _ in range(self.lengths[i])]
            + [-1] * (self.width - sum(self.lengths[i] for i in row))
            for row in self.rows
        ]

    def cu_seqlens(self) -> list[int]:
        """Cumulative sequence boundaries of the rows laid end to end (varlen attention)."""
        bounds = [0]
        for row in self.rows:
            for i in row:
                bounds.append(bounds[-1] + self.lengths[i])
            pad = self.width - sum(self.lengths[i] for i in row)
            if pad:
                bounds.append(bounds[-1] + pad)
        return bounds
