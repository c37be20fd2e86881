"""The token router's policy (pure, hypothesis) and the load channel from a real vLLM scheduler
(engine-free) over ZMQ on loopback."""

import dataclasses
import gc
import math
import os
import random
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_prepack.routing import (
    OVERFLOW_STEP_SHARE,
    SCAN_LIMIT,
    MAX_PREFIX_BLOCKS,
    MIN_PREFIX_BLOCKS,
    SHRINK_BLOCKS,
    LoadReport,
    LoadTable,
    PrefixIndex,
    engine_requests,
    prompt_key,
    prompt_tokens,
    router_share,
)


def report(waiting=0, prefill=0, decoding=0, budget=256, newest=0.0, at=0.0, seq=1, arrived=0):
    return LoadReport(seq, at, waiting, prefill, decoding, budget, newest, 0, arrived)


@given(st.tuples(st.integers(0, 2**40), st.floats(0, 2e9), st.integers(0, 2**40),
                 st.integers(0, 2**40), st.integers(0, 2**20), st.integers(1, 2**20),
                 st.floats(0, 2e9), st.integers(0, 2**20), st.integers(0, 2**40),
                 st.integers(0, 2**20), st.floats(0, 1e3), st.integers(0, 2**50)))
def test_report_round_trips(fields):
    r = LoadReport(*fields)
    assert LoadReport.decode(r.encode()) == r and len(r.encode()) == 96
    # adjacent releases during a rolling upgrade: the 88-byte report before cache_tokens, and a
    # newer one with a field appended
    assert LoadReport.decode(r.encode()[:88]) == dataclasses.replace(r, cache_tokens=0)
    assert LoadReport.decode(r.encode() + struct.pack("<q", 7)) == r


@pytest.mark.parametrize("size", [0, 64, 90, 100])
def test_a_report_of_no_known_size_is_refused_by_its_size(size):
    with pytest.raises(ValueError, match=f"a load report is 8-byte fields, 72 bytes or more; "
                                         f"got {size} bytes"):
        LoadReport.decode(bytes(size))


@given(st.integers(1, 4096), st.floats(1e-4, 10), st.floats(0, 20), st.floats(0, 20),
       st.integers(1, 2048))
def test_the_step_under_way_counts_what_is_left_of_it(step, seconds, t1, t2, tokens):
    """The step a report says is under way counts in full when heard (or asked without a
    time), less as its predicted time passes, nothing once it is over, and a repeat of the
    report (a heartbeat) does not start it again; with no prediction, in full whenever asked."""
    table = LoadTable(stale_after=math.inf)
    a = LoadReport(1, 0.0, 100, 0, 0, 256, 0.0, 1, 1, step, seconds)
    table.report("a", a, now=0.0)
    table.report("b", LoadReport(1, 0.0, 100, 0, 0, 256, 0.0, 1, 1, step, 0.0), now=0.0)
    whole = table.expected_wait("b", tokens)
    assert table.expected_wait("a", tokens, now=0.0) == whole
    assert table.expected_wait("b", tokens, t1) == whole
    assert table.expected_wait("a", tokens) == whole
    assert table.expected_wait("a", tokens, now=-1.0) == whole  # heard "after" now: a clock step
    early, late = sorted((t1, t2))
    table.report("a", a, now=early)  # a heartbeat
    assert table.expected_wait("a", tokens, early) >= table.expected_wait("a", tokens, late)
    left = max(0.0, 1 - late / seconds)
    assert table.expected_wait("a", tokens, late) == pytest.approx(whole - step * (1 - left))


# a history: each event sends a request to a replica, finishes one, or reports
events = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 3), st.integers(0, 30), st.integers(1, 500),
              st.sampled_from([1, 1, 1, 2, 4])),
    st.tuples(st.just("done"), st.integers(0, 30)),
    st.tuples(st.just("report"), st.integers(0, 3), st.integers(0, 2000)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([0.0, 1.5, 4.0]))
def test_unreported_tokens_are_the_live_sends_no_report_covers(history, transit):
    """A model of the bookkeeping: each request counts at the replica it was last sent to,
    from its send until it finishes or a report from that replica counts its arrival, which
    comes `transit` after the send: a request sent before the newest arrival may still be on
    its way, and goes on counting. A request with n samples arrives as n requests. A request
    cancelled, or sent again elsewhere, before it arrived never arrives, and takes no later
    arrival's place."""
    table, clock = LoadTable(), 0.0
    for replica in range(4):  # idle replicas report before their first request
        table.report(replica, report(), clock)
    sends = {replica: [] for replica in range(4)}  # every send (time, arrivals), in order
    live = {}  # key -> (replica, sent_at, tokens, arrivals)
    reported = dict.fromkeys(range(4), clock)  # each replica's last report
    for event in history:
        clock += 1.0
        if event[0] == "send":
            _, replica, key, tokens, n = event
            if key in live:  # sent again: the replica before turned it away (Ray's retry)
                before, sent, _, count = live[key]
                if reported[before] < sent + transit <= clock:
                    continue  # it arrived there already: not a retry
                if sent + transit > clock:
                    sends[before].remove((sent, count))
            table.sent(replica, key, n * tokens, clock, n)
            sends[replica].append((clock, n))
            live[key] = (replica, clock, n * tokens, n)
        elif event[0] == "done":  # finished after its arrival was reported, or cancelled
            if event[1] in live:  # before it arrived (it never will); not in between (rare)
                replica, sent, _, count = live[event[1]]
                if reported[replica] < sent + transit <= clock:
                    continue
                if sent + transit > clock:
                    sends[replica].remove((sent, count))
            table.done(event[1])
            live.pop(event[1], None)
        else:
            _, replica, waiting = event
            arrived = [(t + transit, n) for t, n in sends[replica] if t + transit <= clock]
            count = sum(n for _, n in arrived)
            table.report(replica, report(waiting=waiting, newest=max(arrived, default=(0.0,))[0],
                                         arrived=count, seq=count + 2), clock)
            reported[replica] = clock
        for replica in range(4):
            assert table.unreported(replica) == sum(
                tokens for r, sent, tokens, _ in live.values()
                if r == replica and sent + transit > reported[r])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 300), st.integers(1, 2000),
       st.integers(16, 4096))
