"""The engine-free routing simulation of ``bench serve``: every router places every request once,
the replicas (vLLM's scheduler with the plugin, or plain vLLM's) serve them all, and the baselines
route as the systems they stand for."""

import random
from types import SimpleNamespace

import pytest

from vllm_prepack.routing import MIN_PREFIX_BLOCKS
from vllm_prepack.bench.serve_sim import (
    CHAT_MAX_TOKENS,
    EXTRA_ROUTERS,
    ROUTERS,
    Cost,
    DPRouter,
    Pool,
    RequestsRouter,
    SimReplica,
    capacity,
    chat_workload,
    make_router,
    make_routers,
    prefix_workload,
    simulate_routing,
    workload,
)

CPU = Cost("cpu", 0.0, 50e-6, 512)
GPU = Cost("gpu", 3e-3, 8.5e-6, 2048)


@pytest.fixture(scope="module")
def pool(tiny_model):
    return Pool(tiny_model)


@pytest.mark.parametrize("router", (*ROUTERS, *EXTRA_ROUTERS, "tokens@0.5"))
def test_every_router_gets_every_request_served_once(pool, router):
    requests = workload("generate", 48, seed=1)
    rate = 0.9 * capacity(requests, CPU, 4)
    for routers in (1, 3):
        result = simulate_routing(pool, 4, requests, router, CPU, rate, routers, seed=1, run=routers,
                                  chunked=True)
        assert len(result.ttft) == len(requests)
        assert all(t > 0 for t in result.ttft)
        assert result.computed == sum(r.length for r in requests)  # no shared prefixes
        assert result.makespan > 0


def test_plain_rows_run_vllms_own_order(pool):
    """``plain+requests`` serves a burst in vLLM's arrival order on plain replicas: on a
    step cost that grows with tokens its mean TTFT is well above the plugin's shortest first
    behind the same router, on the same requests and arrivals."""
    requests = workload("generate", 60, seed=5)
    rate = 100 * capacity(requests, CPU, 2)  # all waiting at about once
    mean = {r: sum(simulate_routing(pool, 2, requests, r, CPU, rate, 1, seed=5, run=20 + i,
                                    chunked=True).ttft) / len(requests)
            for i, r in enumerate(("plain+requests", "requests"))}
    assert mean["requests"] < 0.8 * mean["plain+requests"]
    # Ray's default router, its instances reading the replicas' counts alike; no other router
    # runs over plain replicas (they report no load)
    routers = make_routers("plain+requests", 2, random.Random(0), 3)
    assert all(type(r) is RequestsRouter and r.inflight is routers[0].inflight for r in routers)
    with pytest.raises(ValueError, match="report no load"):
        make_router("plain+tokens", 2, random.Random(0))


def test_prefix_affinity_saves_prefill_that_balance_alone_does_not(pool):
    requests = prefix_workload(96, groups=8, seed=2)
    rate = 0.7 * capacity(requests, GPU, 4)
    computed = {r: simulate_routing(pool, 4, requests, r, GPU, rate, 1, seed=2, run=10 + i,
                                    chunked=True).computed
                for i, r in enumerate(("requests", "tokens+prefix", "prefix"))}
    assert computed["tokens+prefix"] < computed["requests"]
    assert computed["prefix"] < computed["requests"]


def test_a_conversation_grows_by_its_replies_and_messages_with_a_few_under_way():
    requests = chat_workload(600, active=5, seed=4)
    last = {}
    for r in requests:
        assert r.turn and r.keeps == r.length + r.decode
        before = last.get(r.group)
        if before is None:
            assert (r.shared, r.sent) == (0, 0)
        else:  # the last turn, its reply, a new message
            assert (r.shared, r.sent) == (before.keeps, before.length) and r.length > before.keeps
            assert r.keeps <= CHAT_MAX_TOKENS
        last[r.group] = r
        ids = r.ids()
        assert len(ids) == r.length and (before is None or ids[:before.length] == before.ids())
    assert len(last) > 5  # conversations ended and new ones took their places
    spans = {}  # conversation -> (its first request, its last)
    for i, r in enumerate(requests):
        spans[r.group] = (spans.get(r.group, (i, i))[0], i)
    assert max(sum(a <= i <= b for a, b in spans.values()) for i in range(len(requests))) <= 5


