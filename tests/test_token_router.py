"""The token router as Ray Serve drives it, without a cluster: Ray Serve's own router base class
and request types, load reports over the real load channel, each hook Ray calls (route, routed
elsewhere, completed, replicas changed). Replicas are stand-ins with the attributes a router
reads (Ray's RunningReplica looks its actor up)."""

import asyncio
import time

from vllm_prepack.bench.serve import StandaloneRouter
from vllm_prepack.routing import LoadReport
from vllm_prepack.token_router import replica_key


def _report(waiting: int, seq: int = 1, cache: int = 0) -> LoadReport:
    return LoadReport(seq=seq, time=time.time(), waiting_tokens=waiting, prefill_tokens=0,
                      decoding=0, budget=256, newest_arrival=0.0, requests=1 if waiting else 0,
                      arrived=0, cache_tokens=cache)


def _request(n: int, prompt):
    return StandaloneRouter.request(f"r{n}", prompt)


def in_loop(scenario, **router_kwargs):
    """Run `scenario(served)` in an event loop, two replicas "a" and "b" behind the router, built
    there."""
    async def main():
        served = StandaloneRouter(("a", "b"), app="app", max_ongoing=8, chars_per_token=1.0,
                                  **router_kwargs)
        try:
            await scenario(served)
        finally:
            served.close()

    asyncio.run(main())