def test_expected_wait_grows_with_the_work_ahead(waiting, more, decoding, tokens, budget):
    table = LoadTable()
    table.report("a", report(waiting=waiting, decoding=decoding, budget=budget), 0.0)
    table.report("b", report(waiting=waiting + more, decoding=decoding, budget=budget), 0.0)
    wait = table.expected_wait("a", tokens)
    assert wait >= waiting + tokens
    assert table.expected_wait("b", tokens) >= wait
    assert table.expected_wait("a", tokens + more) >= wait
    table.sent("a", "k", more, 0.0)  # tokens sent since the report count as waiting
    assert table.expected_wait("a", tokens) == table.expected_wait("b", tokens)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=64), st.integers(1, 1000),
       st.integers(0, 2**32))
def test_alone_a_router_takes_the_least_expected_wait_among_those_it_scans(waiting, tokens,
                                                                             seed):
    """All replicas up to SCAN_LIMIT; beyond, a run of SCAN_LIMIT of them from a random start."""
    table = LoadTable(rng=random.Random(seed))
    n = len(waiting)
    for i, w in enumerate(waiting):
        table.report(i, report(waiting=w), 0.0)
    ranked = table.choose(list(range(n)), tokens, 0.0)
    waits = [table.expected_wait(r, tokens) for r in range(n)]
    runs = [{(start + k) % n for k in range(min(n, SCAN_LIMIT))} for start in range(n)]
    assert any(set(ranked) <= run and [waits[r] for r in ranked]
               == sorted(waits[r] for r in run)[:2] for run in runs)
    assert len(set(ranked)) == len(ranked)
    if n <= SCAN_LIMIT:
        assert [waits[r] for r in ranked] == sorted(waits)[:2]


def test_beyond_the_scan_limit_every_replica_is_scanned_as_often():
    table = LoadTable(rng=random.Random(1))
    for i in range(64):
        table.report(i, report(waiting=1000), 0.0)
    table.report(5, report(waiting=0), 0.0)  # in the wrapped part of the runs from 54-63
    picks = [table.choose(list(range(64)), 10, 0.0)[0] for _ in range(4000)]
    assert 0.2 < picks.count(5) / len(picks) < 0.3  # SCAN_LIMIT / 64 of the time


def test_beside_other_routers_a_router_spreads_over_as_many_of_the_best():
    """Four routers that see the same loads would all send to the least loaded replica before
    its next report; one that sends a quarter of the replicas' arrivals picks among the best 4,
    as long as they are about as good as the best (within the request's own tokens)."""
    def waiting(i):
        return 3 * i if i < 4 else 100 * i

    table = LoadTable(rng=random.Random(3))
    for i in range(16):
        table.report(i, report(waiting=waiting(i)), 0.0)
    arrived = [0] * 16
    for step in range(1, 41):  # each send of ours comes with three from other routers
        r = step % 16
        table.sent(r, ("ours", step), 1, float(step))
        table.done(("ours", step))
        arrived[r] += 4
        table.report(r, report(waiting=waiting(r), arrived=arrived[r]), float(step))
    assert table.spread == 4
    picks = {table.choose(list(range(16)), 10, 50.0)[0] for _ in range(200)}  # all silent: all
    assert picks == {0, 1, 2, 3}
    # an idle replica is not traded for loaded ones to spread load
    table.report(0, report(waiting=0, arrived=arrived[0]), 40.0)
    for i in range(1, 4):
        table.report(i, report(waiting=200, arrived=arrived[i]), 40.0)
    assert {table.choose(list(range(16)), 10, 40.0)[0] for _ in range(50)} == {0}


@settings(max_examples=300, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=80), st.integers(1, 16),
       st.randoms(use_true_random=False))
def test_routers_split_the_replicas_each_to_one_whatever_order_they_see_them_in(
        names, count, rng):
    """Routers given the replicas in any order agree: every replica in exactly one share where
    there are at least as many replicas as routers, shares within one of each other in size;
    with fewer replicas every router still gets one, and every replica a router."""
    def seen():
        order = list(names)
        rng.shuffle(order)
        return order

    shares = [router_share(seen(), index, count) for index in range(count)]
    assert set().union(*shares) == names
    assert all(len(share) >= 1 for share in shares)
    if len(names) >= count:
        assert sum(len(share) for share in shares) == len(names)  # disjoint
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:
        assert all(len(share) == 1 for share in shares)
    assert router_share(seen(), 0, 1) == frozenset(names)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=2, max_size=SCAN_LIMIT), st.integers(1, 1000),
       st.integers(2, 8), st.sampled_from([1, 8]), st.integers(0, 2**32))
