"""Property-based tests of the pure per-step policy (no vLLM)."""

import bisect
import gc
import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_prepack.bench.harness import ffd_steps, lower_bound_steps
from vllm_prepack import policy
from vllm_prepack.cost import StepCost
from vllm_prepack.policy import (AGED_PROBES, BIG_BINS_PER_STEP, BINS_PER_STEP, FILL_SLACK, KV_PATIENCE_STEPS, PACK_SHARE, PACK_Z, RELEASE_PER_STEP, SWEEP_ROWS, AgingBound, Entry, Pick, Reason,
                                  StepLimits, WaitingSet, _bin_id, padding_gap)
from vllm_prepack.workloads import prompt_lengths

lengths_st = st.lists(st.integers(1, 300), min_size=0, max_size=60)


def gap_credit(level, open_share: float) -> float:
    """Tokens of gap a level's bins may still leave open at `open_share` (the policy's count)."""
    return policy._gap_credit(open_share, level.binned, level.left_open)


def fill(lengths, **kw):
    ws = WaitingSet(**kw)
    for i, n in enumerate(lengths):
        ws.add(Entry(key=i, length=n))
    return ws


def run_to_empty(ws, limits, arrivals=(), max_steps=10_000):
    """Apply plans step by step; returns {key: [(step, tokens), ...]} and per-step plans."""
    done, plans, step = {}, [], 0
    pending = sorted(arrivals)  # (step, key, length)
    while (len(ws) or pending) and step < max_steps:
        while pending and pending[0][0] <= step:
            _, key, n = pending.pop(0)
            ws.add(Entry(key=key, length=n, step=step))
        picks = ws.plan(limits, step=step)
        plans.append(picks)
        for pick in picks:
            done.setdefault(pick.key, []).append((step, pick.tokens))
            entry = ws.remove(pick.key)
            if pick.tokens < entry.length:  # a chunk: the rest continues, pinned, next step
                entry.length -= pick.tokens
                ws.pin([entry])
        step += 1
    return done, plans


@settings(max_examples=200, deadline=None)
@given(
    lengths=lengths_st,
    budget=st.integers(1, 600),
    seats=st.integers(1, 20),
    chunked=st.booleans(),
    swaps=st.integers(0, 6),
    aging=st.one_of(st.none(), st.integers(1, 10)),
)
def test_every_request_scheduled_once_within_budget(lengths, budget, seats, chunked, swaps, aging):
    if not chunked:
        budget = max([budget, *lengths])  # without chunking every prompt must fit one step
    ws = fill(lengths, aging=AgingBound(steps=aging), max_swaps=swaps)
    limits = StepLimits(budget=budget, seats=seats, chunked_prefill=chunked)
    done, plans = run_to_empty(ws, limits)
    assert len(ws) == 0
    assert sorted(done) == list(range(len(lengths)))
    for key, parts in done.items():
        assert sum(t for _, t in parts) == lengths[key]  # every token exactly once
        if not chunked:
            assert len(parts) == 1  # whole prompts only
    for picks in plans:
        assert sum(p.tokens for p in picks) <= budget
        assert len(picks) <= seats
        assert len({p.key for p in picks}) == len(picks)
        assert all(p.tokens > 0 for p in picks)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, budget=st.integers(1, 600), chunked=st.booleans())
def test_plan_is_deterministic_and_pure(lengths, budget, chunked):
    """The same waiting set plans the same step; planning admits nothing (it may reserve
    more bins on a second call, so a repeated plan may differ)."""
    a, b = fill(lengths), fill(lengths)
    limits = StepLimits(budget=budget, seats=64, chunked_prefill=chunked)

    def seen(ws, plan):  # entries are equal by identity: the two sets compare by value
        stop = ws.stop.key if ws.stop is not None else None
        return stop, [(p.key, p.tokens, p.reason, p.entry.seq, p.entry.bin, p.entry.length) for p in plan]

    assert seen(a, a.plan(limits)) == seen(b, b.plan(limits))
    assert seen(a, a.plan(limits, step=1)) == seen(b, b.plan(limits, step=1))
    assert len(a) == len(lengths) and sorted(a) == sorted(range(len(lengths)))


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, budget=st.integers(1, 600))
def test_best_fit_exchange_never_fills_less_than_shortest_first(lengths, budget):
    limits = StepLimits(budget=budget, seats=10_000, chunked_prefill=False)
    spt = sum(p.tokens for p in fill(lengths, max_swaps=0).plan(limits))
    packed = sum(p.tokens for p in fill(lengths, max_swaps=4).plan(limits))
    assert spt <= packed <= budget
    # SPT alone admits the most requests; exchanges trade one short pick for one longer
    assert len(fill(lengths, max_swaps=4).plan(limits)) <= len(fill(lengths, max_swaps=0).plan(limits))


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=40), aging=st.integers(1, 8))
def test_aging_bound_limits_every_wait(lengths, aging):
    """Budget >= any prompt: a request waits at most aging + (requests admitted before it) steps."""
    ws = fill(lengths, aging=AgingBound(steps=aging))
    limits = StepLimits(budget=100, seats=1000, chunked_prefill=False)
    done, _ = run_to_empty(ws, limits)
    for key, [(step, _)] in done.items():
        assert step <= aging + key


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=2, max_size=AGED_PROBES + 1),
       aging=st.integers(1, 8), budget=st.integers(1, 400), chunked=st.booleans())
def test_aged_requests_go_first_oldest_first(lengths, aging, budget, chunked):
    """Within the bounded aged scan (AGED_PROBES misses), no younger request takes a place an
    aged one could have had."""
    if not chunked:
        budget = max(budget, 100)
    ws = fill(lengths[:-1], aging=AgingBound(steps=aging))
    ws.add(Entry(key="young", length=1, step=aging + 3))  # the shortest, but not aged
    step = aging + 3  # everything else is aged
    picks = ws.plan(StepLimits(budget=budget, seats=1000, chunked_prefill=chunked), step=step)
    assert picks[0].key == 0  # the oldest starts first (whole or as a chunk)
    # first fit in age order, then best-fit exchanges among overdue requests only
    assert all(p.key != "young" for p in picks if p.reason == Reason.AGED)
    if any(p.key == "young" for p in picks):
        left = budget - sum(p.tokens for p in picks)
        picked = {p.key for p in picks}
        for key, n in enumerate(lengths[:-1]):
            assert key in picked or n > left + 1, f"aged request {key} fitted in young's place"


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(1, 200), st.integers(0, 30)), min_size=1, max_size=40),
       factor=st.floats(0.25, 4), budget=st.integers(200, 600), used=st.integers(0, 100),
       chunked=st.booleans())