def test_a_replica_caches_each_group_s_last_turn_within_its_tokens():
    replica = SimReplica(0, SimpleNamespace(add_request=lambda request: None), cache_tokens=1000)
    a1, b1 = (SimpleNamespace(key=k, length=300, decode=100, group=g, shared=0, sent=0, keeps=400)
              for k, g in ((1, "a"), (2, "b")))
    for r in (a1, b1):
        replica.deliver(r, 0.0, 0.0, run=0)
    a2 = SimpleNamespace(key=3, length=450, decode=10, group="a", shared=400, sent=300, keeps=460)
    assert replica.uncached(a2) == 50  # its last turn, prompt and reply, is cached
    replica.deliver(a2, 0.0, 0.0, run=0)
    c1 = SimpleNamespace(key=4, length=300, decode=1, group="c", shared=0, sent=0, keeps=300)
    replica.deliver(c1, 0.0, 0.0, run=0)  # 400 + 460 + 300 > 1000: b, the least recent, goes
    assert list(replica.cache) == ["a", "c"] and replica.cached == 760
    b2 = SimpleNamespace(key=5, length=500, decode=1, group="b", shared=400, sent=300, keeps=500)
    assert replica.uncached(b2) == 500


def test_prefix_affinity_pays_on_conversations_and_the_index_takes_the_caches_size(pool):
    """Affinity keeps a conversation where its last turn is cached; the token router's index
    is as large as the replicas' caches, the /fixed one at the size of before."""
    requests = chat_workload(160, active=12, seed=6)
    rate = 0.7 * capacity(requests, GPU, 4)
    computed = {r: simulate_routing(pool, 4, requests, r, GPU, rate, 1, seed=6, run=40 + i,
                                    chunked=True, cache_tokens=100_000).computed
                for i, r in enumerate(("tokens", "tokens+prefix"))}
    assert computed["tokens+prefix"] < 0.8 * computed["tokens"]
    sized = make_router("tokens+prefix", 64, random.Random(0))
    sized.cover(64 * 400_000)
    fixed = make_router("tokens+prefix/fixed", 64, random.Random(0))
    fixed.cover(64 * 400_000)
    assert (sized.index.capacity, fixed.index.capacity) == (400_000, MIN_PREFIX_BLOCKS)


def test_routers_that_hear_the_replicas_prefixes_keep_the_hits_of_one_router(pool):
    """Four routers over 8 replicas, 16 prefix groups: hearing the prefixes each replica
    receives, they compute about what one router does; each prefix at its home instead
    (replicas that publish none) computes more."""
    requests = prefix_workload(240, groups=16, seed=3)
    rate = 0.8 * capacity(requests, CPU, 8)
    computed = {(r, k): simulate_routing(pool, 8, requests, r, CPU, rate, k, seed=3,
                                         run=20 + i, chunked=True).computed
                for i, (r, k) in enumerate((("tokens+prefix", 1), ("tokens+prefix", 4),
                                            ("tokens+prefix/home", 4)))}
    assert computed[("tokens+prefix", 4)] <= 1.1 * computed[("tokens+prefix", 1)]
    assert computed[("tokens+prefix", 4)] < computed[("tokens+prefix/home", 4)]


def _replicas(counts):
    return [SimpleNamespace(scheduler=SimpleNamespace(waiting=[0] * w, running=[0] * r))
            for w, r in counts]


def test_the_vllm_dp_baseline_takes_the_fewest_requests_and_counts_its_sends():
    router = DPRouter(3, random.Random(0), clients=1)
    replicas = _replicas([(3, 2), (0, 1), (1, 1)])
    first = router.choose(None, 0.0, replicas)
    router.sent(first, None, 0.0, replicas)
    assert first == 1  # 1 request against 5 and 2
    # until the next snapshot its own send counts as waiting there: 2 == 2, then the scan start
    # rotates; a third pick goes to neither loaded one twice in a row
    picks = [first]
    for t in (0.01, 0.02):
        r = router.choose(None, t, replicas)
        router.sent(r, None, t, replicas)
        picks.append(r)
    assert 0 not in picks and sorted(picks[1:]) == [1, 2]
    # a new snapshot replaces the counted sends; in flight stays the floor
    assert router.choose(None, 0.2, _replicas([(0, 0), (0, 0), (0, 0)])) == 0


def test_the_default_ray_router_compares_two_random_replicas_by_requests_in_flight():
    router = make_router("requests", 2, random.Random(0))
    assert isinstance(router, RequestsRouter)
    router.sent(0, None, 0.0, None)
    assert {router.choose(None, 0.0, None) for _ in range(20)} == {1}


def test_token_routers_of_several_take_their_shares_and_the_overflow_asked_for():
    routers = [make_router("tokens@0.5", 8, random.Random(i), 4, i) for i in range(4)]
    assert [sorted(r.own) for r in routers] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert {r.table.overflow_share for r in routers} == {0.5}
    assert make_router("tokens/unsharded", 8, random.Random(0), 4, 1).own is None
    assert make_router("tokens", 8, random.Random(0), 1, 0).own is None  # alone: all of them