def test_a_router_keeps_to_its_share_unless_elsewhere_saves_the_overflow(waiting, tokens,
                                                                          count, spread, seed):
    """The best of its own share, unless the best over all replicas waits less by more than
    OVERFLOW_STEP_SHARE of a step's budget, whatever its spread over the best (a router with a
    share sends some 1/k of the arrivals: its spread is about k); alone, the runner-up is the
    best of the rest."""
    n = len(waiting)
    own = router_share(range(n), seed % count, count)
    table = LoadTable(rng=random.Random(seed))
    for i, w in enumerate(waiting):
        table.report(i, report(waiting=w), 0.0)
    table.spread = spread
    ranked = table.choose(list(range(n)), tokens, 0.0, own=own)
    waits = [table.expected_wait(r, tokens) for r in range(n)]
    best_own = min(waits[r] for r in own)
    best_all = min(waits)  # n <= SCAN_LIMIT: every replica scanned
    assert len(set(ranked)) == len(ranked) == 2
    if best_own <= best_all + OVERFLOW_STEP_SHARE * 256:  # report()'s budget
        assert ranked[0] in own and waits[ranked[0]] == best_own
        if spread == 1:  # else the runner-up may be one of the spread best
            assert waits[ranked[1]] == min(waits[r] for r in range(n) if r != ranked[0])
    else:  # the spread pick over all where it saves the overflow too, else the best
        assert waits[ranked[0]] < best_own - OVERFLOW_STEP_SHARE * 256
        assert waits[ranked[0]] <= best_all + (spread > 1) * tokens
        assert ranked[1] in own and waits[ranked[1]] == best_own


def test_routers_with_their_own_shares_stop_herding_onto_one_replica():
    """Eight routers that see the same reports (16 replicas, about equally loaded) and only
    their own sends: unsharded, each goes down the same order of replicas, so every replica it
    sends to takes one request from each router; with shares, each sends to its own two."""
    def burst(shares):
        tables = [LoadTable(rng=random.Random(i)) for i in range(8)]
        for table in tables:
            for r in range(16):
                table.report(r, report(waiting=1000 + 10 * r, budget=4096), 0.0)
        sent = [0] * 16
        for k in range(64):  # the routers take turns, one request of 100 tokens each
            i = k % 8
            r = tables[i].choose(list(range(16)), 100, 0.0, own=shares[i])[0]
            tables[i].sent(r, k, 100, 0.0)
            sent[r] += 1
        return sent

    assert burst([None] * 8) == [8] * 8 + [0] * 8
    assert burst([router_share(range(16), i, 8) for i in range(8)]) == [4] * 16


def test_requests_turned_away_do_not_leave_their_replica_looking_busy():
    """Ray sends a request to the runner-up when the first choice turns it away: that attempt
    never arrives, so it must not take the place of one that did."""
    table = LoadTable()
    table.report("a", report(), 0.0)
    for i in range(5):
        table.sent("a", i, 10, 1.0 + i)
    for i in range(3):
        table.sent("b", i, 10, 6.0 + i)  # a turned the first three away
    table.report("a", report(newest=10.0, seq=2, arrived=2), 11.0)
    assert table.unreported("a") == 0 and table.unreported("b") == 30


def test_a_restarted_engine_covers_every_request_sent_before_its_newest_arrival():
    """Its counts start again: a report whose seq went down (even with more arrivals than the
    old engine reported) cannot be compared with the last one."""
    table = LoadTable()
    table.report("a", report(seq=40, arrived=10), 0.0)
    for i in range(5):
        table.sent("a", i, 10, 1.0 + i)
    table.report("a", report(seq=41, arrived=11, newest=9.0), 9.5)  # one of the five counted
    assert table.unreported("a") == 40
    table.report("a", report(seq=3, arrived=12, newest=9.0), 20.0)  # restarted since
    assert table.unreported("a") == 0


def test_a_late_completion_of_an_attempt_leaves_the_retry_charged_and_nothing_piles_up():
    table = LoadTable()
    table.report("a", report(), 0.0)
    table.report("b", report(), 0.0)
    table.sent("a", "r1", 100, 1.0)
    table.sent("b", "r1", 100, 1.1)  # Ray retried it on b
    table.done("r1", "a")  # the first attempt's completion, late
    assert (table.unreported("a"), table.unreported("b")) == (0, 100)
    table.done("r1", "b")
    assert table.unreported("b") == 0 and not table._charges
    for i in range(50):  # covered by reports before they complete: nothing is kept
        table.sent("a", i, 10, 2.0 + i)
    table.report("a", report(newest=100.0, seq=2, arrived=51), 60.0)  # r1's first attempt too
    assert table.unreported("a") == 0 and not table._charges


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=2, max_size=64), st.integers(0, 2**32))
def test_power_of_two_takes_the_better_of_two_random_replicas(waiting, seed):
    table = LoadTable(rng=random.Random(seed))
    for i, w in enumerate(waiting):
        table.report(i, report(waiting=w), 0.0)
    ranked = table.choose(list(range(len(waiting))), 10, 0.0, choices=2)
    assert len(ranked) == 2 and ranked[0] != ranked[1]
    assert waiting[ranked[0]] <= waiting[ranked[1]]