def test_deadlines_are_fixed_at_arrival_from_the_queue_joined(entries, factor, budget, used, chunked):
    """A request's deadline is its admission step + factor x (tokens waiting when it was first
    planned / step budget); overdue requests go first, earliest deadline first."""
    ws = WaitingSet(aging=AgingBound(drain_factor=factor))
    ordered = sorted(entries, key=lambda e: e[1])
    limits = StepLimits(budget=budget, seats=1000, chunked_prefill=chunked, used_tokens=used)
    for key, (n, admitted) in enumerate(ordered):
        ws.add(Entry(key=key, length=n, step=admitted))
    ws.plan(limits, step=0)  # dates every arrival from the queue as it is now
    drain = sum(n for n, _ in entries) / (budget + used)
    due = {key: admitted + factor * drain for key, (_, admitted) in enumerate(ordered)}
    ws.add(Entry(key="late", length=1, step=30))  # dated at the next plan, from that queue
    due["late"] = 30 + factor * (sum(n for n, _ in entries) + 1) / (budget + used)
    step = 31
    picks = ws.plan(limits, step=step)
    overdue = {key for key, d in due.items() if step >= d}
    assert {p.key for p in picks if p.reason == Reason.AGED} <= overdue
    if overdue:
        assert picks[0].key == min(overdue, key=lambda k: (due[k], str(k)))  # EDF (whole, or a chunk)
        assert ws.first(step) == picks[0].key


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 300)), max_size=80))
def test_token_total_follows_adds_and_removals(ops):
    """The drain time behind every deadline is the waiting tokens: removals must count."""
    ws, alive = WaitingSet(), {}
    for key, (add, n) in enumerate(ops):
        if add or not alive:
            ws.add(Entry(key=key, length=n))
            alive[key] = n
        else:
            victim = sorted(alive)[n % len(alive)]
            ws.remove(victim)
            del alive[victim]
        ws.plan(StepLimits(budget=400, seats=100, chunked_prefill=False), step=key)
    assert ws.tokens == sum(alive.values())
    assert sorted(ws, key=str) == sorted(alive, key=str)


def test_entries_are_told_apart_by_identity_not_by_their_fields():
    """Entries are equal by identity (a plan keys its picks by entry): two alike in every field
    are two requests, and a request that came back under its key is planned as the entry it
    came back with."""
    first, again = Entry(key="r", length=5), Entry(key="r", length=5)
    assert first != again and len({first, again}) == 2
    ws = WaitingSet()
    ws.add(first)
    ws.remove("r")
    ws.add(again)
    plan = ws.plan(StepLimits(budget=100, seats=4))
    assert len(plan) == 1 and plan[0].entry is again and plan[0].key == "r"


def assert_consistent(ws: WaitingSet) -> None:
    """Every index of `ws` agrees with its waiting entries."""
    entries = ws.entries
    assert ws.tokens == sum(e.length for e in entries.values())
    for level in ws._levels.values():
        order = list(level.order)  # unpinned, oldest first
        fifo = {e.key: e for e in order}
        assert order == sorted(order, key=lambda e: e.seq) and len(order) == len(fifo) == len(level.order)
        assert all(entries[k] is e for k, e in fifo.items())
        free = set(level.free)
        assert sorted(set(level.free.lengths)) == list(level.free.lengths)
        for length in level.free.lengths:  # oldest first within a length
            run = level.free.run(length)
            seqs = [e.seq for e in run]
            assert run and seqs == sorted(seqs)
            assert all(fifo[e.key] is e and e.length == length for e in run)
        binned = {e.key for b in level.bins.values() for e in b.members}
        assert all(e.bin == i for i, b in level.bins.items() for e in b.members)
        assert all(fifo[k].bin is None for k in free)
        lengths = list(level.free.lengths)
        for start in {0, *lengths[:1], *(n + 1 for n in lengths[-1:]), *lengths[len(lengths) // 2:][:1], math.inf}:
            assert list(level.free.lengths_from(start)) == list(level.free.lengths.irange(start))
        assert all(fifo[e.key] is e for b in level.bins.values() for e in b.members)
        assert free.isdisjoint(binned) and free | binned == set(fifo)
        assert level.free_tokens == sum(fifo[k].length for k in free)
        cohorts = {id(e.cohort): e.cohort for e in fifo.values()}
        for cohort in cohorts.values():
            members = list(cohort.members)
            assert members == sorted(members, key=lambda e: e.seq) and len(members) == len(cohort.members)
            assert cohort.members.rows <= 2.5 * len(cohort.members) + SWEEP_ROWS
        assert sum(len(c.members) for c in cohorts.values()) == len(fifo)
        dated = {e.key: cohort.due for cohort in level.cohorts.values() for e in cohort.members}
        assert len(level.cohorts) == len(level.by_due)
        assert all(level.cohorts[c].due == due and level.cohorts[c].members for due, _, c in level.by_due)
        assert all(fifo[k].due == due for k, due in dated.items())
        assert {k for k, e in fifo.items() if e.due != math.inf} == set(dated)
        ranked = {_bin_id(rank): rank for rank in level._ranking}  # read without ranking them again
        assert len(ranked) == len(level._ranking) and ranked.keys().isdisjoint(level._unranked)
        assert ranked.keys() | level._unranked == level.bins.keys()
        assert all(rank == level.bins[i].order(i) for i, rank in ranked.items())
        assert all(b.shortest == min(e.length for e in b.members) for b in level.bins.values())
        assert all(b.members == sorted(b.members, key=lambda e: -e.length)  # longest first
                   for b in level.bins.values())
        assert all(len(b.members) <= level.most_members for b in level.bins.values())
        assert level.bins or level.most_members == 0
        assert level.order.rows <= 2.5 * len(level.order) + SWEEP_ROWS  # stale rows bounded
    assert sorted(ws, key=str) == sorted(entries, key=str)  # last: it ranks the bins again


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), same_objects=st.booleans(), chunked=st.booleans())
def test_admission_orders_stay_exact_through_many_removals(seed, same_objects, chunked):
    """A removal leaves a stale row in the admission orders, swept SWEEP_ROWS at a time once
    stale rows outnumber live ones: through hundreds of admissions, removals and re-admissions (of the same Entry
    objects too, which get a new admission order) the orders hold exactly the waiting entries,
    oldest first, and plans name only waiting keys."""
    rng = random.Random(seed)
    ws, left, step = WaitingSet(aging=AgingBound(drain_factor=0.5)), {}, 0
    for _ in range(8):
        step += 1
        for key in rng.sample(range(600), 200):
            if key not in ws:
                entry = left.pop(key, None) if same_objects else None
                if entry is None:
                    entry = Entry(key=key, length=rng.randint(1, 300), priority=rng.randint(0, 1))
                entry.step = step
                ws.add(entry)
        for key in rng.sample(sorted(ws.entries), k=len(ws) * 3 // 4):
            left[key] = ws.remove(key)
        for p in ws.plan(StepLimits(budget=512, seats=16, chunked_prefill=chunked), step=step):
            assert p.entry is ws.entries[p.key]
        assert_consistent(ws)


def test_a_scan_past_crowded_stale_rows_starts_a_sweep():
    """Requests admitted behind an overdue one that stays (here: planned, not yet admitted)
    leave stale rows that no front drop reaches; the next scan that passes them starts a
    sweep, and the removals that follow clear them."""
    ws = WaitingSet(aging=AgingBound(steps=1))
    for key in range(1000):
        ws.add(Entry(key=key, length=10))
    ws.plan(StepLimits(budget=100, seats=100, chunked_prefill=False), step=0)  # dated: due 1
    for key in range(1, 401):  # 400 stale rows behind the cohort's first, still waiting
        ws.remove(key)
    cohort = ws.entries[0].cohort
    assert cohort.members.rows == 1000 and len(cohort.members) == 600
    picks = ws.plan(StepLimits(budget=100, seats=100, chunked_prefill=False), step=5)
    assert [p.key for p in picks] == [0, *range(401, 410)]  # overdue, in admission order
    for key in range(990, 1000):  # ten removals sweep 320 rows from the front, 319 stale
        ws.remove(key)
    assert cohort.members.rows == 1000 - 319
    assert_consistent(ws)


def test_a_waiting_request_costs_the_garbage_collector_no_object_but_its_entry():
    """Every full collection walks every tracked object: at 100k waiting requests the policy's
    indexes (admission orders, cohorts, runs by length) add no tracked object a request,
    only a few per length, cohort or level."""
    entries = [Entry(key=f"r{i}", length=1 + i % 50, step=i // 1000) for i in range(20_000)]
    gc.collect()
    before = len(gc.get_objects())
    ws = WaitingSet(aging=AgingBound(drain_factor=1.0))
    for entry in entries:
        ws.add(entry)
    ws.plan(StepLimits(budget=1024, seats=256, chunked_prefill=False), step=20)
    for entry in entries[::2]:
        ws.remove(entry.key)
    gc.collect()
    assert len(gc.get_objects()) - before < 0.05 * len(entries)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "readd", "pin", "remove", "resize", "plan"]),
                              st.integers(0, 12), st.integers(1, 400), st.integers(0, 2)),
                    max_size=120),
       chunked=st.booleans(), order=st.sampled_from(["shortest", "ratio"]),
       costs_tokens=st.booleans())
