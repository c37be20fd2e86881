"""The per-step packing policy over vLLM's waiting requests: pure Python, no vLLM, no torch.

The scheduler adapter (``scheduler.py``) translates vLLM requests into ``Entry``s and asks
``WaitingSet.plan`` which of them the coming step should start. Per priority level:

(a) *pinned* requests (resumed after preemption, or deferred by vLLM) keep their place at the
    front; then requests past their *deadline*, earliest deadline first (EDF). A deadline is
    fixed when a request arrives: a fixed number of steps, and/or `drain_factor` x the steps
    the queue it joined needs to drain (about what FCFS would make it wait). Fixed at arrival,
    it protects a request from later arrivals without turning a backlog that arrived together
    into FCFS once it has waited "long";
(b) whole prompts, shortest first (SPT: lowest mean time to first token);
(c) best-fit exchange: where the leftover cannot be chunked, the last picks are swapped for the
    longest whole prompt that fits the room they free (an aged pick only for another aged one);
(d) with chunked prefill, a chunk of the next prompt (and, where CUDA graphs pad a step anyway,
    a chunk that fills exactly the padding gap). With ``order`` "ratio", (b) and (d) go by
    response ratio (HRRN) instead of length, and (c) and the filler reserve are off.

Whole prompts only (chunked prefill off) adds a *filler reserve*. Shortest-first alone spends
every short prompt early, so a backlog ends with long prompts that pack badly (four 250-token
prompts in a 1024-token step, and nothing left to fill the rest). So while a backlog is deep, a
builder packs bins from the longest prompts down, filling each with the longest prompts that
fit (so the shortest stay free), and reserves their members. Shortest-first serves the free
prompts; once none is left, the reserved bins go, those that finish the most requests first
(Smith's rule). The builder works a few bins per step from the long end while shortest-first
eats from the short end, so the per-step cost stays O((k + bins) log n). With ``bin_fill_slack``
0 (the fewest steps) it bins the backlog as offline first-fit decreasing does, a bounded amount
of work a plan, and shortest-first waits until it is binned.

Packing (the reserve and the exchange) saves steps, and a step saved is worth its fixed cost
a for every request still waiting; it costs the prompts it moves a longer wait. So the plan
packs only where a step's fixed cost is at least ``PACK_SHARE`` of a full step's (the step
cost, ``cost.py``, learned from the engine's own step times; from PACK_Z of the fit's
standard deviations above it until as many below, where the fit has one; its bins are
reserved while the fitted share reads over it, so shortest-first does not spend their fillers
while the probes settle it, served ahead of shortest-first once it is sure (and, sure or not,
once the free prompts are spent), and freed once it is surely below), and weighs a reserved
bin against a shortest-first step by requests started per second of step (Smith's rule in
seconds): with a near 0 it orders like shortest-prefill-first, with a large a it packs to the
bound. How full the bins get follows the same share: their gaps may stay open up to
``fill_slack`` / (a's share) of the tokens binned (a credit each bin adds to and each gap left
open spends), so the steps they add cost about ``fill_slack`` of the makespan, and the short
prompts that would have closed them go first rather than wait for their bins.

A request that must go first but does not fit (chunked prefill off) stops the plan: letting
others overtake it would starve it, which is exactly what its deadline forbids. KV blocks
(where the adapter tracks them): the plan offers only requests whose blocks are free, so vLLM
never stops at an allocation while a smaller request would fit (vLLM's head-of-line blocking
on KV); an overdue request whose blocks are not free lets others by for KV_PATIENCE_STEPS,
then keeps its place and waits for its blocks, as vLLM would.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import math
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from itertools import chain, islice
from typing import NamedTuple
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from vllm_prepack.cost import StepCost

Key = Hashable
AGED_PROBES = 16  # aged requests skipped per step before the first-fit scan gives up: O(1)
FIT_PROBES = 64  # entries a best-fit search looks at before giving up: O(1)
RUN_PROBE = 4  # the ratio order's first block of a run checked at once (then doubling)
# filler-reserve bins built per step: the builder outruns shortest-first 8:1, so shortest-first
# spends about a ninth of a backlog's tokens (the shortest prompts, the best fillers) before the
# two meet; 4 halves the building per step but costs a step on 3 of the ten synthetic shapes
# (trimodal 1.04x the bound against 1.02x), 2 a trimodal backlog 2% more steps (measured
# every step the same cost)
BINS_PER_STEP = 8
# the builder's work per plan where the fewest steps are asked for (``bin_fill_slack`` 0:
# offline first-fit decreasing's bins, the backlog's before shortest-first spends a filler),
# in prompts binned and length lookups (0.2-0.6 us each), a bin counted as BIN_WORK (its
# object, its members, its ranking: about 1 us): a plan of vLLM's scheduler while it bins took
# 3.2 ms at the median at 100k waiting and 5.5 ms at 1M, the largest (the burst's first, dated)
# 7.7 and 8.4 ms; at 16,384, 10.1 and 13.8 ms at 1M (BENCHMARKS.md). At 32 bins a plan,
# shortest-first went on meanwhile, and packing always took up to 0.44% more steps than offline
# FFD on 10,000-prompt backlogs. Counted per priority level built in a plan
FULL_BUILD_WORK = 8192
BIN_WORK = 4  # a bin's own cost, with its first lookup, in the units of a prompt binned
BIG_BINS_PER_STEP = 128  # bins per step while prompts over half the budget are still free (fitted)
# new bins are ranked once this many wait unranked, where no plan reads the ranking meanwhile (a
# deep backlog's shortest-first steps start more requests than any bin: ``_bin_first``): a plan
# ranks at most this many bins' worth, not a whole backlog's bins at the first read
RANK_BATCH = 1024
BUILD_MIN_STEPS = 4  # build bins only while the free prompts hold more than this many steps
BIN_FILL = 0.99  # a bin this full takes no more fillers: the shortest prompts stay free
# The default of the option ``bin_fill_slack``: the share of the makespan the bins may give up
# for a lower mean TTFT. Their gaps left open add up to at most this / f of the tokens binned
# (f: a step's fixed cost as a share of a full step's, so the steps they add cost about this
# share of the time), and the short prompts that would have closed them go first, shortest
# first, instead of waiting for their bins. Filling a gap saves a share of one step for every
# request after it but moves its fillers to their bin's turn: where the fillers are many short
# prompts (the bimodal and trimodal mixes), filling every gap took 1.04-1.06x SPF's mean for
# FFD's makespan at 10,000 prompts. 0.015 (`bench scheduler --parts seconds`, BENCHMARKS.md):
# mean TTFT and makespan within 1.02x of the best in 8 of 10 such rows (7 with the earlier
# per-bin gap rule) and 41 of 45 at 1000 prompts (39)
FILL_SLACK = 0.015
# the gap credit is kept within what this many full bins accrue, either way: a backlog's full
# bins (prompts at the length limit) bank it for the gaps further down, whose fillers are the
# short prompts (at 16, the bimodal mix at 10,000 prompts read 1.03x the mean, not 1.02x), and
# neither a credit nor a debt from hours before outlasts a change of the mix
CREDIT_BINS = 1024
# pack (filler reserve, best-fit exchange) only where a step's fixed cost is at least this share
# of a full step's (a / (a + b x budget + c x its sequences)): below it a saved step is worth
# less than the wait the packing adds to the prompts it moves. 0.25 (`bench scheduler --parts
# seconds`, five backlog mixes on two seeds, BENCHMARKS.md; measured with an earlier gap rule, a
# bin's last gap left open up to 25% x (1 - f) of the budget): packing always cost at most about
# 1% of the best mean TTFT at a = 256-1024 tokens of work in a budget of 1024 (shares 0.2-0.5),
# while never packing takes up to 1.03x FFD's makespan from a = 384 (0.27) up. Lower, a CPU
# engine's stalls (its fit reading 0.10-0.39 where its calibration reads 0.03-0.07) would have it
# pack where steps cost tokens
PACK_SHARE = 0.25
# and only once the fitted share lies this many of its standard deviations above it, until it
# lies as many below: a noisy fit (a CPU engine's steps stall now and then, and one stalled
# half-budget probe reads a large fixed cost) keeps the side it is on, the prior's at first
# (shortest-first, the mean-optimal order, at the default prior and budgets over 768 tokens),
# until its probes settle it; a share that wanders near the threshold does not switch packing
# on and off (bins reserved, then passed over, cost steps)
PACK_Z = 2.0  # as cost.PROBE_Z: the plan never holds a side the model has decided against
# reserved prompts freed per plan once the share lies surely below the threshold: a deep
# backlog's bins go back over several plans (shortest-first meanwhile serves the free ones),
# none of them long (a 100k backlog holds tens of thousands of reserved prompts)
RELEASE_PER_STEP = 1024
# an overdue request whose KV blocks are not free lets others by for this many steps past its
# deadline (or its own wait, if longer), then holds its place until its blocks are free
KV_PATIENCE_STEPS = 256
# points (length, skip) of a scan over a level's free prompts: before the first, past the last
START: tuple[float, int] = (0, 0)
END: tuple[float, int] = (math.inf, 0)
SWEEP_ROWS = 32  # rows a sweep of an admission order looks at per admission or removal


def padding_gap(tokens: int, capture_sizes: Sequence[int]) -> int:
    """Tokens a CUDA-graph replay pads a step of `tokens` with (0 when no graph fits)."""
    index = bisect.bisect_left(capture_sizes, tokens)
    return capture_sizes[index] - tokens if tokens > 0 and index < len(capture_sizes) else 0


class Reason(str, enum.Enum):
    """Why a request is in a step's plan."""

    PINNED = "pinned"  # resumed or deferred: keeps its place
    AGED = "aged"  # past its deadline
    SHORT = "short"  # shortest first
    RATIO = "ratio"  # highest response ratio first (order "ratio")
    FIT = "fit"  # best-fit exchange for a short pick
    BIN = "bin"  # a reserved bin, served whole
    CHUNK = "chunk"  # part of a prompt (chunked prefill)
    TOPUP = "topup"  # a chunk that fills CUDA-graph padding