def test_power_of_two_spreads_over_every_replica():
    table = LoadTable(rng=random.Random(0))
    seen = {table.choose(list(range(8)), 10, 0.0, choices=2)[0] for _ in range(200)}
    assert seen == set(range(8))


def test_a_silent_replica_is_passed_over_until_it_reports_again():
    table = LoadTable(stale_after=0.5, rng=random.Random(1))
    table.report("a", report(waiting=0), 0.0)
    table.report("b", report(waiting=10_000), 0.0)
    assert table.choose(["a", "b"], 10, 0.4)[0] == "a"
    table.report("b", report(waiting=10_000), 0.9)  # a's reports stopped; b's heartbeat goes on
    assert table.choose(["a", "b"], 10, 1.0) == ["b"]
    table.report("a", report(waiting=0), 1.1)
    assert table.choose(["a", "b"], 10, 1.2)[0] == "a"
    # a replica that never reported is not stale (its publisher may not be connected yet), and
    # when every replica is silent they all stay candidates
    assert table.choose(["a", "b", "new"], 10, 5.0) == ["new"]
    assert set(table.choose(["a", "b"], 10, 5.0)) == {"a", "b"}


def test_a_retried_request_moves_its_charge_and_a_forgotten_replica_keeps_none():
    table = LoadTable()
    table.sent("a", "k", 100, 1.0)
    table.sent("b", "k", 100, 2.0)
    assert (table.unreported("a"), table.unreported("b")) == (0, 100)
    table.forget("b")
    table.done("k")
    assert table.unreported("b") == 0 and table.choose(["a"], 1, 3.0) == ["a"]


def test_a_forgotten_replica_still_listed_is_passed_over_not_taken_for_idle():
    """A lagging update may list a replica after its death: without a view it would look
    idle (no report, no charges) and draw every request."""
    table = LoadTable()
    table.report("a", report(waiting=5000), 0.0)
    table.report("b", report(waiting=5000), 0.0)
    table.forget("b")
    assert table.choose(["a", "b"], 10, 0.1) == ["a"]
    table.sent("b", "k", 100, 0.2)  # a send Ray made before it heard: no view comes back
    table.report("b", report(waiting=0), 0.2)  # nor from a late report
    assert table.choose(["a", "b"], 10, 0.3) == ["a"] and table.unreported("b") == 0
    assert table.choose(["b"], 10, 0.3) == ["b"]  # nothing else: the candidates as given


def test_decoding_requests_take_from_each_steps_prefill():
    table = LoadTable()
    table.report("idle", report(waiting=1000, decoding=0, budget=256), 0.0)
    table.report("busy", report(waiting=1000, decoding=200, budget=256), 0.0)
    # 'busy' prefills at most 64 tokens a step (a quarter of the budget) while 200 decode
    assert table.expected_wait("idle", 24) == 1024
    assert table.expected_wait("busy", 24) == 1024 + math.ceil(1024 / 64) * 200


def test_a_cached_prefix_is_left_out_of_the_cost_where_it_is_cached():
    table = LoadTable(rng=random.Random(0))
    table.report("a", report(waiting=300), 0.0)
    table.report("b", report(waiting=0), 0.0)
    assert table.choose(["a", "b"], 1000, 0.0)[0] == "b"
    assert table.choose(["a", "b"], 1000, 0.0, hits={"a": 900})[0] == "a"
    assert table.choose(["a", "b"], 1000, 0.0, hits={"a": 100})[0] == "b"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=600), st.text(min_size=0, max_size=300), st.integers(1, 32))
def test_prefix_index_hits_the_shared_leading_blocks(shared, tail, block):
    index = PrefixIndex(block=block, chars_per_token=1.0)
    first = index.hashes(shared + tail)
    index.insert(first, "a")
    hits = index.match(index.hashes(shared + "\x00" + tail))
    full = len(shared) // block
    assert hits.get("a", 0) >= full
    assert set(hits) <= {"a"}


SENDS = st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6), st.sampled_from("abcde")),
                 max_size=40)


@settings(max_examples=200, deadline=None)
@given(SENDS, SENDS, st.integers(1, 4))
def test_prefix_index_matches_a_model_of_its_sends(sends, later, owners):
    """Sends of prompts (one of six, each extending the one before by a block: prompt i has
    blocks 0..i) to replicas. Each block keeps the `owners` replicas it was most recently sent
    to; a replica's hit is the leading blocks it owns all of. Checked against that model for
    every prompt; a forgotten replica matches nothing (the model drops it from every block;
    the index marks it gone and drops it from a full block first), sends to it are not
    recorded, and the others' sends are counted as before."""
    index = PrefixIndex(block=1, chars_per_token=1.0, owners=owners)
    chains = [index.hashes(tuple(range(i + 1))) for i in range(6)]
    model: dict[int, list[str]] = {}  # block -> owners, most recent last

    gone = set()

    def send(sends):
        for prompt, length, replica in sends:
            if replica in gone:
                continue
            chain = chains[prompt][:length]
            index.insert(chain, replica)
            for h in chain:
                recent = [r for r in model.get(h, []) if r != replica] + [replica]
                model[h] = recent[-owners:]

    send(sends)

    def expected(chain):
        hits, n = {}, 0
        holders = None
        for h in chain:
            owned = set(model.get(h, ()))
            holders = owned if holders is None else holders & owned
            if not holders:
                break
            n += 1
            hits.update(dict.fromkeys(holders, n))
        return hits

    for chain in chains:
        assert index.match(chain) == expected(chain)
    index.forget("a")
    gone.add("a")
    for h, replicas in model.items():
        model[h] = [r for r in replicas if r != "a"]
    for chain in chains:
        assert index.match(chain) == expected(chain)
    for prompt, length, replica in later:
        if replica in gone:  # recorded nowhere: the model's sends skip it
            index.insert(chains[prompt][:length], replica)
    send(later)
    for chain in chains:
        assert index.match(chain) == expected(chain)