def test_indexes_stay_consistent_under_any_operations(ops, chunked, order, costs_tokens):
    """add / re-add (the very Entry object that left, maybe in the same step) / pin / remove /
    resize / plan in any order: every index agrees with the waiting entries, and plans only
    name waiting keys."""
    # where a step costs its tokens (packing forced on), bins are left open once half full
    cost = StepCost.in_tokens(0.0) if costs_tokens else None
    ws = WaitingSet(aging=AgingBound(drain_factor=0.5), pack_share=0.0, order=order)
    step, left = 0, {}
    for op, key, n, prio in ops:
        if op == "add" and key not in ws:
            ws.add(Entry(key=key, length=n, priority=prio, step=step))
        elif op == "readd" and key in left and key not in ws:
            entry = left.pop(key)
            entry.step = step
            ws.add(entry)
        elif op == "pin" and key not in ws:
            ws.pin([Entry(key=key, length=n, priority=prio)])
        elif op == "remove" and key in ws:
            left[key] = ws.remove(key)
        elif op == "resize" and key in ws:
            ws.resize(key, n)
        elif op == "plan":
            step += 1
            for p in ws.plan(StepLimits(budget=n * 3, seats=8, chunked_prefill=chunked, cost=cost),
                             step=step):
                assert len(p) == len(Pick._fields) and p.entry is ws.entries[p.key]
    assert_consistent(ws)


def test_where_a_step_costs_its_tokens_a_bin_leaves_the_gap_a_short_prompt_would_wait_to_fill():
    """An 880-token prompt's bin: where every step costs the same it takes the 100-token prompt
    into its 120-token gap (the gap credit, FILL_SLACK of the 880 tokens, covers no 120), and
    the prompt waits in it; where a step costs its tokens (a = 0, packing forced on) no gap is
    worth its fillers' wait: it stays open, and the 100-token prompt goes first, shortest
    first."""
    assert FILL_SLACK * 880 < 120
    lengths = [880, 100] + [500] * 10
    for cost, reason in ((None, None), (StepCost.in_tokens(0.0), Reason.SHORT)):
        ws = fill(lengths, pack_share=0.0)
        limits = StepLimits(budget=1000, seats=16, chunked_prefill=False, cost=cost)
        reasons = {p.key: p.reason for p in ws.plan(limits)}
        assert reasons.get(1) == reason and (ws.entries[1].bin is None) == (reason is not None)
        assert_consistent(ws)


@pytest.mark.parametrize("slack", [0.0, 0.02, 0.05])
def test_the_gaps_bins_leave_open_add_up_to_the_slack_over_the_fixed_share(slack):
    """Forty 800-token prompts and 400 of 50 tokens, a step's fixed cost half a full step's: each
    bin's 200-token gap takes four short prompts or stays open, and the open gaps add up to
    ``bin_fill_slack`` / 0.5 of the tokens binned, less the credit not yet spent (under one gap
    and one bin's accrual), so the steps they add cost about that share of the time; the short
    prompts of the open gaps stay free, for shortest-first. Slack 0 fills every gap and bins
    the rest as offline FFD does, down to BUILD_MIN_STEPS steps' worth (eight bins of twenty)."""
    budget = 1000
    ws = fill([800] * 40 + [50] * 400, pack_share=0.0, fill_slack=slack)
    ws.plan(StepLimits(budget=budget, seats=1, chunked_prefill=False,
                       cost=StepCost.in_tokens(float(budget))))  # a = b x budget: share 0.5
    bins = list(ws._levels[0].bins.values())
    assert all(max(e.length for e in b.members) == 800 for b in bins[:40])
    assert len(bins) == (48 if slack == 0 else 40)
    binned = sum(b.tokens for b in bins)
    left_open = sum(budget - b.tokens for b in bins)
    credit = slack / 0.5 * binned - left_open  # what the open gaps have not spent
    assert 0 <= credit < 200 + slack / 0.5 * budget and credit == pytest.approx(
        gap_credit(ws._levels[0], slack / 0.5))
    assert (left_open == 0) == (slack == 0)
    assert len(list(ws._levels[0].free)) == 400 - (binned - 40 * 800) // 50
    assert_consistent(ws)


def test_gaps_left_open_on_a_lower_share_are_a_debt_once_the_share_reads_higher():
    """The credit is ``bin_fill_slack`` / the share now known of the tokens binned, less the
    gaps left open: bins built at a share of 0.5 leave gaps open (10% of their tokens); once
    the share reads 1 (5%), those gaps overdraw it, and the next bins fill theirs until the
    debt is paid. Counted at the rate of their day, the next bins would leave gaps open."""
    budget, slack = 1000, 0.05
    half = StepLimits(budget=budget, seats=1, chunked_prefill=False,
                      cost=StepCost.in_tokens(float(budget)))  # share 0.5
    whole = replace(half, cost=StepCost(1.0, 0.0))  # no cost per token: share 1
    for later in (half, whole):
        ws = fill([800] * 40 + [50] * 2000, pack_share=0.0, fill_slack=slack)
        ws.plan(half)
        level = ws._levels[0]
        first = set(level.bins)
        assert sum(budget - b.tokens for b in level.bins.values()) > 0.05 * level.binned
        assert gap_credit(level, slack / 0.5) >= 0 > gap_credit(level, slack)  # a debt at share 1
        for key in range(10**6, 10**6 + 20):
            ws.add(Entry(key=key, length=800, step=1))
        ws.plan(later, step=1)
        gaps = [budget - b.tokens for i, b in level.bins.items() if i not in first]
        assert len(gaps) == 20
        assert (max(gaps) == 0) == (later is whole)
        assert_consistent(ws)


def test_bins_built_on_the_prior_guess_come_at_the_common_pace_and_leave_the_least_open():
    """Before the fit has its steps (``StepLimits.cost_learning``) a plan builds BINS_PER_STEP
    bins even of prompts over half the budget (most of a backlog's wait for the fit), and
    credits their gaps as if a step were all fixed cost (``bin_fill_slack`` of the tokens
    binned), not at the prior's share: a gap left open is not closed when the fit reads a
    larger share. Forty 800-token prompts at a share of 0.25: eight bins, their open gaps
    within 5% of their tokens; fitted, all forty, within 20% and over 5%."""
    budget, slack, share = 1000, 0.05, 0.25
    cost = StepCost.in_tokens(budget / 3)  # a = b x budget / 3: share 0.25
    for learning, bins in ((True, BINS_PER_STEP), (False, 40)):
        ws = fill([800] * 40 + [50] * 400, pack_share=0.0, fill_slack=slack)
        ws.plan(StepLimits(budget=budget, seats=1, chunked_prefill=False, cost=cost,
                           cost_learning=learning))
        level = ws._levels[0]
        assert len(level.bins) == bins and level.left_open > 0
        assert gap_credit(level, slack / share) >= 0
        assert (gap_credit(level, slack) >= 0) == learning
        assert_consistent(ws)