CHUNK_REASONS = frozenset((Reason.CHUNK, Reason.TOPUP))  # the picks that are part of a prompt


@dataclass(slots=True, eq=False)
class Entry:
    """One waiting request as the policy sees it. Equal and hashed by identity: a plan keys its
    picks by entry, so taking a prompt touches its entry but not its key (a cache miss a pick,
    a hundred a step, where the keys are vLLM's request ids)."""

    key: Key
    length: int  # tokens left to prefill
    priority: int = 0
    seq: int = 0  # admission order, assigned by WaitingSet
    step: int = 0  # scheduler step at admission (aging in steps)
    time: float = 0.0  # monotonic seconds at admission (aging in seconds)
    group: Hashable | None = None  # LoRA adapter (None: no adapter)
    pinned: bool = False
    blocks: int = 0  # KV blocks vLLM must find free to admit it (0: not tracked)
    bin: int | None = None  # the reserved bin holding it (whole prompts only)
    # its deadline's cohort while it waits unpinned (None: pinned, or not waiting)
    cohort: _Cohort | None = field(default=None, repr=False)
    item: object = field(default=None, repr=False)  # the caller's (a vLLM Request)

    @property
    def due(self) -> float:
        """The step from which it goes first (set by the first plan after admission)."""
        return math.inf if self.cohort is None else self.cohort.due


def _waiting(seq: int, entry: Entry) -> bool:
    """A row of an admission order is live while its entry waits unpinned under its seq (a
    removal clears the entry's cohort; a re-admission gives it a new seq)."""
    return entry.seq == seq and entry.cohort is not None


def _seq(entry: Entry) -> int:
    return entry.seq


def _serving_order(entry: Entry) -> tuple[int, int]:
    """A bin's members are served longest first, oldest first within a length."""
    return -entry.length, entry.seq


class _Rows:
    """Rows (seq, entry) in order, as two deques rather than a deque of tuples: a tuple that
    holds an entry is one more object for the garbage collector to walk in every full
    collection, two a waiting request (an admission order and a cohort's), where vLLM's
    request brings about 17."""

    __slots__ = ("seqs", "entries")

    def __init__(self) -> None:
        self.seqs: deque[int] = deque()
        self.entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self.seqs)

    def append(self, seq: int, entry: Entry) -> None:
        self.seqs.append(seq)
        self.entries.append(entry)

    def popleft(self) -> tuple[int, Entry]:
        return self.seqs.popleft(), self.entries.popleft()

    def drop_stale_front(self) -> None:
        seqs, entries = self.seqs, self.entries
        while seqs and not _waiting(seqs[0], entries[0]):
            seqs.popleft()
            entries.popleft()

    def __iter__(self) -> Iterator[tuple[int, Entry]]:
        return zip(self.seqs, self.entries)


class _Admitted:
    """Entries in admission order, with O(1) removal: a removal only counts, and the entry's
    row stays, stale, until a scan passes it at the front or a sweep drops it. A hundred
    removals a step from 100k waiting would each cost a dict's delete, a cache miss or two,
    where vLLM's FCFS pops a deque. A sweep runs once stale rows outnumber live ones, or once
    a scan passes more stale rows than live ones (stale rows crowding behind a live front,
    which no front drop reaches): SWEEP_ROWS rows a call move from the rows not yet swept to
    the swept ones, the stale dropped, so no sweep rebuilds 100k rows in one call. A scan
    drops the stale rows at the front in one go (each row is dropped once: amortized O(1))."""

    __slots__ = ("_swept", "_rows", "_sweeping", "live")

    def __init__(self) -> None:
        self._swept = _Rows()  # rows before _rows, stale dropped
        self._rows = _Rows()
        self._sweeping = False
        self.live = 0  # entries waiting

    def __len__(self) -> int:
        return self.live

    @property
    def rows(self) -> int:
        """Rows held, live and stale."""
        return len(self._swept) + len(self._rows)

    def append(self, entry: Entry) -> None:
        self._rows.append(entry.seq, entry)
        self.live += 1
        if self._sweeping:
            self._sweep()

    def left(self) -> int:
        """One of its entries stopped waiting (its cohort already cleared); those still
        waiting."""
        self.live -= 1
        if self._sweeping or len(self._rows) > 2 * self.live:
            self._sweep()
        return self.live

    def _sweep(self) -> None:
        rows, swept = self._rows, self._swept
        for _ in range(min(SWEEP_ROWS, len(rows))):
            seq, entry = rows.popleft()
            if _waiting(seq, entry):
                swept.append(seq, entry)
        self._sweeping = bool(rows)
        if not rows:
            self._rows, self._swept = swept, rows

    def __iter__(self) -> Iterator[Entry]:
        self._swept.drop_stale_front()
        self._rows.drop_stale_front()
        return self._scan()

    def _scan(self) -> Iterator[Entry]:
        stale = 0  # stale rows passed, less the live ones
        for seq, entry in chain(self._swept, self._rows):
            if _waiting(seq, entry):
                stale -= 1
                yield entry
            else:
                stale += 1
                if stale == SWEEP_ROWS:
                    self._sweeping = True  # changes no row: safe while this scan runs


class _Cohort:
    """The requests of one priority level admitted in one step, and their one deadline: a
    burst of any size is dated in O(log n) (one row of ``by_due``), not one row each."""

    __slots__ = ("members", "due", "seq", "id")

    def __init__(self, cohort_id: int) -> None:
        self.members = _Admitted()
        self.due = math.inf
        self.seq = 0  # the first member's admission order (EDF ties)
        self.id = cohort_id


class Pick(NamedTuple):
    """One request in a step's plan, with its waiting entry (read only): the caller finds the
    request without a lookup among every waiting one."""

    tokens: int  # tokens planned this step (== entry.length unless chunked)
    reason: Reason
    entry: Entry

    @property
    def key(self) -> Key:
        return self.entry.key

    @property
    def chunked(self) -> bool:
        return self.reason in CHUNK_REASONS

    def __repr__(self) -> str:
        return f"Pick(key={self.key!r}, tokens={self.tokens}, reason={self.reason.value})"