def test_prefix_index_is_bounded_and_forgets_replicas():
    index = PrefixIndex(block=2, chars_per_token=1.0, capacity=10, owners=2)
    index.insert(index.hashes("abcdefgh" * 10), "a")
    assert len(index._blocks) == 10
    # a prompt's tail goes first, as vLLM evicts: its leading blocks still match
    assert index.match(index.hashes("abcdefgh" * 10)) == {"a": 10}
    assert index.match(index.hashes("xbcdefgh" * 10)) == {}
    gc.collect()  # the blocks' owners (tuples of strings) leave the collector's generations
    assert not any(map(gc.is_tracked, index._blocks.values()))
    ids = index.hashes((1, 2, 3, 4, 5, 6))
    for replica in ("a", "b", "c"):
        index.insert(ids, replica)
    assert index.match(ids) == {"b": 3, "c": 3}  # two owners a block, the latest
    index.forget("c")
    assert index.match(ids) == {"b": 3}


def test_a_forgotten_replica_stops_matching_at_once_and_gives_up_its_place_first():
    """Forgetting walks no block (a pause of the router at a million blocks): the replica
    matches nothing from then on, a full block drops it before any live owner, and sends to
    it are not recorded (Ray's candidates may name a dead replica a while longer)."""
    index = PrefixIndex(block=1, chars_per_token=1.0, owners=2)
    ids = index.hashes((1, 2, 3))
    index.insert(ids, "b")
    index.insert(ids, "a")  # owners (b, a)
    index.forget("a")
    assert index.match(ids) == {"b": 3}
    index.insert(ids, "c")  # full: a goes, not b
    assert index.match(ids) == {"b": 3, "c": 3}
    index.forget("b")
    index.insert(index.hashes((9,)), "b")
    index.insert(ids, "b")
    assert index.match(ids) == {"c": 3} and index.match(index.hashes((9,))) == {}
    assert index.hashes((9,))[0] not in index._blocks and index._blocks[ids[0]][-1] == "c"


def test_an_index_sized_by_the_replicas_caches_follows_them_and_shrinks_without_a_pause():
    index = PrefixIndex(block=16)
    assert index.capacity == MIN_PREFIX_BLOCKS  # no report yet
    index.cover(16 * (MIN_PREFIX_BLOCKS + 5))
    assert index.capacity == MIN_PREFIX_BLOCKS + 5
    index.cover(16 * 4 * MAX_PREFIX_BLOCKS)
    assert index.capacity == MAX_PREFIX_BLOCKS
    index.cover(0)
    assert index.capacity == MIN_PREFIX_BLOCKS
    fixed = PrefixIndex(block=16, capacity=10)
    fixed.cover(16 * MAX_PREFIX_BLOCKS)
    assert fixed.capacity == 10

    small = PrefixIndex(block=1, chars_per_token=1.0, capacity=3 * SHRINK_BLOCKS)
    small.insert(small.hashes(tuple(range(3 * SHRINK_BLOCKS))), "a")
    small.capacity = 10  # shrunk: each insert drops its own blocks' worth and SHRINK_BLOCKS more
    small.insert(small.hashes((-1, -2)), "a")
    assert len(small._blocks) == 3 * SHRINK_BLOCKS + 2 - (2 + SHRINK_BLOCKS)
    while len(small._blocks) > 10:
        small.insert(small.hashes((-1,)), "a")
    assert small.match(small.hashes((-1, -2))) == {"a": 2}  # the most recent stay


def test_the_table_adds_up_the_replicas_caches_by_their_last_reports():
    table = LoadTable()
    table.report("a", LoadReport(1, 0.0, 0, 0, 0, 256, 0.0, 0, 0, cache_tokens=1000), 0.0)
    table.report("b", LoadReport(1, 0.0, 0, 0, 0, 256, 0.0, 0, 0, cache_tokens=500), 0.0)
    table.report("a", LoadReport(2, 1.0, 0, 0, 0, 256, 0.0, 0, 0, cache_tokens=3000), 1.0)
    assert table.cache_tokens == 3500
    table.forget("a")
    assert table.cache_tokens == 500
    table.forget("nobody")
    assert table.cache_tokens == 500


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=64, max_size=200), min_size=1, max_size=20), st.integers(2, 40),
       st.integers(0, 2**32))
def test_routers_agree_on_a_prefix_home_and_a_replica_leaving_moves_only_its_own(
        prompts, n, seed):
    """Rendezvous hashing: every router (its own index, its own order of the replicas) finds
    the same home for a prompt; when a replica leaves, only the prefixes it was home to move."""
    replicas = [f"replica-{i}" for i in range(n)]
    shuffled = random.Random(seed).sample(replicas, n)
    one, other = PrefixIndex(block=16, chars_per_token=1.0), PrefixIndex(block=16,
                                                                         chars_per_token=1.0)
    homes = [one.home(one.hashes(p)[0], replicas) for p in prompts]
    assert homes == [other.home(other.hashes(p)[0], shuffled) for p in prompts]
    gone = replicas[seed % n]
    other.forget(gone)
    left = [r for r in shuffled if r != gone]
    for prompt, home in zip(prompts, homes):
        moved = other.home(other.hashes(prompt)[0], left)
        assert moved == home or home == gone


