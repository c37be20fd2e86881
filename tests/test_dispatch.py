"""Token-aware dispatch (pure): hypothesis properties and the planner's cost, counted."""

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_prepack import dispatch
from vllm_prepack.dispatch import ORDERS, Dispatcher


def simulate(tokens, replicas, unit_tokens, order, window, choices, owner=None, kills=()):
    """The driver's loop with replicas that finish (or die) in an order the test picks.
    Returns the lines completed, in order, and every unit handed out with its budget."""
    d = Dispatcher(replicas, unit_tokens, order, owner)
    source = iter(enumerate(tokens, start=1))
    completed, units, kills = [], [], list(kills)

    def fill():
        while not d.exhausted and d.size < window:
            nxt = next(source, None)
            if nxt is None:
                d.exhausted = True
            else:
                d.add([nxt[0]], [nxt[1]], [nxt[0]])

    def top_up(r):
        while r in d.alive and d.pending(r) < 2:
            fill()
            budget = d.budget()
            unit = d.take(r)
            if unit is None:
                return
            units.append((unit, budget))
        mine = sum(1 for u in d.inflight.values() if u.replica == r)
        assert mine == 2 or r not in d.alive or not (d.heaps.get(r) or d.heaps[None])

    def check():
        """The window's books: what waits is counted, weighed, and owned by a live replica."""
        waiting = [e for heap in d.heaps.values() for e in heap]
        assert d.size == len(waiting)
        assert d.tokens == pytest.approx(sum(e[3] for e in waiting), abs=1e-6)
        assert all(r is None or r in d.alive for r, heap in d.heaps.items() if heap)
        assert all(u.replica in d.alive for u in d.inflight.values())
        assert all(d.pending(r) == sum(u.replica == r for u in d.inflight.values())
                   for r in range(replicas))

    for r in range(replicas):
        top_up(r)
    step, alive = 0, set(d.alive)
    while d.inflight:
        inflight = sorted(d.inflight)
        pick = inflight[choices[step % len(choices)] % len(inflight)] if choices else inflight[0]
        step += 1
        unit = d.inflight[pick]
        if kills and kills[0] <= step and len(d.alive) > 1:
            kills.pop(0)
            d.lost(unit.replica)
        else:
            d.done(pick)
            completed.extend(unit.lines)
        check()
        # as the driver's serve() does: everyone after a death, else the one that finished,
        # then the replicas with room whose pinned requests wait
        for r in sorted(d.alive) if d.alive != alive else [unit.replica]:
            top_up(r)
        while idle := [r for r in d.pinned_waiting() if d.pending(r) < 2]:
            for r in idle:
                top_up(r)
        alive = set(d.alive)
        check()
    assert d.finished
    return completed, units, d