# a pick as one int, its tokens above its reason's index in Reason (8 reasons: 3 bits)
REASON_BITS = 3
_REASONS = tuple(Reason)
assert len(_REASONS) <= 1 << REASON_BITS, "Reason outgrew REASON_BITS"
_CODES = {reason: index for index, reason in enumerate(_REASONS)}
_CHUNK_CODES = frozenset(_CODES[reason] for reason in CHUNK_REASONS)
_REASON_MASK = (1 << REASON_BITS) - 1


class Plan(Sequence[Pick]):
    """A step's picks in order, kept as entry -> tokens << REASON_BITS | the reason's index: an
    int a pick, not a tuple (a shortest-first run is one ``dict.fromkeys``, where a tuple a
    pick cost several times that a plan), read as ``Pick``s where a report or a test asks (made
    once, at the first read: `codes` is not to change after)."""

    __slots__ = ("codes", "_picks")

    def __init__(self, codes: dict[Entry, int]) -> None:
        self.codes = codes
        self._picks: list[Pick] | None = None

    @property
    def entries(self) -> list[Entry]:
        """The picked entries in plan order (a list made in C)."""
        return list(self.codes)

    def _list(self) -> list[Pick]:
        if self._picks is None:
            self._picks = [Pick(code >> REASON_BITS, _REASONS[code & _REASON_MASK], entry)
                           for entry, code in self.codes.items()]
        return self._picks

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index):
        return self._list()[index]

    def __iter__(self) -> Iterator[Pick]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        """Equal to a plan or a list of the same picks."""
        if isinstance(other, Plan):
            other = other._list()
        return self._list() == other if isinstance(other, list) else NotImplemented

    __hash__ = None  # equal to a list, which has no hash

    def __repr__(self) -> str:
        return f"Plan({self._list()!r})"


@dataclass(slots=True)
class StepLimits:
    """What one step may still take from the waiting set (read only; not a frozen dataclass,
    whose constructor sets each of its 18 fields through ``object.__setattr__``, once a
    step)."""

    budget: int  # tokens left after running requests
    seats: int  # requests that may still start
    chunked_prefill: bool = True
    min_chunk_tokens: int = 0  # never start a chunk smaller than this (but see capture_sizes)
    capture_sizes: tuple[int, ...] = ()  # sorted CUDA-graph sizes; () when graphs are off
    used_tokens: int = 0  # tokens already scheduled this step (running requests)
    groups: frozenset = frozenset()  # LoRA ids already active this step
    max_groups: int | None = None  # max_loras; None: no limit
    # vLLM's second budget: input tokens left, of which every started request also takes
    # `overhead` (draft slots of speculative decoding); None: only `budget` applies
    input_budget: int | None = None
    overhead: int = 0
    capacity: int = 0  # the whole step's token budget (drain time); 0: budget + used_tokens
    cost: StepCost | None = None  # what a step costs; None: every step the same (steps count)
    share_sd: float = 0.0  # the standard deviation of the cost's fixed share (0: taken as known)
    cost_learning: bool = False  # `cost` is still the prior's guess: the fit has not its steps
    # KV blocks free for waiting requests after running ones took theirs (None: not tracked),
    # and the watermark vLLM keeps free once any request is scheduled in the step
    free_blocks: int | None = None
    watermark_blocks: int = 0
    running: bool = False  # requests already run this step (the watermark applies from the first)
    probe: bool = False  # a step the step-cost model made smaller to time: no bins sized to it

    @property
    def step_tokens(self) -> int:
        return self.capacity or self.budget + self.used_tokens

    def step_seconds(self, tokens: int, seqs: int) -> float:
        """The cost of a step that adds `tokens` over `seqs` requests to the running ones."""
        return 1.0 if self.cost is None else self.cost.seconds(self.used_tokens + tokens, seqs)

    def fixed_share(self) -> float:
        """A full step's fixed cost as a share of its cost, a / (a + b x step tokens + c x its
        sequences): 1 where every step costs the same. Packing pays where it is at least the
        policy's share."""
        return 1.0 if self.cost is None else self.cost.fixed_share(self.step_tokens)


@dataclass(frozen=True, slots=True)
class AgingBound:
    """When a waiting request has waited long enough to go first.

    steps: a fixed wait in steps; seconds: the same in wall time; drain_factor: drain_factor x
    the steps the waiting queue needed to drain when the request arrived (itself included), so
    the bound tracks what FCFS would make it wait: tight under light load, where a fixed bound
    sits far above any FCFS wait, and loose under a deep backlog."""

    steps: int | None = None
    seconds: float | None = None
    drain_factor: float | None = None

    def wait(self, drain_steps: float) -> float:
        """Steps a request that joins a queue of `drain_steps` may wait before it goes first."""
        waits = [math.inf]
        if self.steps is not None:
            waits.append(self.steps)
        if self.drain_factor is not None:
            waits.append(self.drain_factor * drain_steps)
        return min(waits)

    def overdue(self, entry: Entry, step: int, now: float) -> bool:
        return step >= entry.due or (self.seconds is not None and now - entry.time >= self.seconds)


class _ByLength:
    """The free prompts of a level: the lengths present, sorted, and per length the entries in
    admission order (a dict of entry -> None: an ordered set whose members hash by identity,
    so neither a scan nor a removal touches a request id), so shortest-first, the filler
    reserve and the best-fit search take entries from the run they read, not from the dict of
    every waiting request.
    Shortest-first takes a run of equal lengths in a few C-level
    operations instead of a loop per prompt, and an admission or removal is a dict operation
    (O(log L) only where a length appears or empties). A resized request (a prefix-cache hit
    found after it arrived) keeps its seq, so it may join a run out of order: that run is put
    back in order once, when it is next read (O(run): a sort of an almost sorted list). Scans
    start at a point (length, skip): past the first `skip` prompts of that length, valid while
    no prompt joins or leaves (one plan)."""

    __slots__ = ("lengths", "_runs", "_unordered")

    def __init__(self) -> None:
        self.lengths: SortedList = SortedList()
        self._runs: dict[int, dict[Entry, None]] = {}
        self._unordered: set[int] = set()  # lengths whose run took a prompt out of order

    def __bool__(self) -> bool:
        return bool(self._runs)

    def has(self, length: int | None) -> bool:
        """Whether a free prompt of `length` waits."""
        return length in self._runs

    def __iter__(self) -> Iterator[Key]:
        return (entry.key for entry in self.entries_from(START))

    def run(self, length: int) -> dict[Entry, None]:
        """The prompts of `length` (which must be present), oldest first."""
        if length in self._unordered:
            self._unordered.discard(length)
            self._runs[length] = dict.fromkeys(sorted(self._runs[length], key=_seq))
        return self._runs[length]

    def add(self, entry: Entry) -> None:
        length = entry.length
        run = self._runs.get(length)
        if run is None:
            run = self._runs[length] = {}
            self.lengths.add(length)
        elif entry.seq < next(reversed(run)).seq:
            self._unordered.add(length)
        run[entry] = None

    def remove(self, entry: Entry) -> None:
        """Out of the run of its length (before its length changes)."""
        length = entry.length
        run = self._runs[length]
        del run[entry]
        if not run:
            self.emptied(length)

    def emptied(self, length: int) -> None:
        """Drop `length`, whose run is now empty (the builder pops from runs directly)."""
        del self._runs[length]
        self._unordered.discard(length)
        self.lengths.remove(length)

    def longest_at_most(self, tokens: int) -> int | None:
        """The longest length present that is at most `tokens`: two bisects over the sorted
        list's sublists and their maxima, without its positional index (``bisect_right`` and
        an index lookup cost three times as much; the filler reserve's builder makes one each
        time it moves to a shorter length)."""
        maxes = self.lengths._maxes
        at = bisect.bisect_right(maxes, tokens)
        if at == len(maxes):
            return maxes[-1] if maxes else None
        sub = self.lengths._lists[at]
        below = bisect.bisect_right(sub, tokens)
        if below:
            return sub[below - 1]
        return maxes[at - 1] if at else None

    def first(self) -> Key:
        return next(iter(self.run(self.lengths[0]))).key

    def run_from(self, length: int, start: tuple[float, int]) -> Iterator[Entry]:
        """The entries of `length` from the point `start` on."""
        entries = iter(self.run(length))
        if length == start[0] and start[1]:
            next(islice(entries, start[1], start[1]), None)  # skipped in C
        return entries

    def lengths_from(self, minimum: float) -> Iterator[int]:
        """The lengths present from `minimum` on. Most scans start at a length present or at
        the first, and stop within its run: they never pay for the sorted list's range search,
        a dozen Python calls."""
        if minimum in self._runs:
            yield minimum
            yield from self.lengths.irange(minimum, inclusive=(False, True))
        else:
            yield from self.lengths.irange(minimum) if minimum > 0 else self.lengths

    def entries_from(self, start: tuple[float, int]) -> Iterator[Entry]:
        """The entries from the point `start` on: shortest first, oldest first within a length
        (the runs chained in C)."""
        return chain.from_iterable(self.run_from(length, start)
                                   for length in self.lengths_from(start[0]))

    def scan_down(self, tokens: int) -> Iterator[Entry]:
        """The entries from the longest length at most `tokens` down, newest first within a
        length (each length, a token count, by ``longest_at_most``: most scans end within the
        first, where the sorted list's reverse range would cost a dozen Python calls to set up)."""
        length = self.longest_at_most(tokens)
        while length is not None:
            yield from reversed(self.run(length))
            length = self.longest_at_most(length - 1)


