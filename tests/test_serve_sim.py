"""The engine-free routing simulation of ``bench serve``: every router places every request once,
the replicas (vLLM's scheduler with the plugin, or plain vLLM's) serve them all, and the baselines
route as the systems they stand for."""

import random
from types import SimpleNamespace

import pytest

from vllm_prepack.bench.serve_sim import (
    ROUTERS,
    Cost,
    DPRouter,
    Pool,
    RequestsRouter,
    capacity,
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


@pytest.mark.parametrize("router", (*ROUTERS, "tokens@0.5"))
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