@pytest.mark.parametrize("mix", ["trimodal", "bimodal", "wikitext512"])
@pytest.mark.parametrize("work", [policy.FULL_BUILD_WORK, 256])
def test_with_no_bin_slack_a_deep_backlog_takes_offline_ffd_s_steps(mix, work, monkeypatch):
    """`bin_fill_slack` 0 asks for the fewest steps: the whole backlog is binned as offline FFD
    bins it, and shortest-first waits while prompts are left to bin, so no filler is spent
    first, however many plans the binning takes (FULL_BUILD_WORK; 256: about forty). At 8 and
    then 32 bins a plan, with shortest-first going on meanwhile, the first seed's trimodal
    backlog took 427 and then 423 steps against FFD's 422."""
    monkeypatch.setattr(policy, "FULL_BUILD_WORK", work)
    lengths = prompt_lengths(mix, 5000, seed=0, max_len=1023)
    ws = fill(lengths, pack_share=0.0, fill_slack=0.0)
    done, plans = run_to_empty(ws, StepLimits(budget=1024, seats=1024, chunked_prefill=False))
    assert len(done) == len(lengths)
    assert len(plans) == ffd_steps(lengths, 1024)


def test_with_no_bin_slack_bins_come_at_the_common_pace_until_packing_is_sure():
    """A share over the threshold but within PACK_Z deviations of it reserves bins without
    serving them ahead (they may be freed again): at slack 0 they come BINS_PER_STEP a plan, as
    at any slack, and the whole backlog's once the share is sure."""
    ws = fill(prompt_lengths("trimodal", 5000, seed=0, max_len=1023), fill_slack=0.0)
    cost = StepCost.in_tokens(512.0)  # a / (a + b x 1024): a share of 1/3, over 0.25
    unsure = StepLimits(budget=1024, seats=64, chunked_prefill=False, cost=cost, share_sd=0.1)
    ws.plan(unsure)
    assert ws.reserving and not ws.packing and len(ws._levels[0].bins) == BINS_PER_STEP
    ws.plan(replace(unsure, share_sd=0.0))
    assert ws.packing and len(ws._levels[0].bins) > 10 * BINS_PER_STEP
    assert_consistent(ws)


def test_bins_no_plan_reads_are_ranked_in_batches_not_all_at_the_first_read():
    """Where shortest-first's steps start more requests than any bin can (a deep backlog of
    short prompts), no plan reads the ranking: new bins wait unranked, RANK_BATCH at most, so
    no plan ranks a whole backlog's bins at once."""
    batch = policy.RANK_BATCH
    # bins of one long prompt each and a few short ones, BIG_BINS_PER_STEP a plan
    lengths = [1000 + i % 25 for i in range(3 * batch)] + [1] * (40 * batch)
    ws = fill(lengths)
    limits = StepLimits(budget=1024, seats=1024, chunked_prefill=False,
                        cost=StepCost.in_tokens(1024.0))
    level = ws._levels[0]
    for step in range(-(-5 * batch // (2 * BIG_BINS_PER_STEP))):
        for pick in ws.plan(limits, step):
            assert pick.reason is not Reason.BIN  # shortest-first wins every step
            ws.remove(pick.key)
        assert len(level._unranked) < policy.RANK_BATCH
    assert len(level.bins) > 2 * policy.RANK_BATCH  # most of them ranked, no read in between
    assert_consistent(ws)


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """The textbook algorithm: each length, longest first, into the first bin it fits."""
    bins: list[list[int]] = []
    for length in sorted(lengths, reverse=True):
        for b in bins:
            if sum(b) + length <= budget:
                b.append(length)
                break
        else:
            bins.append([length])
    return bins


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=300),
       budget=st.integers(300, 700))
def test_with_no_bin_slack_the_bins_are_first_fit_decreasing_s(lengths, budget):
    """Filled one at a time with the longest free prompt that fits, the bins are the ones
    first-fit decreasing builds (it puts each prompt, longest first, in the first bin it fits):
    the same lengths, bin by bin, until the free prompts hold BUILD_MIN_STEPS steps or fewer."""
    ws = fill(lengths, pack_share=0.0, fill_slack=0.0)
    ws.plan(StepLimits(budget=budget, seats=8, chunked_prefill=False))
    level = ws._levels[0]
    built = [sorted((e.length for e in b.members), reverse=True) for b in level.bins.values()]
    assert built == first_fit_decreasing(lengths, budget)[:len(built)]
    assert level.free_tokens <= policy.BUILD_MIN_STEPS * budget
    assert_consistent(ws)


@settings(max_examples=50, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=400),
       queries=st.lists(st.integers(0, 5100), min_size=1, max_size=50),
       known=st.sampled_from([0, 50, 3000]), seed=st.integers(0, 3))
def test_the_longest_length_at_most_a_gap_is_found_across_the_sorted_list_s_sublists(
        ops, queries, known, seed):
    """``longest_at_most`` reads the sorted list's sublists directly: it agrees with a scan of
    the lengths present, with thousands of them (several sublists) and after removals; so does
    the best-fit search's scan down from a gap, which steps by it."""
    free, seq = policy._ByLength(), iter(range(10**6))
    for length in random.Random(seed).sample(range(1, 5001), known) + [
            length for add, length in ops if add]:
        free.add(Entry(key=None, length=length, seq=next(seq)))
    for add, length in ops:
        if not add and length in free.lengths:
            free.remove(next(iter(free.run(length))))
    present = sorted(free.lengths)
    for tokens in queries + [length - 1 for length in present] + present:  # every edge
        at = bisect.bisect_right(present, tokens)
        assert free.longest_at_most(tokens) == (present[at - 1] if at else None)
    for tokens in queries[:10]:
        below = present[:bisect.bisect_right(present, tokens)]
        assert [e.length for e in free.scan_down(tokens)] == [
            length for length in reversed(below) for _ in free.run(length)]


@given(bins=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 2**48 - 1),
                               st.integers(0, 2**48 - 1)), min_size=1, max_size=40,
                     unique_by=lambda b: b[2]))
def test_a_bin_s_rank_orders_as_most_members_then_fewest_tokens_and_gives_its_id_back(bins):
    """A bin's rank is one int (no tuple to read in a ranking's comparisons): it sorts as
    (-members, tokens, id) would, and ``_bin_id`` reads the id back, up to 2**48 tokens and ids."""
    ranks = {(-members, tokens, bin_id): policy._Bin(set(range(members)), tokens, 1).order(bin_id)
             for members, tokens, bin_id in bins}
    assert [ranks[key] for key in sorted(ranks)] == sorted(ranks.values())
    assert all(_bin_id(rank) == key[2] for key, rank in ranks.items())


def test_a_bin_takes_its_longest_prompt_and_is_left_open_only_once_half_full():
    """However large the credit (a tiny fixed cost: ``bin_fill_slack`` / share over 25), a bin
    takes its longest prompt, and one of short prompts fills to half the budget before its gap
    may stay open: the 900- and 600-token prompts' bins stay open, the 50-token prompts go ten to
    a bin."""
    ws = fill([900, 600, 100] + [50] * 100, pack_share=0.0, fill_slack=0.25)
    ws.plan(StepLimits(budget=1000, seats=4, chunked_prefill=False, cost=StepCost.in_tokens(10.0)))
    bins = list(ws._levels[0].bins.values())
    assert [sorted(e.length for e in b.members) for b in bins[:2]] == [[900], [600]]
    assert all(b.tokens >= 500 for b in bins) and len(bins) > 2
    assert_consistent(ws)