# a bin's rank (``_Bin.order``): its members, tokens and id in bit fields, id and tokens below
# 2**48 each (bins over a scheduler's life; a bin's tokens are at most a step's)
_ID_BITS = 48
_BIN_ID_MASK = (1 << _ID_BITS) - 1


def _bin_id(rank: int) -> int:
    """The bin of a ranking's `rank` (``_Bin.order``)."""
    return rank & _BIN_ID_MASK


class _Bin:
    __slots__ = ("members", "tokens", "shortest")

    def __init__(self, members: list[Entry], tokens: int, shortest: int) -> None:
        # longest first (a list: making a set of them cost more); in serving order, oldest
        # first within a length, once served (``_serve_bins``): its members leave from the front
        self.members = members
        self.tokens = tokens
        self.shortest = shortest  # a bin none of whose members fits is passed over

    def order(self, bin_id: int) -> int:
        """Most requests first (Smith's rule: each bin takes one step), then the lighter, as one
        int (``_bin_id`` reads the id back): a ranking's comparisons read no tuple's members,
        each a cache miss in a ranking other work evicted between plans."""
        return (-len(self.members) << 2 * _ID_BITS) + (self.tokens << _ID_BITS) + bin_id


def _gap_credit(open_share: float, binned: float, left_open: float) -> float:
    """Tokens of gap a level's bins may still leave open: `open_share` of the tokens binned, at
    the step cost now known, less the gaps already left open (a gap left open on an earlier,
    lower share is a debt the next bins pay by filling theirs)."""
    return open_share * binned - left_open


class _Level:
    """The waiting requests of one priority level, indexed by length, deadline and age."""

    __slots__ = ("free", "order", "pinned", "by_due", "cohorts", "bins", "_ranking", "_unranked",
                 "most_members", "free_tokens", "binned", "left_open")

    def __init__(self) -> None:
        self.free = _ByLength()  # unpinned, unreserved entries
        self.free_tokens = 0
        self.order = _Admitted()  # unpinned entries, oldest first
        self.pinned: deque[Entry] = deque()
        self.by_due: SortedList = SortedList()  # (due, seq, cohort id) of dated cohorts
        self.cohorts: dict[int, _Cohort] = {}  # the dated cohorts, by id
        self.bins: dict[int, _Bin] = {}
        self._ranking: SortedList = SortedList()  # _Bin.order(id) of the bins not in _unranked
        self._unranked: set[int] = set()  # bins new or that lost a member since the last read
        self.most_members = 0  # no bin has more members (0 once none is left)
        # tokens the bins took (clamped: within CREDIT_BINS bins of left_open / the open share),
        # and the gaps they left open (_build_bins)
        self.binned = 0.0
        self.left_open = 0.0

    def __len__(self) -> int:
        return self.order.live + len(self.pinned)

    # -- reserved bins --

    def reserve(self, members: list[Entry], bin_id: int, tokens: int) -> None:
        """A new bin of free entries, already popped from `free`, longest first, of `tokens`."""
        self.bins[bin_id] = _Bin(members, tokens, members[-1].length)
        if len(members) > self.most_members:
            self.most_members = len(members)
        for entry in members:
            entry.bin = bin_id
        self.free_tokens -= tokens
        self._unranked.add(bin_id)  # ranked at the next read, with the others built meanwhile
        if len(self._unranked) >= RANK_BATCH:
            self.ranked()

    def release(self, entry: Entry) -> None:
        """Out of its bin (admitted, removed, or resized). The bin leaves the ranking until it
        is next read: a bin served whole loses its members one by one, and ranking it again
        after each would cost two sorted-list updates a member."""
        bin_id, b = entry.bin, self.bins[entry.bin]
        if bin_id not in self._unranked:
            self._ranking.remove(b.order(bin_id))
            self._unranked.add(bin_id)
        b.members.remove(entry)
        b.tokens -= entry.length
        entry.bin = None
        if not b.members:
            del self.bins[bin_id]
            self._unranked.discard(bin_id)
            if not self.bins:
                self.most_members = 0
        else:
            b.shortest = b.members[-1].length

    def release_bins(self, most: int) -> None:
        """Whole bins' members back to the free prompts until at least `most` are (or none is
        left), in serving order: the bins of the most, shortest prompts first, whose members
        shortest-first reaches soonest."""
        ranking = self.ranked()
        while ranking and most > 0:
            bin_id = _bin_id(ranking.pop(0))
            b = self.bins.pop(bin_id)
            for entry in b.members:
                entry.bin = None
                self.free.add(entry)
            self.free_tokens += b.tokens
            most -= len(b.members)
        if not self.bins:
            self.most_members = 0

    def ranked(self) -> SortedList:
        """The bins in serving order: most requests first (Smith's rule), then the lighter;
        the bins built or that lost members since the last read are ranked first, together (a
        sorted list's bulk update: one sort where they are many)."""
        if self._unranked:
            bins = self.bins
            self._ranking.update([bins[bin_id].order(bin_id) for bin_id in self._unranked])
            self._unranked.clear()
        return self._ranking