def _heard(router, replica_id, waiting, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = router._table._views.get(replica_key(replica_id))
        if view is not None and view.report is not None and view.report.waiting_tokens == waiting:
            return
        time.sleep(0.01)
    raise AssertionError(f"no report of {waiting} waiting tokens from {replica_id}")


def test_routes_by_reported_tokens_and_follows_each_request_to_where_ray_sent_it():
    in_loop(_routes_by_reported_tokens)


async def _routes_by_reported_tokens(served):
    router, replicas, publishers = served.router, served.replicas, served.publishers
    router.update_replicas(list(replicas.values()))
    a, b = replicas["a"].replica_id, replicas["b"].replica_id
    ka, kb = replica_key(a), replica_key(b)  # the router's tables' keys
    publishers["a"].publish(_report(waiting=1000))
    publishers["b"].publish(_report(waiting=0))
    _heard(router, a, 1000)
    _heard(router, b, 0)

    candidates = [replicas["a"], replicas["b"]]
    ranks = await router.choose_replicas(candidates, _request(1, "x" * 50))
    assert [r[0].replica_id for r in ranks] == [b, a]  # the lighter first, then the runner-up
    assert router._table.unreported(kb) == 50  # charged at once: 50 characters, 1 a token

    # Ray's first choice turned it away and the runner-up took it: the charge moves
    router.on_request_routed(_request(1, "x" * 50), a, None)
    assert (router._table.unreported(ka), router._table.unreported(kb)) == (50, 0)
    router.on_request_completed(b, "r1")  # a late word about the first attempt: ignored
    assert router._table.unreported(ka) == 50
    router.on_request_completed(a, "r1")
    assert router._table.unreported(ka) == 0 and not router._routed

    # token ids are counted, not estimated; sends add up between reports: b takes three
    # prompts of 400 tokens, then a's 1000 waiting is the shorter wait
    picks = [(await router.choose_replicas(candidates, _request(n, list(range(400)))))[0][0]
             .replica_id for n in range(2, 6)]
    assert picks == [b, b, b, a]
    assert (router._table.unreported(ka), router._table.unreported(kb)) == (400, 1200)

    # n samples: the engine takes n requests of the prompt, charged as such, and moved as
    # such where Ray sends it elsewhere
    sampled = _request(10, list(range(100)))
    sampled.args[0].n = 3
    await router.choose_replicas([replicas["b"]], sampled)
    assert router._table.unreported(kb) == 1200 + 300
    assert router._table._charges["r10"].count == 3
    router.on_request_routed(sampled, a, None)
    assert (router._table.unreported(ka), router._table.unreported(kb)) == (400 + 300, 1200)
    assert router._table._charges["r10"].count == 3

    # a replica that leaves is forgotten, and no longer a candidate; a request Ray still sent
    # there (it had not heard) charges nothing
    router.update_replicas([replicas["b"]])
    assert ka not in router._table._views
    ranks = await router.choose_replicas([replicas["b"]], _request(9, "y"))
    assert [r[0].replica_id for r in ranks] == [b]
    router.on_request_routed(_request(9, "y"), a, None)
    assert ka not in router._table._views and router._table.unreported(kb) == 1200


def test_requests_without_an_openai_body_still_route():
    in_loop(_without_a_body)


async def _without_a_body(served):
    router, replicas = served.router, served.replicas
    router.update_replicas(list(replicas.values()))
    request = _request(0, None)
    request.args.clear()  # a request that is not an OpenAI body
    ranks = await router.choose_replicas(list(replicas.values()), request)
    assert len(ranks) == 2 and request.routing_context.should_backoff


def test_a_lora_request_routes_among_the_replicas_holding_its_adapter():
    """Ray's multiplex mixin names the replicas holding the adapter (as ReplicaIDs); the router
    ranks only those, however much emptier the others are."""
    in_loop(_lora_request)


async def _lora_request(served):
    router, replicas, publishers = served.router, served.replicas, served.publishers
    replicas["a"].multiplexed_model_ids = {"adapter"}
    router.update_replicas(list(replicas.values()))
    publishers["a"].publish(_report(waiting=5000))
    publishers["b"].publish(_report(waiting=0))
    _heard(router, replicas["a"].replica_id, 5000)
    _heard(router, replicas["b"].replica_id, 0)
    candidates = list(replicas.values())
    plain = await router.choose_replicas(candidates, _request(1, "x" * 10))
    assert plain[0][0] is replicas["b"]
    lora = _request(2, "x" * 10)
    lora.metadata.multiplexed_model_id = "adapter"
    ranks = await router.choose_replicas(candidates, lora)
    assert [r[0] for r in ranks] == [replicas["a"]]


def test_a_replica_that_died_is_forgotten_and_its_prefixes_route_on():
    """Ray says a replica's actor died (a ReplicaID): its load and its place in the prefix
    index go, and the prompt it held routes to the replica left. The index holds as many
    blocks as the replicas' KV caches, by their reports, and shrinks with the one gone."""
    in_loop(_replica_died, prefix_block=16)


async def _replica_died(served):
    router, replicas, publishers = served.router, served.replicas, served.publishers
    router.update_replicas(list(replicas.values()))
    a, b = replicas["a"].replica_id, replicas["b"].replica_id
    ka = replica_key(a)
    publishers["a"].publish(_report(waiting=0, cache=16 * 100_000))
    publishers["b"].publish(_report(waiting=500, cache=16 * 80_000))
    _heard(router, a, 0)
    _heard(router, b, 500)
    assert router._prefix.capacity == 180_000  # blocks of 16 tokens
    prompt = "a prompt of several blocks, " * 4
    blocks = len(prompt) // 16  # 16 characters a block (one a token here)
    ranks = await router.choose_replicas(list(replicas.values()), _request(1, prompt))
    assert ranks[0][0] is replicas["a"]
    assert router._prefix.match(router._prefix.hashes(prompt)) == {ka: blocks}
    router.on_replica_actor_died(a)
    assert ka not in router._table._views and ka not in router._endpoints
    assert router._prefix.match(router._prefix.hashes(prompt)) == {}
    assert router._prefix.capacity == 80_000
    # Ray's candidates may still name it for a while: a request routed there leaves no prefix
    # (inserting one for a forgotten key would walk the whole index)
    index = router._prefix
    for n in range(3, 6):
        other = f"{n} other prompt " * 4
        await router.choose_replicas(list(replicas.values()), _request(n, other))
        assert all(ka not in index._blocks.get(h, ()) for h in index.hashes(other))
    assert ka in index._gone  # never sent to again: never walked out of the index
    ranks = await router.choose_replicas([replicas["b"]], _request(2, prompt))
    assert [r[0] for r in ranks] == [replicas["b"]]
    assert router._prefix.match(router._prefix.hashes(prompt)) == {replica_key(b): blocks}


def test_a_prefix_another_router_sent_is_known_from_the_replicas_feed():
    """Replica "b" publishes a prompt's prefix that this router never sent (another router
    did): the prompt goes to b, whose cached prefix outweighs its longer queue, alone and
    beside other routers alike (the feed holds every router's sends, so no home is needed)."""
    in_loop(_learns_from_the_feed, prefix_block=64, prefix_feeds=True)


async def _learns_from_the_feed(served):
    from vllm_prepack.routing import PrefixIndex

    router, replicas, publishers = served.router, served.replicas, served.publishers
    router.update_replicas(list(replicas.values()))
    assert router._fed
    a, b = replicas["a"].replica_id, replicas["b"].replica_id
    ka, kb = replica_key(a), replica_key(b)  # the router's tables' keys
    publishers["a"].publish(_report(waiting=0))
    publishers["b"].publish(_report(waiting=300))
    _heard(router, a, 0)
    _heard(router, b, 300)
    prompt = "".join(chr(65 + i % 26) for i in range(640))  # 10 blocks of 64 characters
    candidates = [replicas["a"], replicas["b"]]
    ranks = await router.choose_replicas(candidates, _request(1, prompt))
    assert ranks[0][0].replica_id == a  # nothing cached anywhere: the shorter queue
    router.on_request_completed(a, "r1")

    # another prompt, sent to b by another router; its home is a, where routers without the
    # feed would count it cached
    other = next(p for p in (c + prompt[1:] for c in "xyzw")
                 if router._prefix.home(router._prefix.hashes(p)[0], [ka, kb]) == ka)
    chain = PrefixIndex(64, 1.0).hashes(other)
    deadline = time.time() + 10
    while kb not in router._prefix.match(chain) and time.time() < deadline:
        served.feeds["b"].publish(chain)  # until the subscriber has joined (ZMQ drops before)
        await asyncio.sleep(0.02)
    assert router._prefix.match(chain)[kb] == 10
    for n, spread in ((2, 1), (3, 2)):  # alone; one of two routers sharing the replicas
        router._table.spread = spread
        ranks = await router.choose_replicas(candidates, _request(n, other))
        assert ranks[0][0].replica_id == b
        router.on_request_completed(b, f"r{n}")


def test_a_router_of_a_fixed_size_ingress_keeps_to_its_share():
    """Router 1 of 2 (its place given here; read from Ray Serve by the thread tested below and
    in real replicas by test_serve) sends to its own replica while the other waits less by no
    more than a quarter of a step's budget, and beyond that to the other; a replica leaving
    leaves it the rest."""
    in_loop(_keeps_to_its_share, place=(1, 2))


async def _keeps_to_its_share(served):
    from vllm_prepack.routing import OVERFLOW_STEP_SHARE, router_share

    router, replicas, publishers = served.router, served.replicas, served.publishers
    router.update_replicas(list(replicas.values()))
    (own,) = router_share([replica_key(r.replica_id) for r in replicas.values()], 1, 2)
    mine, other = sorted(replicas, key=lambda name: replica_key(replicas[name].replica_id) != own)
    own = replicas[mine].replica_id
    overflow = int(OVERFLOW_STEP_SHARE * 256)  # _report's budget
    publishers[mine].publish(_report(waiting=overflow))
    publishers[other].publish(_report(waiting=0))
    _heard(router, replicas[mine].replica_id, overflow)
    _heard(router, replicas[other].replica_id, 0)
    candidates = list(replicas.values())
    for n in range(5):  # its own, though the other is emptier
        ranks = await router.choose_replicas(candidates, _request(n, "x"))
        assert [r[0].replica_id for r in ranks] == [own, replicas[other].replica_id]
        router.on_request_completed(own, f"r{n}")
    publishers[mine].publish(_report(waiting=overflow + 10, seq=2))
    _heard(router, replicas[mine].replica_id, overflow + 10)
    ranks = await router.choose_replicas(candidates, _request(9, "x"))
    assert ranks[0][0].replica_id == replicas[other].replica_id  # worth overflowing to

    router.update_replicas([replicas[other]])  # its own left: the one left is its share
    assert router._own == {replica_key(replicas[other].replica_id)}


def test_a_router_given_its_place_keeps_to_its_share_from_the_start():
    """`place` (rank, routers) fixes the split for routers outside a Ray Serve replica; with
    `shard` off it is ignored."""
    from vllm_prepack.routing import router_share

    async def split(**kwargs):
        served = StandaloneRouter(("a", "b"), app="app", chars_per_token=1.0, **kwargs)
        try:
            replicas = list(served.replicas.values())
            served.router.update_replicas(replicas)
            return served.router._own, [replica_key(r.replica_id) for r in replicas]
        finally:
            served.close()

    own, ids = asyncio.run(split(place=(1, 2)))
    assert own == router_share(ids, 1, 2) and len(own) == 1
    assert asyncio.run(split(place=(1, 2), shard=False))[0] is None


def test_the_place_reader_survives_a_failed_read_and_takes_no_share_at_a_rank_past_the_count(
        monkeypatch):
    """Reads in turn: a failure (the last place stands), (1, 2), then rank 2 of a count of 2 (an
    autoscaled ingress counting a stopping replica): no share until the count catches up. Each
    read records what the one before left (the reader thread calls them in order). The thread
    reads on for as long as the process runs; once the patch is undone it finds no Serve
    replica and stops."""
    import threading

    from vllm_prepack import token_router

    places = iter([RuntimeError("GCS unreachable"), (1, 2), (2, 2), (2, 3)])
    go, served_router, seen = threading.Event(), [], []

    def read():
        go.wait(10)
        router = served_router[0]
        with router._lock:
            seen.append((router._place, router._own))
        place = next(places, (2, 3))
        if isinstance(place, Exception):
            raise place
        return place

    monkeypatch.setattr(token_router.touch, "router_shard", read)
    monkeypatch.setattr(token_router, "PLACE_REFRESH_S", 0.01)

    async def scenario(served):
        served_router.append(served.router)
        served.router.update_replicas(list(served.replicas.values()))
        go.set()
        deadline = time.time() + 10
        while len(seen) < 5 and time.time() < deadline:
            await asyncio.sleep(0.01)
        (p0, own0), (p1, own1), (p2, own2), (p3, own3), (p4, own4) = seen[:5]
        assert (p0, own0) == (None, None) and (p1, own1) == (None, None)  # failed: none yet
        assert p2 == (1, 2) and len(own2) == 1
        assert p3 == (2, 2) and own3 is None  # rank past the count: every replica
        assert p4 == (2, 3) and len(own4) == 1  # 3 routers, 2 replicas: one each

    in_loop(scenario)