def test_prefix_hashes_and_homes_are_the_same_in_every_process():
    """Routers in different proxies must agree on a home: Python's str hash differs between
    processes (PYTHONHASHSEED), so the index must not use it."""
    code = ("from vllm_prepack.routing import PrefixIndex\n"
            "i = PrefixIndex(block=4, chars_per_token=1.0)\n"
            "text, ids = i.hashes('system prompt abc'), i.hashes(tuple(range(12)))\n"
            "print(text, ids, i.home(text[0], [f'r{n}' for n in range(9)]))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2", "random")}
    assert len(outputs) == 1 and "[]" not in outputs.pop()
    assert PrefixIndex(block=4).hashes((1, 2, [3], 4)) == []  # not token ids: no affinity


def test_a_home_found_among_some_replicas_is_not_kept_for_all():
    """A LoRA request routes among the replicas holding its adapter: the home among those is
    not the home every router finds among all."""
    index = PrefixIndex(block=4, chars_per_token=1.0)
    replicas = [f"r{i}" for i in range(8)]
    first = index.hashes("system prompt")[0]
    home = index.home(first, replicas)
    subset = [r for r in replicas if r != home]
    assert index.home(first, subset) != home
    assert index.home(first, replicas) == home
    index.forget(home)
    assert index.home(first, subset) == PrefixIndex(block=4).home(first, subset)


def test_a_cached_token_counts_for_the_wait_and_the_capacity():
    """CACHE_HIT_WEIGHT 2: a replica 1000 tokens behind an idle one, holding 600 of the
    request's 1000 tokens, still wins (1000 + 400 - 600 < 1000); weighed once it would not."""
    table = LoadTable(rng=random.Random(0))
    table.report("a", report(waiting=1000), 0.0)
    table.report("b", report(waiting=0), 0.0)
    assert table.choose(["a", "b"], 1000, 0.0, hits={"a": 600})[0] == "a"
    assert table.choose(["a", "b"], 1000, 0.0, hits={"a": 5000})[0] == "a"  # capped at its size
    assert table.choose(["b"], 1000, 0.0, hits={"a": 5000}) == ["b"]  # not offered: not taken


def test_alone_a_router_credits_where_it_sent_a_prefix_beside_others_the_prefix_home():
    index = PrefixIndex(block=4, chars_per_token=1.0)
    replicas = ["a", "b", "c", "d"]
    shared = "system prompt, the same for many requests. "
    hashes = index.hashes(shared + "first question")
    assert index.hits(hashes, replicas) == index.hits(hashes, replicas, shared=True) == {}
    home = index.home(hashes[0], replicas)
    elsewhere = next(r for r in replicas if r != home)
    index.insert(hashes, elsewhere)
    again = index.hashes(shared + "second question")
    blocks = 4 * (len(shared) // 4)
    assert index.hits(again, replicas) == {elsewhere: blocks}
    assert index.hits(again, replicas, shared=True) == {home: blocks}


def test_a_request_with_n_samples_is_covered_as_its_n_requests_arrive():
    """vLLM's engine takes a request with n samples as n requests of its prompt: the router
    charges n x its tokens, a report that counts some of them takes off their share, and the
    request sent after it keeps its charge until its own arrival."""
    table = LoadTable()
    table.report("a", report(), 0.0)
    table.sent("a", "n3", 3 * 100, 1.0, 3)
    table.sent("a", "next", 40, 2.0)
    assert table.unreported("a") == 340
    table.report("a", report(newest=1.5, arrived=2, seq=2), 3.0)  # two of the three
    assert table.unreported("a") == 140
    table.report("a", report(newest=1.5, arrived=3, seq=3), 4.0)
    assert table.unreported("a") == 40
    table.report("a", report(newest=2.5, arrived=4, seq=4), 5.0)
    assert table.unreported("a") == 0
    # all n at once, while the request sent after it (before their arrival) is on its way
    table.sent("a", "n2", 2 * 50, 6.0, 2)
    table.sent("a", "later", 30, 7.0)
    table.report("a", report(newest=7.5, arrived=6, seq=5), 8.0)
    assert table.unreported("a") == 30
    body = SimpleNamespace
    assert [engine_requests(b) for b in (body(n=4), body(n=1), body(n=None), body())] == [4, 1, 1, 1]
    # a request per prompt (and sample): a list of prompts is several, one prompt's ids one
    assert engine_requests(body(prompt=["a", "b", "c"], n=2)) == 6
    assert engine_requests(body(prompt=[[1, 2], [3]])) == 2
    assert engine_requests(body(prompt=[1, 2, 3], n=2)) == 2
    assert engine_requests(body(input=["x", "y"])) == 2
    assert engine_requests(body(messages=[{"role": "user", "content": "hi"}], n=3)) == 3


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(1, 60), st.integers(1, 4)),
    st.tuples(st.just("report")),
), max_size=60), st.sampled_from([0.0, 1.5, 4.0]), st.sampled_from([0.0, 0.3, 1.0]))
def test_a_charge_of_several_arrivals_is_covered_a_share_at_a_time(history, transit, gap):
    """A request of n engine requests (k prompts x samples) whose requests reach the engine
    `gap` apart, in order (the frontend adds them one after the other, before any later
    request): each report takes off the share of those it counts, and what is left is the
    tokens of the requests no report has counted yet."""
    table, clock = LoadTable(), 0.0
    table.report("a", report(), clock)
    sends = []  # (sent, tokens per request, n)
    arrived_at = 0.0
    for event in history:
        clock += 1.0
        if event[0] == "send":
            _, tokens, n = event
            table.sent("a", len(sends), n * tokens, clock, n)
            sends.append((clock, tokens, n))
        else:
            arrived = [t for t in _in_order(sends, transit, gap) if t <= clock]
            table.report("a", report(newest=max(arrived, default=0.0), arrived=len(arrived),
                                     seq=len(arrived) + 2), clock)
            arrived_at = clock
        assert table.unreported("a") == sum(
            tokens for (_, tokens, _), t in zip(_expanded(sends), _in_order(sends, transit, gap))
            if t > arrived_at)