def test_the_gap_credit_is_kept_within_credit_bins_and_a_free_step_adds_none(monkeypatch):
    """Full bins bank the credit up to CREDIT_BINS bins' accrual, no more; a plan where a step
    has no fixed cost (every bin left open once half full) adds none, so a share that turns
    positive later finds no inflated credit: the first bin of 100-token prompts fills to the
    budget (a credit of CREDIT_BINS bins would leave it open at half), and a gap is left open
    only once the bins have paid for it."""
    half = StepCost.in_tokens(1000.0)  # share 0.5 at a budget of 1000: open_share 0.1
    limits = StepLimits(budget=1000, seats=1, chunked_prefill=False, cost=half)
    with monkeypatch.context() as patch:
        patch.setattr(policy, "CREDIT_BINS", 2)
        ws = fill([1000] * 50 + [10] * 500, pack_share=0.0, fill_slack=0.05)
        ws.plan(limits)
        assert gap_credit(ws._levels[0], 0.1) == pytest.approx(0.1 * 1000 * 2)
    ws = fill([700] * 20 + [100] * 3000, pack_share=0.0, fill_slack=0.05)
    ws.plan(replace(limits, cost=StepCost.in_tokens(0.0)))
    assert gap_credit(ws._levels[0], 0.1) == 0
    before = set(ws._levels[0].bins)
    ws.plan(limits)
    new = [b.tokens for i, b in ws._levels[0].bins.items() if i not in before]
    assert new[:2] == [1000, 900] and gap_credit(ws._levels[0], 0.1) == pytest.approx(
        0.1 * sum(new) - sum(1000 - t for t in new))
    assert_consistent(ws)


def test_a_request_whose_adapter_cannot_load_is_passed_over_not_blocking():
    """vLLM skips a request whose LoRA adapter would exceed max_loras; so does the plan, even
    for one that must go first."""
    ws = fill([10, 20, 30])
    ws.pin([Entry(key="lora", length=5, group=7)])
    picks = ws.plan(StepLimits(budget=100, seats=10, chunked_prefill=False, groups=frozenset({1}),
                               max_groups=1))
    assert sorted(p.key for p in picks) == [0, 1, 2]


def test_arrivals_first_planned_on_an_empty_step_get_deadlines_from_the_step_capacity():
    ws = WaitingSet(aging=AgingBound(drain_factor=1.0))
    for i in range(4):
        ws.add(Entry(key=i, length=512, step=3))
    ws.plan(StepLimits(budget=0, seats=10, chunked_prefill=False, capacity=1024), step=3)
    assert {e.due for e in ws.entries.values()} == {3 + 2048 / 1024}


def test_an_overdue_pick_is_exchanged_only_for_another_overdue_request():
    ws = WaitingSet(aging=AgingBound(steps=5))
    ws.add(Entry(key="oldest", length=60, step=0))
    ws.add(Entry(key="old", length=30, step=1))
    ws.add(Entry(key="young", length=40, step=9))  # fits better, but is not overdue
    ws.plan(StepLimits(budget=100, seats=10, chunked_prefill=False), step=9)
    picks = ws.plan(StepLimits(budget=100, seats=10, chunked_prefill=False), step=10)
    assert [(p.key, p.reason) for p in picks] == [("oldest", Reason.AGED), ("old", Reason.AGED)]


def test_an_exchange_gives_the_seat_back():
    """50 is exchanged for 70; the seat it gives back lets a chunk of it fill the padding gap
    (80 tokens pad to the 128 graph; 20 are left in the budget)."""
    ws = fill([10, 50, 70, 200])
    limits = StepLimits(budget=100, seats=3, chunked_prefill=True, min_chunk_tokens=50,
                        capture_sizes=(64, 128))
    picks = ws.plan(limits)
    assert [(p.key, p.tokens, p.reason) for p in picks] == [
        (0, 10, Reason.SHORT), (2, 70, Reason.FIT), (1, 20, Reason.TOPUP)]


def trimodal(n, seed):
    """The MiniLM job's mix: 50% of 6-30 tokens, 30% of 90-130, 20% of 200-252."""
    import random

    rng = random.Random(seed)
    return [rng.randint(6, 30) if u < 0.5 else rng.randint(90, 130) if u < 0.8 else rng.randint(200, 252)
            for u in (rng.random() for _ in range(n))]


def fcfs_first_steps(lengths, budget):
    """vLLM's FCFS with whole prompts: each step takes the queue's head while it fits."""
    step, used, first = 0, budget, []
    for n in lengths:
        if used + n > budget:
            step, used = step + 1, 0
        used += n
        first.append(step)
    return first


@pytest.mark.parametrize("lengths", [trimodal(1200, 0), ([700] + [50] * 10) * 40], ids=["trimodal", "bimodal"])
def test_a_backlog_packs_to_the_bound_with_short_prompts_first(lengths):
    """Whole prompts: the filler reserve keeps shortest-first from leaving the long prompts
    without fillers (plain shortest-first: 104 steps on trimodal, bound 100), and a backlog that
    arrived together is not turned into FCFS by its deadlines."""

    ws = fill(lengths, aging=AgingBound(drain_factor=1.0))
    done, plans = run_to_empty(ws, StepLimits(budget=1024, seats=10_000, chunked_prefill=False))
    bound = max(lower_bound_steps(lengths, 1024), ffd_steps(lengths, 1024))
    assert len(plans) <= 1.01 * bound
    mean_first = sum(parts[0][0] for parts in done.values()) / len(done)
    fcfs = fcfs_first_steps(lengths, 1024)
    assert mean_first <= 0.65 * sum(fcfs) / len(fcfs)
    assert all(p.reason != Reason.AGED for plan in plans[:-2] for p in plan)


def test_aged_request_that_does_not_fit_blocks_the_step():
    ws = WaitingSet(aging=AgingBound(steps=2))
    ws.add(Entry(key="old", length=90, step=0))
    ws.add(Entry(key="new", length=10, step=5))
    limits = StepLimits(budget=50, seats=10, chunked_prefill=False)
    assert ws.plan(limits, step=6) == []  # nobody overtakes a starving request
    chunked = ws.plan(StepLimits(budget=50, seats=10, chunked_prefill=True), step=6)
    assert [(p.key, p.tokens, p.reason) for p in chunked] == [("old", 50, "chunk")]


def test_doc_example_uses_whole_budget():
    """PREPACKING/VLLM_ON_THIS_MACHINE: FCFS takes 200+30 and stops at 100 although 20 fits."""
    ws = fill([200, 30, 100, 250, 20])
    picks = ws.plan(StepLimits(budget=256, seats=10, chunked_prefill=False))
    assert sorted(p.key for p in picks) == [0, 1, 4]  # 20 + 30 + 200 = 250
    assert [p.reason for p in picks] == [Reason.SHORT, Reason.SHORT, Reason.FIT]