class WaitingSet:
    """Waiting requests indexed by priority, remaining length, deadline and age.

    Adds and removals cost O(log n) (the deadline index; the free prompts by length: O(1) but
    where a length appears or empties; a resize may cost one sort of its new length's run at
    the next plan); ``plan`` costs O((k + swaps + bins) log n) for k picks, with shortest-first's
    (and the ratio order's) picks taken a run of equal lengths at a time, so the policy scales
    to 100k waiting requests without re-sorting the queue every step.
    """

    def __init__(self, aging: AgingBound = AgingBound(), max_swaps: int = 4,
                 pack_share: float = PACK_SHARE, order: str = "shortest",
                 fill_slack: float = FILL_SLACK) -> None:
        self.aging = aging
        self.max_swaps = max_swaps
        self.pack_share = pack_share
        self.fill_slack = fill_slack
        self.by_ratio = order == "ratio"  # HRRN, not SPF
        self.packing = False  # whether plans pack (the step cost's share against pack_share)
        self.reserving = False  # whether plans build bins: packing, or the share over pack_share
        self.entries: dict[Key, Entry] = {}  # every waiting entry by key; read only outside
        self._levels: dict[int, _Level] = {}
        self._priorities: list[int] = []  # sorted keys of _levels
        self._seq = 0
        self._bin_ids = 0
        self._tokens = 0  # sum of waiting lengths
        self._cohort_ids = 0
        self._undated: dict[tuple[int, int], _Cohort] = {}  # (priority, step) -> admitted since the last plan
        # the last plan's end, where it ended at a prompt that did not fit (ratio order, whole
        # prompts): what vLLM is offered past the plan, so that it stops there too
        self.stop: Entry | None = None

    # ---- membership -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    @property
    def tokens(self) -> int:
        return self._tokens

    def add(self, entry: Entry, due: float = math.inf) -> None:
        """Admit a request at the back (in step order: `entry.step` does not go down, which
        the ratio order relies on). A new arrival's deadline is set by the next plan; a
        request coming back (vLLM's priority queue re-inserts a preempted one by arrival)
        passes the deadline it had, which keeps it ahead of newer ones."""
        self._insert(entry, pinned=False, due=due)

    def pin(self, entries: Sequence[Entry]) -> None:
        """Put requests in front of their level, in the given order (resumed or deferred)."""
        for entry in reversed(entries):
            self._insert(entry, pinned=True)

    def _insert(self, entry: Entry, pinned: bool, due: float = math.inf) -> None:
        if entry.key in self.entries:
            raise ValueError(f"request {entry.key!r} is already waiting")
        entry.length = max(1, entry.length)
        entry.pinned = pinned
        entry.bin = None
        entry.cohort = None
        level = self._levels.get(entry.priority)
        if level is None:
            level = self._levels[entry.priority] = _Level()
            bisect.insort(self._priorities, entry.priority)
        if pinned:
            level.pinned.appendleft(entry)
        else:
            entry.seq = self._seq
            self._seq += 1
            level.free.add(entry)
            level.free_tokens += entry.length
        self.entries[entry.key] = entry
        self._tokens += entry.length
        if pinned:
            return
        if due == math.inf:
            cohort = self._undated.get((entry.priority, entry.step))
            if cohort is None:
                cohort = self._undated[(entry.priority, entry.step)] = self._new_cohort()
        else:
            cohort = self._new_cohort()
            self._date(level, cohort, due, entry.seq)
        entry.cohort = cohort
        level.order.append(entry)
        cohort.members.append(entry)

    def remove(self, key: Key) -> Entry:
        entry = self.entries.pop(key)
        length = entry.length
        self._tokens -= length
        level = self._levels[entry.priority]
        if entry.pinned:
            level.pinned.remove(entry)
        else:
            if entry.bin is not None:
                level.release(entry)
            else:
                level.free.remove(entry)
                level.free_tokens -= length
            cohort = entry.cohort
            entry.cohort = None
            if not cohort.members.left() and cohort.id in level.cohorts:
                level.by_due.remove((cohort.due, cohort.seq, cohort.id))
                del level.cohorts[cohort.id]
            if level.order.left():
                return entry  # requests left in the level: no len(level) (vLLM pops 100 a step)
        if not level:
            del self._levels[entry.priority]
            self._priorities.remove(entry.priority)
        return entry

    def resize(self, key: Key, length: int, blocks: int | None = None) -> None:
        """A request's remaining length changed (a prefix-cache hit found after it arrived);
        it keeps its arrival order and deadline, and leaves its reserved bin."""
        entry = self.entries[key]
        if blocks is not None:
            entry.blocks = blocks
        length = max(1, length)
        if length == entry.length:
            return
        self._tokens += length - entry.length
        if entry.pinned:
            entry.length = length
            return
        level = self._levels[entry.priority]
        if entry.bin is not None:
            level.release(entry)
        else:
            level.free.remove(entry)
            level.free_tokens -= entry.length
        entry.length = length
        level.free.add(entry)
        level.free_tokens += length

    # ---- deadlines --------------------------------------------------------------------------

    def _new_cohort(self) -> _Cohort:
        self._cohort_ids += 1
        return _Cohort(self._cohort_ids)

    @staticmethod
    def _date(level: _Level, cohort: _Cohort, due: float, seq: int) -> None:
        cohort.due, cohort.seq = due, seq
        level.by_due.add((due, seq, cohort.id))
        level.cohorts[cohort.id] = cohort

    def _date_arrivals(self, step_tokens: int) -> None:
        """Deadlines of the requests admitted since the last plan, from the queue they joined:
        one per cohort (a priority level's arrivals of one step), O(log n) whatever its size.
        Without a drain or step bound they stay undated (never overdue by steps)."""
        if not self._undated:
            return
        wait = self.aging.wait(self._tokens / max(1, step_tokens))
        if wait != math.inf:
            for (priority, step), cohort in self._undated.items():
                if cohort.members:
                    first = next(iter(cohort.members))
                    self._date(self._levels[priority], cohort, step + wait, first.seq)
        self._undated.clear()

    def _overdue(self, level: _Level, step: int, now: float) -> Iterator[Entry]:
        """Requests past their deadline, earliest deadline first; then those past the seconds
        bound, oldest first."""
        for due, _, cohort_id in level.by_due:
            if due > step:
                break
            yield from level.cohorts[cohort_id].members
        if self.aging.seconds is not None:
            for entry in level.order:
                if now - entry.time < self.aging.seconds:
                    break
                if entry.due > step:
                    yield entry

    # ---- order ------------------------------------------------------------------------------

    def first(self, step: int = 0, now: float = 0.0) -> Key:
        """The request the policy would start next with an unlimited budget."""
        if not self.entries:
            raise IndexError("no waiting requests")
        level = self._levels[self._priorities[0]]
        if level.pinned:
            return level.pinned[0].key
        for entry in self._overdue(level, step, now):
            return entry.key
        if level.free:
            return level.free.first()
        bin_id = _bin_id(level.ranked()[0])
        return min(level.bins[bin_id].members, key=_seq).key

    def __iter__(self) -> Iterator[Key]:
        """All waiting keys: by level, pinned first, then free shortest first, then bins."""
        for priority in self._priorities:
            level = self._levels[priority]
            yield from (e.key for e in level.pinned)
            yield from level.free
            for rank in level.ranked():
                yield from (entry.key for entry in level.bins[_bin_id(rank)].members)

    # ---- the per-step policy ----------------------------------------------------------------

    def plan(self, limits: StepLimits, step: int = 0, now: float = 0.0) -> Plan:
        """Choose this step's prefills. Requests stay waiting; planning dates new arrivals and
        may reserve bins (whole prompts only), which changes no request's membership."""
        self._date_arrivals(limits.step_tokens)
        share, margin = limits.fixed_share(), PACK_Z * limits.share_sd
        below = share + margin < self.pack_share
        if share - margin >= self.pack_share:
            self.packing = True  # a saved step is surely worth moving prompts
        elif below:
            self.packing = False
        # while the probes settle the share, shortest-first goes on without the bins' fillers
        self.reserving = self.packing or share >= self.pack_share
        if below:
            for level in self._levels.values():
                if level.bins:
                    level.release_bins(RELEASE_PER_STEP)
        planner = _Planner(limits)
        for priority in self._priorities:
            level = self._levels[priority]
            before = planner.whole_picks
            self._plan_level(level, planner, step, now)
            if planner.whole_picks - before < len(level):
                break  # strict priority: a lower level only gets what a level leaves whole
        planner.top_up()
        self.stop = planner.stop
        return Plan(planner.codes)

    def _plan_level(self, level: _Level, p: _Planner, step: int, now: float) -> None:
        p.free_below = START
        for entry in level.pinned:
            if not p.take_in_order(entry, Reason.PINNED):
                return
        exchangeable: list[Entry] = []  # aged first-fit and short picks, in plan order
        self._take_aged(level, p, step, now, exchangeable)
        if p.blocked:
            return
        limits = p.limits
        fixed_share = limits.fixed_share()
        if self.by_ratio:
            self._take_by_ratio(level, p, step, self.packing and not limits.chunked_prefill)
            return
        unbinned = (self.reserving and not limits.chunked_prefill and not limits.probe
                    and self._build_bins(level, limits.budget, fixed_share, limits.cost_learning))
        if unbinned and self.fill_slack == 0 and self.packing and level.bins:
            # the fewest steps (``fill_slack`` 0): the bins go first until the backlog is binned,
            # and shortest-first takes no filler offline FFD would have given a bin
            before = p.whole_picks
            self._serve_bins(level, p)
            if p.whole_picks > before:
                return
        first_short = len(exchangeable)
        shortest = p.save()
        p.take_shortest(level, exchangeable)
        if (self.packing and level.bins
                and self._bin_first(level, p, shortest, len(exchangeable) - first_short)):
            for entry in reversed(exchangeable[first_short:]):
                p.untake(entry)
            del exchangeable[first_short:]
            self._serve_bins(level, p)
            p.take_shortest(level, exchangeable)
        if self.packing:
            self._exchange(level, p, exchangeable, step, now)
        if level.bins and p.all_free_taken(level):
            self._serve_bins(level, p)
        p.chunk_next(level)

    def _take_aged(self, level: _Level, p: _Planner, step: int, now: float,
                   exchangeable: list[Entry]) -> None:
        """(a) Overdue requests go first, earliest deadline first: whole, else a chunk, else the
        step stops. With chunked prefill off, only the first may stop the step; the others
        follow first-fit, so an all-overdue queue still packs. One whose KV blocks are not
        free is passed over for KV_PATIENCE_STEPS past its deadline (or its own wait, if
        longer); then it keeps its place and waits for blocks as vLLM would, so it cannot
        starve."""
        misses = 0
        for index, entry in enumerate(self._overdue(level, step, now)):
            if p.taken(entry):
                continue
            if not p.kv_fits(entry) and step - entry.due < max(KV_PATIENCE_STEPS, entry.due - entry.step):
                misses += 1  # its blocks are not free: shorter ones go meanwhile
                if misses > AGED_PROBES:
                    return
                continue
            if index == 0 or p.limits.chunked_prefill:  # chunks pack in deadline order perfectly
                if not p.take_in_order(entry, Reason.AGED):
                    return
            elif not p.has_room():
                return
            elif entry.length <= p.left and p.group_ok(entry) and p.kv_fits(entry):
                p.take(entry, Reason.AGED)
                exchangeable.append(entry)
            else:
                misses += 1
                if misses > AGED_PROBES:
                    return

    @staticmethod
    def _take_by_ratio(level: _Level, p: _Planner, step: int, first_fit: bool) -> None:
        """(b) and (d) in response-ratio order (``order`` "ratio"): free prompts by (wait +
        service) / service in steps, highest first (HRRN; ties: the oldest), whole while they
        fit, then a chunk of the next. With whole prompts only the step ends at the first that
        does not fit, as HRRN in vLLM does, unless `first_fit` (where a step's fixed cost makes
        packing pay, ``StepLimits.fixed_share``): then the next ones that fit go too, and the prompt
        passed over keeps the highest ratio for the next step. Of equal lengths the oldest has
        the highest ratio, so the order merges one head per length: a heap, grown over the
        lengths shortest first only while an unseen length could still beat its best (none can
        beat 1 + the longest wait of an untaken prompt / its length; prompts are admitted in
        step order, so the oldest of a length waited longest). A length's prompts that still
        beat every other are taken at once, as shortest-first takes a run. O(r log L) for r
        runs taken over L lengths where waits are alike, O(L log L) at worst, where HRRN as
        usually done re-sorts every waiting request every step. The best-fit exchange (c) is
        not used: the step's leftover goes to a chunk of the next prompt by ratio."""
        free, step_tokens = level.free, max(1, p.limits.step_tokens)
        # the longest wait of an untaken prompt (overdue ones, the oldest, are often planned)
        oldest = next((entry for entry in level.order if not p.taken(entry)), None)
        if oldest is None:
            return
        longest_wait = (step - oldest.step) * step_tokens  # in tokens of steps

        def head(length: int, run: Iterator[Entry]) -> tuple | None:
            """The run's next untaken prompt, as a heap row (highest ratio, then oldest: seqs
            are unique, so rows never compare their entries)."""
            for entry in run:
                if not p.taken(entry):
                    return -(1 + (step - entry.step) * step_tokens / length), entry.seq, length, entry, run
            return None

        def beats(entry: Entry, length: int, rival: tuple | None, beaten: float) -> bool:
            """`entry` goes before the heap's top (`rival`) and every unseen length (whose
            ratio is at most `beaten`)."""
            row = head(length, iter((entry,)))
            return (rival is None or row < rival) and -row[0] > beaten

        lengths = iter(free.lengths)
        unseen = next(lengths, None)
        heads: list = []
        misses = 0
        batch = p.kv_left is None and p.limits.max_groups is None  # nothing counted per prompt
        while p.has_room():
            while unseen is not None and (not heads or 1 + longest_wait / unseen >= -heads[0][0]):
                if first_fit and unseen > p.left:
                    unseen = None  # no longer length fits this step
                    break
                row = head(unseen, free.run_from(unseen, START))
                if row is not None:
                    heapq.heappush(heads, row)
                unseen = next(lengths, None)
            if not heads:
                return
            _, _, length, entry, run = heapq.heappop(heads)
            if first_fit and length > p.left:
                continue  # no prompt of this length fits: shorter ones may
            # vLLM passes over a prompt whose LoRA adapter cannot load; a whole prompt over the
            # budget stops it before it asks for KV blocks
            stops = length > p.left and not p.limits.chunked_prefill
            if not p.group_ok(entry) or not stops and not p.kv_fits(entry):
                misses += 1  # passed over, as vLLM skips it
                if misses >= FIT_PROBES:
                    return
                row = head(length, run)
            elif length > p.left:
                if p.limits.chunked_prefill:
                    p.chunk(entry)
                else:
                    p.stop = entry  # the step ends here, as HRRN's does in vLLM
                return
            elif not batch:
                p.take(entry, Reason.RATIO)
                row = head(length, run)
            else:
                # the run goes on while its next prompts still beat every other (the heap's
                # top, any unseen length)
                rival = heads[0] if heads else None
                beaten = 1 + longest_wait / unseen if unseen is not None else 0.0
                more, run = _prefix(run, p.fitting(length) - 1, p.taken,
                                    lambda e: beats(e, length, rival, beaten))
                p.take_run([entry, *more], length, Reason.RATIO)
                row = head(length, run)
            if row is not None:
                heapq.heappush(heads, row)

    def _build_bins(self, level: _Level, capacity: int, fixed_share: float,
                    learning: bool) -> bool:
        """The filler reserve: pack bins from the longest free prompts down, each filled with
        the longest free prompts that fit until the gap left is within 1 - BIN_FILL of the
        budget, or it is half full and the level's gap credit covers leaving it open, while the
        free prompts hold more than BUILD_MIN_STEPS steps. The shortest prompts stay free for
        shortest-first. The credit is ``fill_slack`` / `fixed_share` of the tokens binned, less
        the gaps left open (within CREDIT_BINS bins' worth either way after each bin), so the
        open gaps add about ``fill_slack`` of the makespan over the backlog, at the share as now
        known: gaps left open at a lower share are a debt the next bins pay. Prompts over half
        the budget need a bin each and their fillers before shortest-first eats them: up to
        BIG_BINS_PER_STEP of those a step (a 1000-prompt backlog: all at once; a 100k one: far
        ahead of the small prompts shortest-first spends meanwhile), else BINS_PER_STEP. While
        the step cost is the prior's guess (`learning`), bins come at BINS_PER_STEP's pace
        whatever their prompts, and are credited as if a step were all fixed cost: a gap left
        open cannot be closed once the fit reads a larger share, and most of a backlog's bins
        wait for the fit.
        With ``fill_slack`` 0 (the fewest steps) the bins are offline first-fit decreasing's:
        every gap closed as far as a free prompt fits, the backlog binned down to
        BUILD_MIN_STEPS steps' worth, up to FULL_BUILD_WORK a plan, learning or not (no gap is
        left open), once packing is sure (before, at BINS_PER_STEP's pace). Bins are sized to
        the step's budget left after running requests, as at every slack: FFD's steps are a
        prefill-only backlog's. Returns whether prompts are left to bin (the pace or the work
        bound stopped it): at slack 0, shortest-first then waits (``_plan_level``)."""
        free = level.free
        if self.fill_slack == 0:
            floor, open_share, per_step = 0, 0.0, math.inf
            # while it is not yet sure to pack (only reserving), at the common pace: the bins
            # may be freed again, RELEASE_PER_STEP prompts a plan
            most = math.inf if self.packing else BINS_PER_STEP
            work = FULL_BUILD_WORK
        else:
            floor = capacity * (1 - BIN_FILL)
            if learning:
                fixed_share = 1.0  # the least opening any share allows
            # where a step has no fixed cost, no gap is worth its fillers' wait
            open_share = self.fill_slack / fixed_share if fixed_share > 0 else math.inf
            per_step = BINS_PER_STEP
            most = per_step if learning else BIG_BINS_PER_STEP
            work = math.inf
        built, top = 0, None
        counted = open_share < math.inf  # (else every bin is left open once half full: no count)
        binned, left_open, bound = level.binned, level.left_open, capacity * CREDIT_BINS
        try:
            while level.free_tokens > BUILD_MIN_STEPS * capacity:
                # the longest length present: the last bin's first, unless that bin took its run
                length = top if free.has(top) else free.longest_at_most(capacity)
                if length is None:
                    return False
                if built >= most or work <= 0 or (built >= per_step and 2 * length <= capacity):
                    return True
                built += 1
                work -= BIN_WORK
                bin_id, self._bin_ids, top = self._bin_ids, self._bin_ids + 1, length
                members, gap = [], capacity
                credit = _gap_credit(open_share, binned, left_open) if counted else math.inf
                # a bin takes its longest prompt whatever the credit (an empty bin is not half
                # full), and is left open only once at least half full: the credit goes to the
                # gaps beside long prompts, not to bins of a few short ones
                while length is not None and gap > floor:
                    run, opened = free.run(length), False
                    # the newest prompts of this length while they fit: popitem, not a delete of
                    # the last member (a dict's deleted slots stay until it is resized: the next
                    # pops from its end would each walk past them)
                    while True:
                        if 2 * gap <= capacity and credit + open_share * (capacity - gap) >= gap:
                            opened = True  # left open: the short prompts that close it go first
                            break
                        members.append(run.popitem()[0])
                        gap -= length
                        if length > gap or gap <= floor or not run:
                            break
                    if not run:
                        free.emptied(length)
                    if opened or gap <= floor:
                        break
                    length = free.longest_at_most(gap)
                    work -= 1
                if counted:
                    binned += capacity - gap
                    left_open += gap
                    if open_share > 0:  # the credit within CREDIT_BINS bins' accrual either way
                        paid = left_open / open_share
                        binned = min(paid + bound, max(paid - bound, binned))
                level.reserve(members, bin_id, capacity - gap)
                work -= len(members)
            return False
        finally:
            level.binned, level.left_open = binned, left_open

    @staticmethod
    def _bin_first(level: _Level, p: _Planner, before: _Room, count: int) -> bool:
        """Smith's rule in seconds between the best reserved bin and the shortest-first step
        just planned (`count` picks since the plan stood at `before`): whichever starts more
        requests per second of step goes first (with every step the same cost: whichever
        starts more). O(bin size): the shortest-first step is the one already planned. Where
        no bin can win (none has more members than the step's rate allows even at no tokens:
        a cost grows with tokens and sequences), the bins are not ranked at all."""
        limits = p.limits
        short_tokens = p.planned_tokens - before.planned_tokens
        most, short = level.most_members, limits.step_seconds(short_tokens, count)
        # with a margin over float rounding: a near tie is decided exactly, below
        if count * limits.step_seconds(0, most) >= most * short * (1 + 1e-9):
            return False
        bin_id = _bin_id(level.ranked()[0])
        members = [entry for entry in level.bins[bin_id].members if not p.taken(entry)]
        bin_tokens = sum(e.length for e in members)
        if not members or bin_tokens > p.left_at(before) or not p.kv_fits_all(members, before):
            return False
        return len(members) * short > count * limits.step_seconds(bin_tokens, len(members))

    def _serve_bins(self, level: _Level, p: _Planner) -> None:
        """Reserved bins, most requests first: whole where a bin fits, else its members
        longest first where they fit (the rest stay reserved)."""
        for rank in islice(level.ranked(), FIT_PROBES):
            if not p.has_room():
                return
            b = level.bins[_bin_id(rank)]
            if b.shortest > p.left:
                continue
            b.members.sort(key=_serving_order)  # in place: they then leave from the front
            for entry in b.members:
                if (p.has_room() and not p.taken(entry) and entry.length <= p.left
                        and p.group_ok(entry) and p.kv_fits(entry)):
                    p.take(entry, Reason.BIN)

    def _exchange(self, level: _Level, p: _Planner, picks: list[Entry], step: int, now: float) -> None:
        """(c) best fit: swap the last exchangeable picks for longer free prompts that fill the
        step; an overdue pick only for another overdue request, so no younger one overtakes it.

        Only where the leftover cannot become a chunk: a chunk fills it already, and an exchange
        would just delay a shorter prompt.
        """
        if p.limits.chunked_prefill and p.left >= max(1, p.limits.min_chunk_tokens):
            return
        for _ in range(self.max_swaps):
            if not picks or p.left == 0:
                return
            last = picks[-1]
            aged = p.reason(last) == Reason.AGED
            overdue = (lambda e: self.aging.overdue(e, step, now)) if aged else (lambda e: True)
            best = self._longest_fitting(
                level, p, p.left + last.length, above=last.length,
                accept=lambda e: overdue(e) and p.kv_fits(e, freed=last.blocks),
            )
            if best is None:
                return
            picks.pop()
            p.untake(last)
            p.take(best, Reason.AGED if aged else Reason.FIT)

    @staticmethod
    def _longest_fitting(level: _Level, p: _Planner, room: int, above: int,
                         accept=None) -> Entry | None:
        """Longest untaken free prompt with above < length <= room (and `accept`ed),
        O(log L + FIT_PROBES) over L lengths present."""
        for entry in islice(level.free.scan_down(room), FIT_PROBES):
            if entry.length <= above:
                return None
            if not p.taken(entry) and p.group_ok(entry) and (accept is None or accept(entry)):
                return entry
        return None