def _expanded(sends):
    return [send for send in sends for _ in range(send[2])]


def _in_order(sends, transit, gap):
    """Each engine request's arrival: its send's + transit + gap per request before it of the
    same send, never before the one ahead of it."""
    times, last = [], 0.0
    for sent, _, n in sends:
        for j in range(n):
            last = max(last, sent + transit + j * gap)
            times.append(last)
    return times


def test_prompt_tokens_count_ids_and_estimate_text():
    body = SimpleNamespace
    assert prompt_tokens(body(prompt=[5, 6, 7]), 4.0) == 3
    assert prompt_tokens(body(prompt=[[5, 6], [7]]), 4.0) == 3
    assert prompt_tokens(body(prompt="x" * 10), 4.0) == 3
    assert prompt_tokens(body(prompt=["x" * 8, "y" * 4]), 4.0) == 3
    assert prompt_tokens(body(input="abcd"), 1.0) == 4
    chat = [{"role": "system", "content": "x" * 8},
            {"role": "user", "content": [{"type": "text", "text": "y" * 8}]}]
    assert prompt_tokens(body(messages=chat), 4.0) == 2 * 4 + 4
    assert prompt_tokens(body(), 4.0) == 0
    assert prompt_key(body(prompt=["first", "second"])) == "first"
    assert prompt_key(body(prompt=[3, 4])) == (3, 4)
    assert prompt_key(body(messages=chat)) == "x" * 8 + "\x00" + "y" * 8


def test_a_scheduler_publishes_its_load_every_step_and_while_idle(tiny_model):
    """The plugin in a real vLLM scheduler (no model) publishes over ZMQ; a subscriber reads
    what the scheduler holds once the step has run, and heartbeats while nothing runs."""
    from vllm_prepack.bench.harness import fake_step, make_request, standalone_scheduler
    from vllm_prepack.load_channel import HEARTBEAT_S, LoadSubscriber, free_port

    port = free_port("127.0.0.1")
    reports = []
    subscriber = LoadSubscriber(lambda replica, r, now: reports.append((replica, r)))
    subscriber.watch({"r0": f"tcp://127.0.0.1:{port}"})
    scheduler = standalone_scheduler(
        tiny_model, budget=256, max_model_len=512, chunked_prefill=True,
        additional_config={"prepack": {"load_endpoint": f"tcp://127.0.0.1:{port}"}})
    try:
        deadline = time.time() + 10
        while not reports and time.time() < deadline:  # the subscriber connects
            time.sleep(0.05)
        # up and idle before its first request: routers know it (and its budget) from the start
        assert reports and reports[0][0] == "r0"
        assert (reports[0][1].requests, reports[0][1].budget) == (0, 256)
        before = time.time()
        for i, n in enumerate([200, 30, 100, 250, 20]):
            scheduler.add_request(make_request(str(i), n, max_tokens=3))
        while not any(r.requests for _, r in reports) and time.time() < deadline:
            fake_step(scheduler, scheduler.schedule())
            time.sleep(0.05)
        assert any(r.requests for _, r in reports)
        while scheduler.has_requests():
            fake_step(scheduler, scheduler.schedule())
        last = scheduler.load_report()
        assert (last.waiting_tokens, last.prefill_tokens, last.requests) == (0, 0, 0)
        assert last.budget == 256 and last.newest_arrival >= before
        seen = len(reports)
        time.sleep(4 * HEARTBEAT_S)
        assert len(reports) >= seen + 2  # idle: the last report again, as a heartbeat
        idle = reports[-1][1]  # published as the last step ended: nothing under way
        assert (idle.step_tokens, idle.requests, idle.decoding) == (0, 0, 0)
    finally:
        subscriber.close()
        scheduler._publisher.close()