jobs = dict(
    tokens=st.lists(st.integers(1, 3000), max_size=150),
    replicas=st.integers(1, 5),
    unit_tokens=st.integers(1, 6000),
    order=st.sampled_from(ORDERS),
    window=st.integers(1, 40),
    choices=st.lists(st.integers(0, 1000), max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(**jobs, kills=st.lists(st.integers(1, 60), max_size=4).map(sorted))
def test_every_request_exactly_once_and_budgets_honoured(tokens, replicas, unit_tokens, order,
                                                        window, choices, kills):
    completed, units, _ = simulate(tokens, replicas, unit_tokens, order, window, choices, kills=kills)
    assert sorted(completed) == list(range(1, len(tokens) + 1))
    for unit, budget in units:
        assert budget <= unit_tokens
        assert len(unit.entries) == 1 or unit.tokens <= budget
        assert unit.payloads == unit.lines


@settings(max_examples=150, deadline=None)
@given(**jobs, kills=st.lists(st.integers(1, 60), max_size=3).map(sorted),
       shards=st.booleans())
@example(tokens=[10] * 6, replicas=2, unit_tokens=5, order="arrival", window=1, choices=[0],
         kills=[], shards=True)  # replica 1 idle while the window holds replica 0's last line
def test_pinned_requests_go_to_their_replica_or_to_all_once_it_dies(tokens, replicas, unit_tokens,
                                                                     order, window, choices, kills,
                                                                     shards):
    """Any window: lines pinned to a replica with nothing in flight still reach it."""
    size = -(-len(tokens) // replicas) or 1
    owner = ((lambda line: (line - 1) // size) if shards  # noqa: E731  (row shards)
             else (lambda line: line % replicas))  # (round-robin rows)
    completed, units, d = simulate(tokens, replicas, unit_tokens, order, window, choices,
                                   owner=owner, kills=kills)
    assert sorted(completed) == list(range(1, len(tokens) + 1))
    if not kills:
        assert all(owner(line) == unit.replica for unit, _ in units for line in unit.lines)
        assert d.ops == 2 * len(tokens)  # one push and one pop a request, pinned or not
    dead = set(range(replicas)) - d.alive
    assert all(owner(line) == unit.replica or owner(line) in dead
               for unit, _ in units for line in unit.lines)


def test_lines_read_after_their_replica_died_go_to_the_others():
    d = Dispatcher(2, 10, owner=lambda line: 1)
    d.add([1], [5.0], ["a"])
    d.lost(1)
    d.add([2], [5.0], ["b"])
    unit = d.take(0)
    assert unit.lines == [1, 2]
    d.exhausted = True
    d.done(unit.id)
    assert d.finished


def test_units_shrink_at_the_end_so_replicas_finish_together():
    _, units, _ = simulate([100] * 400, 2, 4000, "arrival", 1000, [0])
    sizes = [unit.tokens for unit, _ in units]
    assert sizes[0] == 4000 and sizes[-1] <= 4000 / 8 + 100


def test_longest_first_within_the_window():
    _, units, _ = simulate([5, 50, 500, 10, 1000], 1, 1, "longest", 10, [0])
    assert [u.tokens for u, _ in units] == [1000, 500, 50, 10, 5]
    _, units, _ = simulate([5, 50, 500, 10, 1000], 1, 1, "arrival", 10, [0])
    assert [u.tokens for u, _ in units] == [5, 50, 500, 10, 1000]


class CountingHeap:
    """heapq's push and pop, counting comparisons (the C heapq cannot be counted)."""

    def __init__(self):
        self.comparisons = 0

    def less(self, a, b):
        self.comparisons += 1
        return a < b

    def heappush(self, heap, item):
        heap.append(item)
        i = len(heap) - 1
        while i > 0 and self.less(item, heap[(i - 1) // 2]):
            heap[i] = heap[(i - 1) // 2]
            i = (i - 1) // 2
        heap[i] = item

    def heappop(self, heap):
        last = heap.pop()
        if not heap:
            return last
        top, heap[0] = heap[0], last
        i, n = 0, len(heap)
        while 2 * i + 1 < n:
            c = 2 * i + 1
            if c + 1 < n and self.less(heap[c + 1], heap[c]):
                c += 1
            if not self.less(heap[c], last):
                break
            heap[i] = heap[c]
            i = c
        heap[i] = last
        return top


@pytest.mark.parametrize("order", ORDERS)
def test_planning_cost_is_n_log_window(monkeypatch, order):
    """Comparisons grow linearly with the job for a fixed window (O(n log W)), where the static
    planner this replaced grew quadratically."""
    import random

    counts = {}
    window = 1024
    for n in (10_000, 100_000):
        counter = CountingHeap()
        monkeypatch.setattr(dispatch, "heapq", counter)
        rng = random.Random(0)
        tokens = [rng.randint(600, 1500) if rng.random() < 0.15 else rng.randint(10, 80)
                  for _ in range(n)]
        _, _, d = simulate(tokens, 4, 8192, order, window, [0, 1, 2, 3])
        assert d.ops == 2 * n  # one push and one pop a request
        counts[n] = counter.comparisons
        assert counter.comparisons <= 3 * n * math.log2(window)  # push log W, pop 2 log W
    assert counts[100_000] <= 11 * counts[10_000]


def test_bad_arguments():
    with pytest.raises(ValueError, match="^need at least one replica$"):
        Dispatcher(0, 10)
    with pytest.raises(ValueError, match="^unit_tokens must be positive$"):
        Dispatcher(1, 0)
    with pytest.raises(ValueError, match="^unknown order 'random'; choose from longest, arrival$"):
        Dispatcher(1, 10, "random")
    d = Dispatcher(2, 10)
    d.lost(1)
    with pytest.raises(ValueError, match="^replica 1 is not alive$"):
        d.take(1)
    with pytest.raises(RuntimeError, match="^every replica died$"):
        d.lost(0)


@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.integers(1, 5000), max_size=200), batch_size=st.integers(1, 40))
def test_balanced_batches_are_full_and_close(weights, batch_size):
    from vllm_prepack.dispatch import balanced_batches

    batches = balanced_batches(weights, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(weights)))
    assert all(len(b) == batch_size for b in batches[:-1])
    assert not batches or 1 <= len(batches[-1]) <= batch_size
    full = [sum(weights[i] for i in b) for b in batches if len(b) == batch_size]
    if len(full) > 1:  # LPT bound: full batches differ by at most the heaviest item
        assert max(full) - min(full) <= max(weights)


def test_balanced_batches_place_the_heaviest_first():
    """Heaviest first: [5, 4, 3, 3, 3, 2] in batches of 3 balance exactly (10 and 10), where
    lightest first would give 9 and 11."""
    from vllm_prepack.dispatch import balanced_batches

    weights = [5, 4, 3, 3, 3, 2]
    with pytest.raises(ValueError, match="^batch_size must be >= 1$"):
        balanced_batches(weights, 0)
    assert sorted(sum(weights[i] for i in b) for b in balanced_batches(weights, 3)) == [10, 10]