def test_a_reserved_bin_goes_first_when_it_starts_more_requests():
    """Smith's rule: the bin of three (560 filled with 50 and 40) starts more requests than a
    shortest-first step of the free 300 and 310."""
    ws = fill([560, 50, 40, 500, 500, 500, 500, 500, 300, 310])
    picks = ws.plan(StepLimits(budget=650, seats=10, chunked_prefill=False))
    assert [(p.key, p.reason) for p in picks] == [(0, Reason.BIN), (1, Reason.BIN), (2, Reason.BIN)]


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 3)), min_size=1, max_size=40),
    budget=st.integers(1, 300),
    chunked=st.booleans(),
)
def test_priority_levels_are_strict(items, budget, chunked):
    ws = WaitingSet()
    for i, (n, prio) in enumerate(items):
        ws.add(Entry(key=i, length=n, priority=prio))
    picks = ws.plan(StepLimits(budget=budget, seats=1000, chunked_prefill=chunked))
    picked = {p.key for p in picks if not p.chunked}
    for p in picks:
        prio = items[p.key][1]
        higher_left = [i for i, (_, q) in enumerate(items) if q < prio and i not in picked]
        assert not higher_left, "a lower level was served while a higher one still waited"


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(1, 50), st.one_of(st.none(), st.integers(1, 5))),
                   max_size=40),
    max_groups=st.integers(1, 3),
    active=st.sets(st.integers(1, 5), max_size=2),
)
def test_lora_limit_is_respected(items, max_groups, active):
    active = frozenset(list(active)[:max_groups])
    ws = WaitingSet()
    for i, (n, group) in enumerate(items):
        ws.add(Entry(key=i, length=n, group=group))
    picks = ws.plan(StepLimits(budget=400, seats=100, chunked_prefill=True, groups=active,
                               max_groups=max_groups))
    groups = set(active) | {items[p.key][1] for p in picks if items[p.key][1] is not None}
    assert len(groups) <= max_groups


def test_pinned_requests_keep_their_place():
    ws = fill([5, 6, 7])
    ws.pin([Entry(key="resumed", length=50)])
    picks = ws.plan(StepLimits(budget=60, seats=10, chunked_prefill=False))
    assert picks[0].key == "resumed" and picks[0].reason == "pinned"
    assert ws.first() == "resumed"


def test_duplicate_admission_is_refused():
    ws = fill([3])
    with pytest.raises(ValueError, match="already waiting"):
        ws.add(Entry(key=0, length=3))


def test_chunk_goes_to_the_next_shortest_and_min_chunk_is_honoured():
    ws = fill([100, 300, 120])
    picks = ws.plan(StepLimits(budget=150, seats=10, chunked_prefill=True))
    assert [(p.key, p.tokens, p.reason) for p in picks] == [(0, 100, "short"), (2, 50, "chunk")]
    # a 50-token leftover is under min_chunk_tokens: no chunk, so best fit swaps 100 for 120
    picks = ws.plan(StepLimits(budget=150, seats=10, chunked_prefill=True, min_chunk_tokens=64))
    assert [(p.key, p.reason) for p in picks] == [(2, "fit")]


def test_cuda_graph_topup_fills_only_the_padding_gap():
    ws = fill([100, 300])
    limits = StepLimits(budget=200, seats=10, chunked_prefill=True, min_chunk_tokens=128,
                        capture_sizes=(8, 16, 32, 64, 128, 136, 144, 256), used_tokens=30)
    picks = ws.plan(limits)
    # 30 running + 100 planned = 130 tokens: graph 136 pads 6 tokens; they become prefill
    assert [(p.key, p.tokens, p.reason) for p in picks] == [(0, 100, "short"), (1, 6, "topup")]
    no_graphs = StepLimits(budget=200, seats=10, chunked_prefill=True, min_chunk_tokens=128)
    assert [p.reason for p in ws.plan(no_graphs)] == ["short"]


@given(tokens=st.integers(0, 600), sizes=st.lists(st.integers(1, 512), unique=True))
def test_padding_gap(tokens, sizes):
    sizes = sorted(sizes)
    gap = padding_gap(tokens, sizes)
    fitting = [s for s in sizes if s >= tokens]
    assert gap == (fitting[0] - tokens if fitting and tokens > 0 else 0)


# ---- the step cost ------------------------------------------------------------------------------


def test_a_bin_goes_first_by_requests_per_second_of_step():
    """Smith's rule in seconds: the bin [560, 50, 40] starts 3 requests in 650 tokens, the
    shortest-first step only [200] (no 500 fits beside it). Where a step costs its tokens
    (a = 0), 1 request in 200 tokens beats 3 in 650; where a dominates, 3 beat 1. With
    ``fill_slack`` 0 bins fill as far as a prompt fits whatever the cost, so both costs plan the
    same bins."""
    lengths = [560, 50, 40, 500, 500, 500, 500, 500, 150, 200]

    def first(cost):
        # always a reserve; the rule alone decides
        ws = fill(lengths, pack_share=0.0, max_swaps=0, fill_slack=0.0)
        return [(p.key, p.reason) for p in ws.plan(StepLimits(budget=650, seats=10, chunked_prefill=False,
                                                                  cost=cost), step=0)]

    assert first(StepCost(0.0, 1.0))[0] == (9, Reason.SHORT)
    assert first(StepCost(10_000.0, 1.0))[:3] == [(0, Reason.BIN), (1, Reason.BIN), (2, Reason.BIN)]
    assert first(None) == first(StepCost(10_000.0, 1.0))  # no cost: every step the same


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=60), budget=st.integers(300, 800),
       share=st.floats(0, 0.999))
def test_where_steps_cost_their_tokens_the_plan_is_shortest_first(lengths, budget, share):
    """A fixed cost below pack_fixed_share of a full step: no reserve, no exchange; each step
    takes the shortest prompts while they fit, as shortest-prefill-first does."""
    fixed = share * PACK_SHARE / (1 - PACK_SHARE) * budget  # a / (a + budget) < PACK_SHARE
    ws = fill(lengths, aging=AgingBound())
    picks = ws.plan(StepLimits(budget=budget, seats=10_000, chunked_prefill=False,
                               cost=StepCost(fixed, 1.0)))
    spf, used = [], 0
    for key in sorted(range(len(lengths)), key=lambda k: (lengths[k], k)):
        if used + lengths[key] > budget:
            break
        spf.append(key)
        used += lengths[key]
    assert [p.key for p in picks] == spf and all(p.reason == Reason.SHORT for p in picks)


def test_the_doc_example_packs_only_where_the_fixed_cost_is_large():
    """[200, 30, 100, 250, 20] in 256 tokens: at a = 0, shortest first (20 + 30 + 100, then
    200 does not fit); at a = a full step, the best-fit exchange fills the step (20 + 30 + 200)."""
    limits = lambda a: StepLimits(budget=256, seats=10, chunked_prefill=False,  # noqa: E731
                                  cost=StepCost(a, 1.0))
    assert sorted(p.key for p in fill([200, 30, 100, 250, 20]).plan(limits(0.0))) == [1, 2, 4]
    assert sorted(p.key for p in fill([200, 30, 100, 250, 20]).plan(limits(256.0))) == [0, 1, 4]


def fixed_at(share: float, budget: int) -> float:
    """The fixed cost (tokens of work, b = 1) that is `share` of a full step's."""
    return share / (1 - share) * budget


def test_packing_starts_pack_z_deviations_above_the_threshold_and_ends_as_many_below():
    """The doc example at a share 0.1 over PACK_SHARE: a fit +- 0.1 (2 sd reach below the
    threshold) orders shortest first; at +- 0.04 it packs. A plan that packs goes on packing at
    +- 0.1, and at 0.015 below the threshold +- 0.1 (2 sd reach above it), and stops at
    0.015 below +- 0.005."""
    shortest, packed = [1, 2, 4], [0, 1, 4]
    above, below = fixed_at(PACK_SHARE + 0.1, 256), fixed_at(PACK_SHARE - 0.015, 256)

    def plan(ws, a, share_sd):
        limits = StepLimits(budget=256, seats=10, chunked_prefill=False,
                            cost=StepCost(a, 1.0), share_sd=share_sd)
        return sorted(p.key for p in ws.plan(limits))

    assert PACK_Z == 2.0
    assert plan(fill([200, 30, 100, 250, 20]), above, 0.1) == shortest
    ws = fill([200, 30, 100, 250, 20])
    assert plan(ws, above, 0.04) == packed and ws.packing
    assert plan(ws, above, 0.1) == packed
    assert plan(ws, below, 0.1) == packed and ws.packing
    assert plan(ws, below, 0.005) == shortest and not ws.packing