def _prefix(entries: Iterator[Entry], most: int, taken, ok) -> tuple[list[Entry], Iterator[Entry]]:
    """Up to `most` of `entries` (skipping `taken` ones) from the front while `ok`, where `ok`
    holds for a prefix of them (a run in the ratio order: the ratio falls along it), and the
    entries after those. Checked in blocks of doubling size, the last of a block first, a
    failing block bisected: O(log k) checks for k entries taken."""
    chosen, size = [], RUN_PROBE
    while most > 0:
        block = list(islice(entries, min(size, most)))
        if not block:
            break  # the entries are spent
        block = [e for e in block if not taken(e)]
        if block and not ok(block[-1]):
            lo, hi = 0, len(block) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if ok(block[mid]):
                    lo = mid + 1
                else:
                    hi = mid
            return chosen + block[:lo], chain(block[lo:], entries)
        chosen += block
        most -= len(block)
        size *= 2
    return chosen, entries


class _Room(NamedTuple):
    """What a plan had left at one point (``_Planner.save``)."""

    token_left: int
    input_left: int | None
    kv_left: int | None
    planned_tokens: int


class _Planner:
    """Mutable state of one step's plan: the picks and what is left."""

    __slots__ = ("limits", "token_left", "input_left", "planned_tokens", "seats", "codes",
                 "_group_counts", "_chunk_candidate", "blocked", "stop", "kv_left", "_chunks",
                 "free_below")

    def __init__(self, limits: StepLimits) -> None:
        self.limits = limits
        self.token_left = max(0, limits.budget)
        self.input_left = limits.input_budget
        self.planned_tokens = 0
        self.seats = max(0, limits.seats)
        self.codes: dict[Entry, int] = {}  # the picks in plan order (``Plan``)
        self._group_counts: dict[Hashable, int] = {}  # picks per LoRA adapter
        self._chunk_candidate: Entry | None = None
        self.blocked = False  # a must-go-first request did not fit: nothing may overtake it
        self.stop: Entry | None = None  # whole prompts in ratio order: the one the step ends at
        self.kv_left = limits.free_blocks  # None: KV blocks not tracked
        self._chunks = 0  # picks that are chunks
        # the level's free prompts before this point (length, skip) are all taken:
        # shortest-first stopped there, and later scans start there
        self.free_below: tuple[float, int] = START

    @property
    def left(self) -> int:
        """Tokens the next request may take (vLLM's min(token_budget, input_budget - slots))."""
        return self.left_at(self)

    def left_at(self, room: _Room | _Planner) -> int:
        if room.input_left is None:
            return room.token_left
        return max(0, min(room.token_left, room.input_left - self.limits.overhead))

    def save(self) -> _Room:
        return _Room(self.token_left, self.input_left, self.kv_left, self.planned_tokens)

    def has_room(self) -> bool:
        return self.left > 0 and self.seats > 0

    def taken(self, entry: Entry) -> bool:
        return entry in self.codes

    def all_free_taken(self, level: _Level) -> bool:
        """Every free prompt of `level` is in the plan (checked from `free_below` on, in C)."""
        return all(map(self.codes.__contains__, level.free.entries_from(self.free_below)))

    def reason(self, entry: Entry) -> Reason:
        return _REASONS[self.codes[entry] & _REASON_MASK]

    @property
    def whole_picks(self) -> int:
        return len(self.codes) - self._chunks

    def group_ok(self, entry: Entry) -> bool:
        max_groups = self.limits.max_groups
        return (
            entry.group is None
            or max_groups is None
            or entry.group in self.limits.groups
            or self._group_counts.get(entry.group, 0) > 0
            or len(self.limits.groups | {g for g, n in self._group_counts.items() if n}) < max_groups
        )

    def kv_fits(self, entry: Entry, freed: int = 0) -> bool:
        """vLLM would find `entry`'s KV blocks free (after `freed` blocks come back), keeping
        its watermark free once anything runs this step."""
        if self.kv_left is None:
            return True
        watermark = self.limits.watermark_blocks if (self.limits.running or self.codes) else 0
        return entry.blocks + watermark <= self.kv_left + freed

    def kv_fits_all(self, entries: Sequence[Entry], room: _Room | None = None) -> bool:
        """All of `entries` would find their blocks free (with the plan's room at `room`)."""
        kv_left = (room or self).kv_left
        return kv_left is None or sum(e.blocks for e in entries) + self.limits.watermark_blocks <= kv_left

    def take(self, entry: Entry, reason: Reason, tokens: int | None = None) -> None:
        tokens = entry.length if tokens is None else tokens
        code = self.codes[entry] = tokens << REASON_BITS | _CODES[reason]
        self._chunks += (code & _REASON_MASK) in _CHUNK_CODES
        self._charge(tokens, +1)
        if self.kv_left is not None:
            self.kv_left -= entry.blocks
        if entry.group is not None:
            self._group_counts[entry.group] = self._group_counts.get(entry.group, 0) + 1

    def untake(self, entry: Entry) -> None:
        code = self.codes.pop(entry)
        if entry.bin is None and not entry.pinned:  # free again: scans must see it
            self.free_below = min(self.free_below, (entry.length, 0))
        self._chunks -= (code & _REASON_MASK) in _CHUNK_CODES
        self._charge(code >> REASON_BITS, -1)
        if self.kv_left is not None:
            self.kv_left += entry.blocks
        if entry.group is not None:
            self._group_counts[entry.group] -= 1

    def _charge(self, tokens: int, count: int) -> None:
        """`count` requests of `tokens` each into the plan (negative: out of it)."""
        self.token_left -= count * tokens
        if self.input_left is not None:
            self.input_left -= count * (tokens + self.limits.overhead)
        self.planned_tokens += count * tokens
        self.seats -= count

    def take_shortest(self, level: _Level, taken: list[Entry]) -> None:
        """(b) free prompts shortest first while they fit (appended to `taken`), from
        `free_below` on. The hot loop of a plan (a hundred picks a step): where no LoRA limit
        applies, as many of a run of equal lengths as fit are taken at once (the count is
        arithmetic: lengths and the per-request overhead are the same across a run), read
        from the run's entries (their keys untouched)."""
        free = level.free
        if self.limits.max_groups is not None:
            for entry in free.entries_from(self.free_below):
                if not self.has_room():
                    return
                if self.taken(entry) or not self.group_ok(entry):
                    continue
                if entry.length > self.left or not self.kv_fits(entry):
                    return  # blocks grow with length: no longer prompt fits either
                self.take(entry, Reason.SHORT)
                taken.append(entry)
            return
        limits, picks = self.limits, self.codes
        check = bool(picks)
        start, stop = self.free_below, END
        for length in free.lengths_from(start[0]):
            skip = start[1] if length == start[0] else 0  # prompts of this length known taken
            fit = self.fitting(length)
            if fit <= 0:
                stop = (length, skip)
                break
            entries = free.run_from(length, start)
            chosen: list[Entry] = []
            at = skip  # the run's prompts before this position are taken or chosen
            while len(chosen) < fit:
                more = list(islice(entries, fit - len(chosen)))
                if not more:
                    break  # the run is spent: on to the next length
                at += len(more)
                chosen += [entry for entry in more if entry not in picks] if check else more
            full = len(chosen) == fit
            if self.kv_left is not None:
                kv_left = self.kv_left
                watermark = limits.watermark_blocks if (limits.running or picks) else 0
                for index, entry in enumerate(chosen):
                    blocks = entry.blocks
                    if blocks + watermark > kv_left:
                        # blocks grow with length: no longer prompt fits either
                        at = skip if check else skip + index
                        del chosen[index:]
                        full = True
                        break
                    kv_left -= blocks
                    watermark = limits.watermark_blocks
                self.kv_left = kv_left
            if chosen:
                self.take_run(chosen, length, Reason.SHORT)
                taken += chosen
            if full:  # the next prompt of this length (or a longer one) does not fit
                stop = (length, at)
                break
        self.free_below = stop

    def fitting(self, length: int) -> int:
        """How many more whole prompts of `length` fit (tokens, inputs with their overhead,
        seats): arithmetic, as every prompt of a run is alike."""
        fit = min(self.seats, self.token_left // length)
        if self.input_left is not None:
            overhead = self.limits.overhead
            fit = min(fit, (self.input_left - overhead - length) // (length + overhead) + 1)
        return fit

    def take_run(self, entries: list[Entry], length: int, reason: Reason) -> None:
        """Whole prompts of one `length` that fit (``fitting``), charged at once: no LoRA
        limit applies, and their KV blocks, where tracked, are the caller's to count."""
        self.codes.update(dict.fromkeys(entries, length << REASON_BITS | _CODES[reason]))
        self._charge(length, len(entries))

    def take_in_order(self, entry: Entry, reason: Reason) -> bool:
        """A must-go-first request: whole, else a chunk, else the plan stops here. One whose
        LoRA adapter cannot load this step is passed over, as vLLM skips it."""
        if self.taken(entry) or not self.group_ok(entry):
            return True
        if not self.has_room() or not self.kv_fits(entry):
            self.blocked = True  # it keeps its place: it waits for blocks as vLLM would
            return False
        if entry.length <= self.left:
            self.take(entry, reason)
            return True
        if self.limits.chunked_prefill and self.left >= self.limits.min_chunk_tokens:
            self.take(entry, Reason.CHUNK, self.left)
        self.blocked = True
        return False

    def chunk_next(self, level: _Level) -> None:
        """(d) the shortest prompt that did not fit whole gets a chunk of what is left."""
        if not self.limits.chunked_prefill or not self.has_room():
            return
        misses = 0
        for entry in level.free.entries_from(self.free_below):
            if self.taken(entry):
                continue
            if self.group_ok(entry) and self.kv_fits(entry):
                self.chunk(entry)
                return
            misses += 1
            if misses >= FIT_PROBES:
                return

    def chunk(self, entry: Entry) -> None:
        """A chunk of `entry` with what is left; below `min_chunk_tokens`, only the candidate
        for the CUDA-graph top-up."""
        if self.left >= max(1, self.limits.min_chunk_tokens):
            self.take(entry, Reason.CHUNK, self.left)
        else:
            self._chunk_candidate = entry

    def top_up(self) -> None:
        """Fill the gap up to the next CUDA-graph size: vLLM pads to it anyway."""
        entry = self._chunk_candidate
        if entry is None or not self.limits.capture_sizes or self.seats <= 0:
            return
        total = self.limits.used_tokens + self.planned_tokens
        gap = min(padding_gap(total, self.limits.capture_sizes), self.left, entry.length)
        if gap > 0:
            self.take(entry, Reason.TOPUP, gap)