def test_load_report_predicts_its_step_once_steps_are_measured(tiny_model):
    """A report carries the step's time by the scheduler's step-cost model: unknown (0) before
    it has measured steps, then a + b x tokens as the engine's steps took."""
    from vllm_prepack.bench.harness import fake_step, make_request, standalone_scheduler

    scheduler = standalone_scheduler(tiny_model, budget=256, max_model_len=512,
                                     chunked_prefill=True)
    clock = [0.0]
    scheduler.prepack_clock = lambda: clock[0]
    assert scheduler.load_report(200, 4).step_seconds == 0
    for i in range(40):
        scheduler.add_request(make_request(str(i), 50 + 5 * i, max_tokens=2))
    while scheduler.has_requests():
        out = scheduler.schedule()
        clock[0] += 0.01 + 1e-4 * out.total_num_scheduled_tokens
        fake_step(scheduler, out)
    assert scheduler.load_report(200, 4).step_seconds == pytest.approx(0.03, rel=0.1)
    assert scheduler.load_report().step_seconds == 0  # no step under way


def test_load_report_counts_every_new_request_whichever_queue_it_enters(tiny_model):
    """Arrivals are new request ids, not entries into the plugin's queue: a request vLLM puts
    into kv_holding_waiting (one that holds KV blocks; vLLM 0.31-0.33 put every new request
    into waiting, so this one is built by hand) counts all the same."""
    from vllm_prepack.bench.harness import make_request, standalone_scheduler

    scheduler = standalone_scheduler(tiny_model, budget=256, max_model_len=512,
                                     chunked_prefill=True)
    scheduler.add_request(make_request("plain", 50))
    holding = make_request("holding", 80)
    holding.num_computed_tokens = 16
    scheduler.add_request(holding)
    assert list(scheduler.kv_holding_waiting) == [holding] and len(scheduler.waiting) == 1
    r = scheduler.load_report()
    assert (r.arrived, r.requests) == (2, 2)
    assert r.newest_arrival == max(holding.arrival_time, scheduler.requests["plain"].arrival_time)


def test_load_report_counts_what_waits_and_what_runs(tiny_model):
    from vllm_prepack.bench.harness import make_request, standalone_scheduler

    scheduler = standalone_scheduler(tiny_model, budget=256, max_model_len=512,
                                     chunked_prefill=True)
    for i, n in enumerate([200, 30, 100, 250, 20]):
        scheduler.add_request(make_request(str(i), n, max_tokens=3))
    out = scheduler.schedule()  # shortest first: 20, 30, 100 whole, 106 of the 200 as a chunk
    r = scheduler.load_report(out.total_num_scheduled_tokens)
    assert (r.waiting_tokens, r.prefill_tokens, r.decoding, r.requests) == (250, 94, 3, 5)
    assert r.step_tokens == 256
    assert r.cache_tokens == 10_000 * 16  # the harness's KV cache: 10,000 blocks of 16 tokens


def test_a_report_carries_the_cache_only_where_one_kv_group_holds_every_layer():
    """Several KV groups share one pool of blocks (hybrid, sliding-window models:
    kv_block_accounting gives no arithmetic): their blocks are no count of prompt tokens, so
    the report says 0 (not known)."""
    from vllm_prepack.touchpoints import KVBlocks, kv_cache_tokens

    scheduler = SimpleNamespace(kv_cache_config=SimpleNamespace(num_blocks=100))
    assert kv_cache_tokens(scheduler, KVBlocks(block_size=16, lookahead=0)) == 1600
    assert kv_cache_tokens(scheduler, None) == 0


def test_the_step_under_way_is_ahead_of_every_new_request():
    table = LoadTable()
    table.report("busy", LoadReport(1, 0.0, 0, 0, 0, 256, 0.0, 1, 1, step_tokens=256), 0.0)
    table.report("idle", report(), 0.0)
    assert table.expected_wait("busy", 10) == 266 and table.expected_wait("idle", 10) == 10
    assert table.choose(["busy", "idle"], 10, 0.0)[0] == "idle"


@pytest.mark.parametrize("rank, slices, cores, expected", [
    (0, 2, 2, "0"), (1, 2, 2, "1"), (2, 2, 2, "0"), (1, 2, 8, "4-7"), (0, 1, 4, "0-3"),
    (5, 3, 2, "1")])
def test_each_cpu_replica_gets_its_own_cores(rank, slices, cores, expected):
    from vllm_prepack.serve_replica import core_slice

    assert core_slice(rank, slices, cores) == expected


def test_a_prefix_chain_crosses_the_wire_whole_and_a_bad_feed_setting_is_named():
    from vllm_prepack.routing import decode_chain, encode_chain
    from vllm_prepack.serve_replica import prefix_feed

    index = PrefixIndex(block=4, chars_per_token=1.0)
    for prompt in ("a text prompt of some length", tuple(range(40))):
        chain = index.hashes(prompt)
        assert chain and decode_chain(encode_chain(chain)) == chain
    assert decode_chain(encode_chain([-(2**63), 2**63 - 1, 0])) == [-(2**63), 2**63 - 1, 0]
    with pytest.raises(ValueError, match="8-byte hashes"):
        decode_chain(b"\x00" * 12)
    assert prefix_feed("") is None and prefix_feed("64:3.5") == (64, 3.5)
    # what the builder hands the replicas parses back to the router's own settings
    assert prefix_feed(PrefixIndex(64, 3.7).settings) == (64, 3.7)
    assert PrefixIndex(64, 4).settings == PrefixIndex(64.0, 4.0).settings == "64:4.0"
    for bad in ("64", "x:1", "0:4", "64:0", "64:-1", "64:inf", "64:nan"):
        with pytest.raises(ValueError, match="VLLM_PREPACK_PREFIX_FEED"):
            prefix_feed(bad)