def reserve_backlog(seed: int = 0) -> list[int]:
    """A backlog deep enough to build bins in (over BUILD_MIN_STEPS steps of 1024): 40 long
    prompts, 60 mid ones (their fillers) and 200 short ones."""
    rng = random.Random(seed)
    return ([rng.randint(600, 1000) for _ in range(40)] + [rng.randint(100, 300) for _ in range(60)]
            + [rng.randint(5, 60) for _ in range(200)])


def share_limits(share: float, share_sd: float) -> StepLimits:
    return StepLimits(budget=1024, seats=256, chunked_prefill=False,
                      cost=StepCost(fixed_at(share, 1024), 1.0), share_sd=share_sd)


# fitted shares about the threshold: over it but undecided at sd 0.1 (2 sd reach below), under
# it but not surely at 0.1, and surely under at 0.05 (shortest-first's plan: share_limits(0, 0))
OVER, UNDER, SURELY_UNDER = PACK_SHARE + 0.1, PACK_SHARE - 0.05, PACK_SHARE - 0.15
assert 0.15 < PACK_SHARE < 0.9  # all three shares within (0, 1)


def test_bins_are_reserved_from_the_fitted_share_and_served_ahead_once_it_is_sure():
    """At a share over PACK_SHARE +- 0.1 (undecided: 2 sd reach below it) the plan reserves bins
    but serves shortest first, the very plan of a share of 0, and a bin only once the free
    prompts are all taken; at +- 0.01 it packs and the bins go; every request once."""
    lengths = reserve_backlog()
    spf = fill(lengths).plan(share_limits(0.0, 0.0))  # shortest first
    ws = fill(lengths)
    picks = ws.plan(share_limits(OVER, 0.1))
    [level] = ws._levels.values()
    assert ws.reserving and not ws.packing and level.bins
    assert [(p.key, p.reason) for p in picks] == [(p.key, p.reason) for p in spf]
    assert_consistent(ws)
    undecided = fill(lengths)
    while len(undecided):
        free = set(undecided._levels[0].free)
        plan = undecided.plan(share_limits(OVER, 0.1))
        if any(p.reason == Reason.BIN for p in plan):
            assert free <= {p.key for p in plan}, "a bin went ahead of free prompts undecided"
        for p in plan:
            undecided.remove(p.key)
    for p in picks:
        ws.remove(p.key)
    done, plans = run_to_empty(ws, share_limits(OVER, 0.01))
    assert ws.packing and any(p.reason == Reason.BIN for plan in plans for p in plan)
    assert sorted(done) == sorted(set(range(len(lengths))) - {p.key for p in picks})
    assert all(len(v) == 1 for v in done.values())


def test_reserved_bins_are_held_while_undecided_and_freed_once_surely_below():
    """Bins reserved over PACK_SHARE +- 0.1 stay under it +- 0.1 (not surely: no new bin, none
    freed) and go back surely under it (2 sd short of it): their members free again, the plan
    shortest-first's."""
    lengths = reserve_backlog(1)
    ws = fill(lengths)
    ws.plan(share_limits(OVER, 0.1))
    [level] = ws._levels.values()
    bins = dict(level.bins)
    assert bins
    ws.plan(share_limits(UNDER, 0.1))
    assert not ws.reserving and level.bins == bins
    picks = ws.plan(share_limits(SURELY_UNDER, 0.05))
    assert not level.bins and level.free_tokens == sum(lengths)
    assert all(e.bin is None for e in ws.entries.values())
    assert [p.key for p in picks] == [p.key for p in fill(lengths).plan(share_limits(0.0, 0.0))]
    assert_consistent(ws)


def test_a_deep_backlog_s_bins_are_freed_a_bounded_number_a_plan():
    """Over RELEASE_PER_STEP reserved prompts go back over several plans, whole bins at a time,
    the indexes exact after each."""
    rng = random.Random(2)
    lengths = [rng.randint(600, 1000) for _ in range(800)] + [rng.randint(5, 300) for _ in range(2400)]
    ws = fill(lengths)
    [level] = ws._levels.values()
    for step in range(12):
        for p in ws.plan(share_limits(OVER, 0.1), step=step):
            ws.remove(p.key)
    reserved = sum(len(b.members) for b in level.bins.values())
    largest = max(len(b.members) for b in level.bins.values())
    assert reserved > RELEASE_PER_STEP + largest
    plans = 0
    while level.bins:
        before = sum(len(b.members) for b in level.bins.values())
        for p in ws.plan(share_limits(SURELY_UNDER, 0.05), step=12 + plans):
            ws.remove(p.key)
        after = sum(len(b.members) for b in level.bins.values())
        assert after == 0 or RELEASE_PER_STEP <= before - after < RELEASE_PER_STEP + largest
        assert_consistent(ws)
        plans += 1
    assert plans >= 2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       fits=st.lists(st.tuples(st.sampled_from([0.0, SURELY_UNDER, UNDER, OVER, 0.8]),
                               st.sampled_from([0.0, 0.01, 0.1, 0.3])), min_size=1, max_size=30))
def test_a_fit_that_wanders_across_the_threshold_loses_no_request(seed, fits):
    """Whatever the fit reads from step to step (reserving, packing, releasing the bins), every
    request is planned once and the indexes stay exact."""
    lengths = reserve_backlog(seed)
    ws, done, step = fill(lengths), set(), 0
    while len(ws):
        a, sd = fits[step % len(fits)]
        for p in ws.plan(share_limits(a, sd), step=step):
            assert p.key not in done and not p.chunked
            done.add(p.key)
            ws.remove(p.key)
        assert_consistent(ws)
        step += 1
        assert step < 10 * len(lengths)
    assert done == set(range(len(lengths)))


# ---- KV blocks ----------------------------------------------------------------------------------


def kv_fill(items, **kw):
    ws = WaitingSet(**kw)
    for i, (n, blocks) in enumerate(items):
        ws.add(Entry(key=i, length=n, blocks=blocks, step=0))
    return ws


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 40)), min_size=1, max_size=40),
       free=st.integers(0, 200), watermark=st.integers(0, 5), running=st.booleans(),
       chunked=st.booleans(), fixed=st.sampled_from([0.0, 1e5]))
def test_a_plan_offers_only_requests_whose_blocks_are_free(items, free, watermark, running, chunked, fixed):
    """Every planned request's blocks fit the free pool, less the watermark once anything
    runs in the step, so vLLM never stops at an allocation the plan made; and a request left
    out while its tokens fit is one whose blocks do not (or a longer one, behind it)."""
    ws = kv_fill(items, pack_share=0.0 if fixed else 1.0)
    limits = StepLimits(budget=600, seats=100, chunked_prefill=chunked, free_blocks=free,
                        watermark_blocks=watermark, running=running, cost=StepCost(fixed, 1.0))
    left = free
    for index, pick in enumerate(ws.plan(limits)):
        need = items[pick.key][1] + (watermark if running or index else 0)
        assert need <= left
        left -= items[pick.key][1]


def test_short_prompts_flow_past_a_long_one_whose_blocks_are_not_free():
    ws = kv_fill([(200, 13), (10, 1), (20, 2), (30, 2)], pack_share=0.0)
    picks = ws.plan(StepLimits(budget=512, seats=10, chunked_prefill=False, free_blocks=8))
    assert sorted(p.key for p in picks) == [1, 2, 3]  # the exchange may not bring 0 in


