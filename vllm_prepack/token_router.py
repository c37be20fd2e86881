"""The token router: a Ray Serve ``RequestRouter`` that balances prompt tokens, not requests.

Ray Serve's default router picks the replica with fewer requests in flight (power of two
choices), so one replica can hold ten long prompts while another holds ten short ones. Here each
replica's plugin publishes its exact load every step over the load channel (``load_channel.py``,
endpoints advertised in the replica's metadata), the router adds the prompt tokens it has sent
since, and picks by expected wait (``routing.py``). Everything the router does per request is
local: no RPC, no lock held across an await.

Deliberate differences from the default router: no same-node preference (it would pin an
ingress to its node's replicas whatever their load), and no FIFO matching across pending
requests (each routing task routes its own request, so the tokens charged are its tokens).
LoRA requests are routed among the replicas holding their adapter, as by default.

Ray's ``ReplicaID`` hashes and compares in Python (a frozen dataclass), a few hundred times a
request at 64 replicas: the router keys its tables by each replica's ``unique_id`` (a string,
unique within the deployment) and maps back to Ray's replicas only at its edges.

Several ingress replicas mean several routers, each seeing only its own sends between reports.
Router i of k (its ingress replica's rank, and the number of them: fixed, or under autoscaling
the replicas Ray Serve has started) keeps to its own share of the replicas and overflows only
to save a quarter of a step of wait (``routing.router_share``). With prefix affinity, each
replica publishes the prefixes it receives, so each router knows every router's sends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from operator import attrgetter
from typing import List, Optional, Sequence

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from vllm_prepack import touchpoints as touch
from vllm_prepack.load_channel import (
    METADATA_KEY,
    PREFIX_HASHING_KEY,
    PREFIX_METADATA_KEY,
    LoadSubscriber,
)
from vllm_prepack.routing import (
    OVERFLOW_STEP_SHARE,
    LoadTable,
    PrefixIndex,
    decode_chain,
    engine_requests,
    prompt_tokens,
    router_share,
    samples,
)

METRICS_FLUSH_S = 1.0
MAX_ROUTED = 65_536  # routed requests remembered until Ray reports where they went
CPU_SAMPLE = 64  # requests per reading of the router's CPU time
PLACE_REFRESH_S = 2.0  # how often a router reads its rank and the number of routers

logger = logging.getLogger(__name__)

# the router's key for a replica in its tables (module docstring), read in C: of a ReplicaID, and
# of a RunningReplica
replica_key = attrgetter("unique_id")
_candidate_key = attrgetter("replica_id.unique_id")


class TokenRouter(MultiplexMixin, RequestRouter):
    """The least expected wait in tokens; see the module docstring and routing.py."""

    def initialize_state(self, choices: int = 0, chars_per_token: float = 4.0,
                         stale_after_s: float = 0.5, prefix_block: int = 0,
                         prefix_blocks: int | None = None, shard: bool = True,
                         overflow_share: float = OVERFLOW_STEP_SHARE,
                         place: Sequence[int] | None = None) -> None:
        """`choices`: replicas sampled per request (2: power of two choices), 0 for up to
        ``routing.SCAN_LIMIT`` of them.
        `chars_per_token`: the text estimate until a report counts the real tokens.
        `stale_after_s`: a replica silent this long is passed over. `prefix_block`: > 0 turns
        prefix affinity on, in blocks of this many tokens; `prefix_blocks`: the most recent
        blocks its index keeps (with the replicas' prefix feeds, of every router's sends);
        None: as many as the replicas' KV caches hold by their load reports, within
        ``routing.MIN_PREFIX_BLOCKS`` and ``routing.MAX_PREFIX_BLOCKS``.
        `shard`: where the router runs in one of several ingress replicas, keep to its share
        of the replicas (``routing.router_share``), leaving it only to save `overflow_share`
        of a step's budget of wait. `place`: (rank, routers) fixed by hand, for a router built
        outside Ray Serve (the route bench; every router of a deployment gets the same options,
        so it is no deployment option); None reads them from Ray Serve."""
        self._choices = choices
        # (this router's rank, routers); None: alone, as far as it knows
        self._place = tuple(place) if shard and place is not None else None
        self._replica_ids: list[str] = []  # keys (`replica_key`), as every table here
        self._own: frozenset | None = None  # this router's share of the replicas
        self._chars_per_token = chars_per_token
        self._lock = threading.Lock()  # the subscriber thread reports, the router's loop routes
        self._table = LoadTable(stale_after=stale_after_s, overflow_share=overflow_share)
        self._prefix = (PrefixIndex(prefix_block, chars_per_token, capacity=prefix_blocks)
                        if prefix_block > 0 else None)
        self._subscriber = LoadSubscriber(self._on_report)
        self._endpoints: dict[str, str] = {}
        # the replicas' prefix feeds; `_fed`: every replica publishes one, hashed as this
        # router hashes, so the index holds the other routers' sends too
        self._prefix_feed = (LoadSubscriber(self._on_prefix, decode=decode_chain, conflate=False)
                             if self._prefix is not None else None)
        self._fed = False
        # request key -> (replica charged, prompt tokens, requests the engine takes for it, the
        # runner-up's cached tokens, prefix hashes), until Ray says where it sent the request or
        # that it completed
        self._routed: OrderedDict[str, tuple] = OrderedDict()
        self._cost = _RouteCost(touch.deployment_tags(self))
        if shard and place is None:
            threading.Thread(target=self._watch_place, daemon=True,
                             name="prepack-router-place").start()

    def _on_report(self, replica, report, now: float) -> None:
        with self._lock:
            if replica in self._endpoints:  # not one forgotten since (died, or left)
                self._table.report(replica, report, now)
                if self._prefix is not None:
                    self._prefix.cover(self._table.cache_tokens)

    def _on_prefix(self, replica, chain: list[int], now: float) -> None:
        with self._lock:
            if replica in self._endpoints:  # not one forgotten since (died, or left)
                self._prefix.insert(chain, replica)

    def close(self) -> None:
        """Stops the subscriber threads (Ray Serve ends a router with its process)."""
        self._subscriber.close()
        if self._prefix_feed is not None:
            self._prefix_feed.close()

    # ---- replicas come and go -------------------------------------------------------------

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        keys = list(map(_candidate_key, replicas))
        metadata = [r.replica_metadata for r in replicas]
        endpoints = {k: m[METADATA_KEY] for k, m in zip(keys, metadata) if m.get(METADATA_KEY)}
        hashing = self._prefix.settings if self._prefix is not None else None
        feeds = {k: m[PREFIX_METADATA_KEY] for k, m in zip(keys, metadata)
                 if m.get(PREFIX_HASHING_KEY) == hashing and m.get(PREFIX_METADATA_KEY)}
        with self._lock:
            for gone in set(self._endpoints) - set(keys):  # left Ray's list: for good
                self._forget(gone)
            self._replica_ids = keys
            self._reshard()
            self._endpoints = endpoints
            self._fed = bool(replicas) and len(feeds) == len(replicas)
        self._subscriber.watch(endpoints)
        if self._prefix_feed is not None:
            self._prefix_feed.watch(feeds)

    def _watch_place(self) -> None:
        """Reads the router's rank and the number of routers (``touchpoints.router_shard``)
        every PLACE_REFRESH_S, off the router's event loop (under autoscaling it asks Ray's
        GCS), for as long as the process runs, as the load subscriber does; stops at once
        outside a Ray Serve replica. A failed read keeps the last place."""
        failures = 0
        while True:
            try:
                place = touch.router_shard()
            except Exception as e:  # the routing thread must outlive any failed read
                failures += 1
                logger.log(logging.WARNING if failures == 1 else logging.DEBUG,
                           "token router: its rank and the number of routers not read (%r); "
                           "keeping the last (%s)", e, self._place)
            else:
                if place is None:
                    return  # not in a Ray Serve replica: one router as far as it can tell
                if place != self._place:
                    with self._lock:
                        self._place = place
                        self._reshard()
            time.sleep(PLACE_REFRESH_S)

    def _reshard(self) -> None:
        """This router's share of the replicas, under the lock, as replicas or routers change.
        None (every replica) while its rank is not below the count: an autoscaled ingress
        counts replicas still starting or stopping, so ranks and count disagree for a while."""
        place = self._place
        self._own = (router_share(self._replica_ids, *place)
                     if place is not None and 1 < place[1] and place[0] < place[1] else None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        # no new share here: the other routers have not seen the death yet, and would not
        # agree; the dead replica is passed over once silent, and Ray's next update_replicas
        # reshards every router alike
        super().on_replica_actor_died(replica_id)
        key = replica_key(replica_id)
        with self._lock:
            self._forget(key)
            self._endpoints.pop(key, None)  # its queued feed messages: dropped

    def _forget(self, key: str) -> None:
        self._table.forget(key)
        if self._prefix is not None:
            self._prefix.forget(key)
            self._prefix.cover(self._table.cache_tokens)

    # ---- routing --------------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        """Ranks of one replica each: the best expected wait first, the runner-up next (Ray
        tries the next rank only if the first cannot take the request)."""
        started = time.perf_counter()
        cpu = time.thread_time() if self._cost.sample_cpu() else None
        if pending_request is None:
            return [[r] for r in candidate_replicas[:2]]
        touch.allow_backoff(pending_request)
        replicas = dict(zip(map(_candidate_key, candidate_replicas), candidate_replicas))
        if touch.multiplexed_model_id(pending_request):
            allowed = {replica_key(r) for r in self.apply_multiplex_routing(pending_request)}
            replicas = {k: r for k, r in replicas.items() if k in allowed} or replicas
        body = touch.request_body(pending_request)
        # every prompt's tokens, n times with n samples: the engine takes a request for each
        # prompt and sample (`arrivals`), all of them prefilled before the response is whole
        n = samples(body)
        tokens = n * prompt_tokens(body, self._chars_per_token) if body is not None else 0
        arrivals = engine_requests(body)
        hashes = self._prefix.chain(body) if self._prefix is not None else []
        now = time.time()
        with self._lock:
            shared = self._table.spread > 1 and not self._fed
            hits = self._prefix.hits(hashes, replicas, shared) if hashes else {}
            hits = {r: n * hit for r, hit in hits.items()}  # each sample's prompt hits
            ranked = self._table.choose(list(replicas), tokens, now, self._choices, hits,
                                        self._own)
            # charged at once, so that requests routed before Ray's answer see it
            best = ranked[0]
            self._table.sent(best, touch.request_key(pending_request),
                             max(1, tokens - hits.get(best, 0)), now, arrivals)
            if hashes:
                self._prefix.insert(hashes, best)
            self._routed[touch.request_key(pending_request)] = (
                best, tokens, arrivals, hits.get(ranked[-1], 0), hashes)
            if len(self._routed) > MAX_ROUTED:  # requests cancelled before Ray sent them
                self._routed.popitem(last=False)
        self._cost.add(time.perf_counter() - started,
                       None if cpu is None else time.thread_time() - cpu)
        return [[replicas[r]] for r in ranked[:2]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        """Ray sent the request to `replica_id`: the runner-up when the first choice turned it
        away (its queue full); then the charge and the prefix move there."""
        key, replica = touch.request_key(pending_request), replica_key(replica_id)
        with self._lock:
            best, tokens, arrivals, runner_up_hit, hashes = self._routed.pop(
                key, (replica, 0, 1, 0, ()))
            if replica != best:
                self._table.sent(replica, key, max(1, tokens - runner_up_hit), time.time(),
                                 arrivals)
                if hashes:
                    self._prefix.insert(hashes, replica)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        with self._lock:
            self._routed.pop(internal_request_id, None)
            self._table.done(internal_request_id, replica_key(replica_id))


class _RouteCost:
    """The router's own time per request, wall and CPU (wall includes waiting for the GIL and
    the cores), exported as Ray metrics about once a second (a metric update per request would
    cost more than the routing). CPU time is read on one request in CPU_SAMPLE: reading a
    thread's CPU clock is a system call, 25 us each in the virtual machines this was measured
    on, more than routing a request."""

    def __init__(self, tags: dict) -> None:
        from ray.util.metrics import Counter

        def counter(name: str, description: str):
            return Counter(name, description, tag_keys=tuple(tags)).set_default_tags(tags)

        self._metrics = (
            counter("vllm_prepack_routes", "Requests the token router routed"),
            counter("vllm_prepack_route_seconds", "Wall time the token router spent routing"),
            counter("vllm_prepack_route_cpu_seconds",
                    "CPU time the token router spent routing the requests it sampled"),
            counter("vllm_prepack_route_cpu_samples", "Requests whose routing CPU time was read"),
        )
        self._pending = [0, 0.0, 0.0, 0]
        self._flushed = time.monotonic()

    def sample_cpu(self) -> bool:
        return self._pending[0] % CPU_SAMPLE == 0

    def add(self, wall: float, cpu: float | None) -> None:
        pending = self._pending
        pending[0] += 1
        pending[1] += wall
        if cpu is not None:
            pending[2] += cpu
            pending[3] += 1
        if time.monotonic() - self._flushed >= METRICS_FLUSH_S:
            self._pending, self._flushed = [0, 0.0, 0.0, 0], time.monotonic()
            for metric, value in zip(self._metrics, pending):
                if value > 0:  # Ray's counters take positive increments only
                    metric.inc(value)