def test_an_overdue_request_whose_blocks_are_not_free_lets_others_by_then_keeps_its_place():
    """Past its deadline it goes first where its blocks are free; where they are not, shorter
    ones go for KV_PATIENCE_STEPS (or its own wait, if longer); then nothing overtakes it: it
    waits for blocks as vLLM would, so it cannot starve."""
    ws = WaitingSet(aging=AgingBound(steps=2))
    ws.add(Entry(key="old", length=200, blocks=13, step=0))
    ws.add(Entry(key="new", length=10, blocks=1, step=5))
    limits = StepLimits(budget=512, seats=10, chunked_prefill=False, free_blocks=8)
    assert [p.key for p in ws.plan(limits, step=6)] == ["new"]
    assert [p.key for p in ws.plan(limits, step=2 + KV_PATIENCE_STEPS - 1)] == ["new"]
    assert ws.plan(limits, step=2 + KV_PATIENCE_STEPS) == []
    assert [p.key for p in ws.plan(replace(limits, free_blocks=20), step=300)] == ["old", "new"]


def test_a_bin_whose_blocks_are_not_free_does_not_go_first():
    ws = kv_fill([(560, 40), (50, 4), (40, 3), *[(500, 32)] * 5, (300, 19), (310, 20)], pack_share=0.0)
    picks = ws.plan(StepLimits(budget=650, seats=10, chunked_prefill=False, free_blocks=45))
    assert all(p.reason != Reason.BIN for p in picks) and picks


def test_a_burst_is_dated_and_binned_a_bounded_amount_per_step():
    """Counted operations, not time: a 20k burst admitted in one step gets one deadline row
    (its cohort), however large; the filler reserve builds at most BIG_BINS_PER_STEP bins a
    plan; later arrivals add one row per step they arrive in."""
    ws = WaitingSet(aging=AgingBound(drain_factor=1.0), pack_share=0.0)
    for i in range(20_000):
        ws.add(Entry(key=i, length=[900, 700, 40, 10][i % 4], step=0))
    limits = StepLimits(budget=1024, seats=1024, chunked_prefill=False)
    ws.plan(limits, step=0)
    [level] = ws._levels.values()
    assert len(level.by_due) == 1 and len(level.cohorts) == 1
    assert 0 < len(level.bins) <= BIG_BINS_PER_STEP
    for step in (1, 2):
        for i in range(3):
            ws.add(Entry(key=(step, i), length=5, step=step))
        ws.plan(limits, step=step)
        assert len(level.bins) <= (step + 1) * BIG_BINS_PER_STEP
    assert len(level.by_due) == 3
def test_the_seconds_bound_puts_a_request_first_once_it_has_waited_that_long():
    ws = WaitingSet(AgingBound(seconds=10.0, drain_factor=None), max_swaps=0)
    ws.add(Entry(key="old", length=300, time=0.0))
    ws.add(Entry(key="new", length=10, time=5.0))
    limits = StepLimits(budget=300, seats=10, chunked_prefill=False)
    assert [(p.key, p.reason) for p in ws.plan(limits, step=1, now=9.0)] == [("new", Reason.SHORT)]
    assert [(p.key, p.reason) for p in ws.plan(limits, step=2, now=10.0)] == [("old", Reason.AGED)]


# lengths from a wide range, or a few repeated ones (runs of equal lengths, taken in blocks)
_RATIO_LENGTHS = st.one_of(st.integers(1, 300), st.sampled_from([3, 8, 40, 41, 120]))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_RATIO_LENGTHS, st.integers(0, 20)), min_size=1, max_size=120),
       st.integers(20, 40), st.integers(1, 900), st.integers(1, 80), st.integers(0, 64),
       st.booleans(), st.sampled_from([None, StepCost(0.0, 1.0)]))
def test_ratio_order_is_highest_response_ratio_first(items, step, budget, seats, min_chunk,
                                                     chunked, cost):
    """With order "ratio" (no deadlines): whole prompts by (wait + service) / service, highest
    first (oldest on ties), while they fit, then a chunk of the next (or nothing below
    min_chunk_tokens); with whole prompts only, nothing more (HRRN in vLLM) where steps have
    no fixed cost, every next one that fits (first fit in ratio order) where packing pays
    (no cost model: steps count): as a brute-force sort computes it, with runs of equal
    lengths among them."""
    ws = WaitingSet(order="ratio")
    arrivals = sorted(arrived for _, arrived in items)  # admitted in step order, as the adapter does
    items = [(length, arrived) for (length, _), arrived in zip(items, arrivals)]
    for i, (length, arrived) in enumerate(items):
        ws.add(Entry(key=i, length=length, step=arrived))
    limits = StepLimits(budget=budget, seats=seats, chunked_prefill=chunked,
                        min_chunk_tokens=min_chunk, cost=cost)
    first_fit = not chunked and cost is None
    order = sorted(range(len(items)),
                   key=lambda i: (-(1 + (step - items[i][1]) * budget / items[i][0]), i))
    expected, left = [], budget
    for i in order:
        if len(expected) == seats or left == 0:
            break
        if items[i][0] <= left:
            expected.append((i, items[i][0], Reason.RATIO))
            left -= items[i][0]
        elif not first_fit:
            if chunked and left >= max(1, min_chunk):
                expected.append((i, left, Reason.CHUNK))
            break
    assert [(p.key, p.tokens, p.reason) for p in ws.plan(limits, step)] == expected


def test_ratio_order_after_an_overdue_request_is_still_highest_ratio_first():
    """The overdue request goes first (EDF); the rest follow by response ratio, the bound on
    unseen lengths taken from the oldest prompt not yet planned."""
    ws = WaitingSet(aging=AgingBound(steps=5), order="ratio")
    ws.add(Entry(key="old", length=300, step=0))
    rest = [(f"r{i}", 20 + 37 * i % 400, 8 + i % 3) for i in range(30)]
    for key, length, arrived in sorted(rest, key=lambda r: r[2]):
        ws.add(Entry(key=key, length=length, step=arrived))
    step, budget = 11, 1024
    picks = ws.plan(StepLimits(budget=budget, seats=64, chunked_prefill=True), step)
    assert (picks[0].key, picks[0].reason) == ("old", Reason.AGED)
    order = sorted(rest, key=lambda r: (-(1 + (step - r[2]) * budget / r[1]), ws.entries[r[0]].seq))
    left, expected = budget - 300, []
    for key, length, _ in order:
        if length > left:
            expected.append((key, left))
            break
        expected.append((key, length))
        left -= length
    assert [(p.key, p.tokens) for p in picks[1:]] == expected


@pytest.mark.parametrize("free_blocks", [10, 100], ids=["kv short", "kv free"])
def test_ratio_order_with_whole_prompts_stops_at_a_prompt_over_the_budget(free_blocks):
    """The highest ratio prompt is over the step's budget: with whole prompts and no fixed step
    cost the plan ends there and names it (vLLM is offered it past the plan, and stops), whether
    or not its KV blocks are free (vLLM checks the budget first); where packing pays, shorter
    prompts by ratio go instead."""
    def plan(cost):
        ws = WaitingSet(order="ratio")
        ws.add(Entry(key="long", length=900, blocks=50, step=0))
        for key in ("s1", "s2"):
            ws.add(Entry(key=key, length=100, blocks=2, step=9))
        limits = StepLimits(budget=512, seats=8, chunked_prefill=False, free_blocks=free_blocks,
                            cost=cost)
        picks = [p.key for p in ws.plan(limits, step=10)]
        return picks, ws.stop.key if ws.stop is not None else None

    assert plan(StepCost(0.0, 1.0)) == ([], "long")
    assert plan(None) == (["s1", "s2"], None)
