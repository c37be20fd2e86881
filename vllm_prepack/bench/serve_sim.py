"""Engine-free routing at 2-64 replicas, for ``bench serve``.

Each replica is vLLM's real scheduler with the plugin (the harness's, no model; vLLM's own FCFS
scheduler in the ``plain+requests`` row), stepping on a
cost model: a step of T tokens takes a + b x T seconds. Requests arrive as a Poisson process and
a router places each; it reaches its replica `transit` later, each replica's load report (the
plugin's own, ``PrepackScheduler.load_report``) reaches the routers `report_delay` after the
step that made it, and a finished request's completion reaches its router as late. Routers:
- ``requests``: Ray Serve's default, power of two choices on requests in flight (each router
  counts its own sends and completions, as Ray's queue-length cache does);
- ``prefix``: Ray Serve LLM's PrefixCacheAffinityRouter as configured by default: the replicas
  holding the longest prefix of the prompt when it matches at least 10% of it, else the
  replicas holding the fewest characters, then the fewest requests in flight among those;
- ``vllm-dp``: vLLM's data-parallel balancer (``DPLBAsyncMPClient``, vLLM 0.32): every replica
  scanned for the least max(requests this client has in flight there x clients, waiting +
  running from its coordinator's snapshot, refreshed every 100 ms, plus this client's sends
  since); its KV-pressure term stays off (the simulated KV pool is never half full);
- ``tokens``: this project's token router (``routing.LoadTable``, the production code) as it
  ships: up to ``SCAN_LIMIT`` replicas scanned a request; beside other routers, router i of k
  keeps to its own share of the replicas (``routing.router_share``, as the routers of k ingress
  replicas do) but for a wait shorter elsewhere by OVERFLOW_STEP_SHARE of a step;
  ``tokens/unsharded``: every router over all replicas (the router's ``shard`` option off);
  ``tokens/2``: on power of two choices; ``tokens+prefix``: with its prefix affinity
  (``routing.PrefixIndex``: where each prefix was sent, its own sends at once and the other
  routers' as the replicas publish the prefixes they receive, a report's delay after they
  arrive, as ``PrepackLLMServer`` does), its index as large as the replicas' caches;
  ``tokens+prefix/fixed``: the same with the index at its fixed size of before
  (``routing.MIN_PREFIX_BLOCKS``); ``tokens+prefix/home``: the same where replicas
  publish no prefixes (beside other routers, each prefix's home); these keep to their shares
  too; ``tokens+prefix/unsharded``: every router over all replicas;
- ``plain+requests``: plain vLLM in every replica (its FCFS scheduler, no plugin) behind Ray
  Serve's default router: the baseline of the live pairs (``bench serve --parts live``);
- ``oracle``: every replica's exact state at the instant (its scheduler's queue and the requests
  on their way to it, cached prefixes known), least expected wait over all replicas.
With several routers (``--sim-routers``), each request goes through one of them at random, the
same one in every row. Ray's routers share what they read (each replica's own count of requests
in flight, which Ray probes; Ray Serve LLM's one prefix-tree actor); vLLM's DP clients keep
their own counts over the shared snapshot; token routers keep their own charges, and every
report reaches all of them.

Prefix caching is modelled outside vLLM: a replica's cache holds, per prefix group or
conversation (LRU, up to `cache_tokens`), the tokens the group's next request finds there (a
group's shared prefix; a conversation's last turn, its prompt and reply), and a request is
submitted without what its replica holds of it. Ray's prefix tree and the token router's index
see prompts only: the next turn of a conversation matches its last prompt, not the reply.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from vllm_prepack.bench.harness import fake_step, make_request, standalone_scheduler
from vllm_prepack.bench.report import pct
from vllm_prepack.cost import MIN_STEPS
from vllm_prepack.routing import (
    MIN_PREFIX_BLOCKS,
    OVERFLOW_STEP_SHARE,
    LoadTable,
    PrefixIndex,
    router_share,
)
from vllm_prepack.workloads import prompt_lengths

TRANSIT_S = 0.002  # router to engine: HTTP hop, Ray call, tokenization
REPORT_DELAY_S = 0.001  # engine to router over the load channel
# a finished request's way back to the routers (engine core, API server, Ray's reply to the
# proxy): no faster than the load channel's one hop, so a report that counts a request's
# arrival (sent as its step is scheduled) is heard before its completion
COMPLETION_DELAY_S = REPORT_DELAY_S
PREFIX_TOKENS = 1024  # a prefix group's shared prompt (system prompt, few-shot examples)
PREFIX_CACHE_TOKENS = 4 * PREFIX_TOKENS  # a replica's cache in the prefix rows: four groups
# the chat rows: a replica's cache (about what an 8B model's KV holds on an 80 GB GPU), the
# conversations under way per replica, and the longest conversation
CHAT_CACHE_TOKENS = 400_000
CHAT_ACTIVE = 48
CHAT_MAX_TOKENS = 4000
_CONVERSATION_IDS = 1 << 20  # token ids apart between two conversations' token streams


@dataclass(frozen=True)
class Cost:
    """A step of T tokens takes a + b x T seconds."""

    name: str
    a: float
    b: float
    budget: int

    def step(self, tokens: int) -> float:
        return self.a + self.b * tokens


@dataclass
class SimRequest:
    key: int
    length: int
    decode: int
    group: int | None = None  # prefix group, or conversation: what a replica's cache keys
    shared: int = 0  # leading prompt tokens an earlier request of its group left in a cache
    sent: int = 0  # of those, the tokens an earlier request of its group sent as its prompt
    keeps: int = 0  # tokens a later request of its group finds cached after this one
    turn: bool = False  # a conversation's turn: its prompt is the conversation's token stream

    def ids(self) -> tuple[int, ...]:
        """The token ids routers hash: a conversation's stream up to this prompt; a prefix
        group's shared prefix."""
        if self.turn:
            start = self.group * _CONVERSATION_IDS
            return tuple(range(start, start + self.length))
        return (self.group,) * self.shared


def workload(name: str, n: int, seed: int) -> list[SimRequest]:
    """Seeded synthetic requests: 'embed' (the MiniLM mix, no decode), 'generate' (bimodal chat
    and documents, 8-64 tokens out), 'prefix' (one of 2 x replicas shared prefixes + a
    lognormal suffix). Seeded and synthetic: no dataset or network needed."""
    rng = random.Random(f"sim:{name}:{seed}")
    if name == "embed":
        return [SimRequest(i, n_, 1) for i, n_ in enumerate(prompt_lengths("trimodal", n, seed))]
    if name == "generate":
        return [SimRequest(i, n_, rng.randint(8, 64))
                for i, n_ in enumerate(prompt_lengths("bimodal", n, seed, max_len=1500))]
    raise ValueError(name)


def prefix_workload(n: int, groups: int, seed: int) -> list[SimRequest]:
    rng = random.Random(f"sim:prefix:{seed}")
    return [SimRequest(i, PREFIX_TOKENS + max(8, round(rng.lognormvariate(4.3, 0.6))),
                       rng.randint(8, 64), group=rng.randrange(groups), shared=PREFIX_TOKENS,
                       sent=PREFIX_TOKENS, keeps=PREFIX_TOKENS) for i in range(n)]


def chat_workload(n: int, active: int, seed: int) -> list[SimRequest]:
    """Multi-turn conversations, `active` under way at a time, each request a turn of one of
    them at random: a first prompt of a system prompt and a document (~1,000 tokens), then each
    turn the last prompt, its reply (8-64 tokens, as in the generation rows) and a new message
    (~180 tokens), until the conversation would pass CHAT_MAX_TOKENS; then a new one takes its
    place."""
    rng = random.Random(f"sim:chat:{seed}")
    last: dict[int, SimRequest] = {}  # conversation -> its last turn
    new = itertools.count()
    under_way = [next(new) for _ in range(active)]
    out = []
    for i in range(n):
        slot = rng.randrange(active)
        conversation = under_way[slot]
        before = last.get(conversation)
        message = max(8, round(rng.lognormvariate(5.0, 0.6)))
        decode = rng.randint(8, 64)
        if before is not None and before.keeps + message + decode > CHAT_MAX_TOKENS:
            conversation = under_way[slot] = next(new)
            before = None
        if before is None:
            length = max(64, round(rng.lognormvariate(6.8, 0.5))) + message
            request = SimRequest(i, length, decode, group=conversation, turn=True)
        else:
            request = SimRequest(i, before.keeps + message, decode, group=conversation,
                                 shared=before.keeps, sent=before.length, turn=True)
        request.keeps = request.length + decode
        last[conversation] = request
        out.append(request)
    return out


# ---- replicas -------------------------------------------------------------------------------


class SimReplica:
    def __init__(self, index: int, scheduler, cache_tokens: int) -> None:
        self.index = index
        self.scheduler = scheduler
        self.stepping = False
        self.step = (0.0, 0.0, 0)  # the step under way: start, end, tokens
        self.cache: OrderedDict[int, int] = OrderedDict()  # group -> tokens cached for it
        self.cache_tokens = cache_tokens
        self.cached = 0
        self.transit: dict[int, int] = {}  # request key -> uncached tokens, on its way here
        self.requests: dict[str, tuple[SimRequest, float]] = {}  # engine id -> (request, t0)

    def step_left(self, now: float) -> int:
        """Tokens' worth of the step under way still to compute."""
        start, end, tokens = self.step
        return round(tokens * (end - now) / (end - start)) if self.stepping and end > now else 0

    def uncached(self, request: SimRequest) -> int:
        if request.group is None:
            return request.length
        return request.length - min(self.cache.get(request.group, 0), request.shared)

    def deliver(self, request: SimRequest, sent: float, now: float, run: int) -> None:
        self.transit.pop(request.key, None)
        length = self.uncached(request)
        if request.group is not None:
            self.cached += request.keeps - self.cache.pop(request.group, 0)
            self.cache[request.group] = request.keeps
            while self.cached > self.cache_tokens:
                self.cached -= self.cache.popitem(last=False)[1]
        engine_id = f"{run}.{request.key}"
        self.requests[engine_id] = (request, sent)
        self.scheduler.add_request(make_request(engine_id, length, max_tokens=request.decode,
                                                arrival_time=now))


# ---- routers ----------------------------------------------------------------------------------


class RequestsRouter:
    """Ray Serve's default: power of two choices on this router's requests in flight."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.inflight = [0] * n
        self.rng = rng

    def choose(self, request, now, replicas) -> int:
        a, b = self.rng.sample(range(len(self.inflight)), 2)
        return a if self.inflight[a] <= self.inflight[b] else b

    def share(self, first: RequestsRouter) -> None:
        """Read what `first` reads: the replicas' own counts, not this router's sends."""
        self.inflight = first.inflight

    def sent(self, replica, request, now, replicas) -> None:
        self.inflight[replica] += 1

    def done(self, replica, request) -> None:
        self.inflight[replica] -= 1

    def report(self, replica, report, now) -> None:
        pass


class DPRouter(RequestsRouter):
    """vLLM's data-parallel balancer; see the module docstring."""

    PERIOD_S = 0.1  # the coordinator's stats interval

    def __init__(self, n: int, rng: random.Random, clients: int) -> None:
        super().__init__(n, rng)
        self.clients = clients
        self.counts = [[0, 0] for _ in range(n)]  # [waiting, running] per replica
        self.snapshot_at = -math.inf
        self.scan_from = rng.randrange(n)

    def choose(self, request, now, replicas) -> int:
        if now - self.snapshot_at >= self.PERIOD_S:
            self.snapshot_at = now
            self.counts = [[len(r.scheduler.waiting), len(r.scheduler.running)] for r in replicas]
        n = len(self.counts)
        best, best_score = 0, math.inf
        for i in range(n):
            idx = (self.scan_from + i) % n
            waiting, running = self.counts[idx]
            score = max(self.clients * self.inflight[idx], waiting + running)
            if score < best_score:
                best, best_score = idx, score
        self.counts[best][0] += self.clients
        self.scan_from = (self.scan_from + 1) % n
        return best


class PrefixRouter(RequestsRouter):
    """Ray Serve LLM's PrefixCacheAffinityRouter with its defaults (imbalanced_threshold inf:
    load never overrides a match; match_rate_threshold 0.1; no eviction)."""

    def __init__(self, n: int, rng: random.Random) -> None:
        super().__init__(n, rng)
        self.chars = [0] * n  # characters each replica holds in the prefix tree
        self.holders: dict[int, set[int]] = {}  # group -> replicas whose tree has its prefix

    def choose(self, request, now, replicas) -> int:
        holders = self.holders.get(request.group, set()) if request.group is not None else set()
        if holders and request.sent / request.length >= 0.1:
            pool = list(holders)
        else:
            least = min(self.chars)
            pool = [r for r, c in enumerate(self.chars) if c == least]
        self.rng.shuffle(pool)
        return min(pool, key=lambda r: self.inflight[r])

    def share(self, first: PrefixRouter) -> None:
        super().share(first)
        self.chars, self.holders = first.chars, first.holders  # the one prefix-tree actor

    def sent(self, replica, request, now, replicas) -> None:
        super().sent(replica, request, now, replicas)
        shared = request.sent if replica in self.holders.get(request.group, ()) else 0
        self.chars[replica] += request.length - shared  # the tree stores a prefix once
        if request.group is not None:
            self.holders.setdefault(request.group, set()).add(replica)


class TokensRouter:
    """This project's router policy, as in token_router.py (the same LoadTable/PrefixIndex)."""

    def __init__(self, n: int, rng: random.Random, choices: int, affinity: bool,
                 own: frozenset | None, overflow_share: float = OVERFLOW_STEP_SHARE,
                 fed: bool = False, index_blocks: int | None = None) -> None:
        # idle replicas heartbeat: never stale
        self.table = LoadTable(stale_after=math.inf, rng=rng, overflow_share=overflow_share)
        self.choices = choices
        self.index = (PrefixIndex(block=64, chars_per_token=1.0, capacity=index_blocks)
                      if affinity else None)
        self.n = n
        self.own = own
        self.fed = fed  # the replicas publish the prefixes they receive

    def hashes(self, request):
        """The request's prefix chain, as the router and (fed) the replica compute it."""
        if self.index is None or request.group is None:
            return []
        return self.index.hashes(request.ids())

    def choose(self, request, now, replicas) -> int:
        """As TokenRouter.choose_replicas: hash once, match once, choose, charge."""
        hashes = self.hashes(request)
        candidates = range(self.n)
        shared = self.table.spread > 1 and not self.fed
        hits = self.index.hits(hashes, candidates, shared) if hashes else {}
        replica = self.table.choose(list(candidates), request.length, now, self.choices, hits,
                                    self.own)[0]
        self.table.sent(replica, request.key, max(1, request.length - hits.get(replica, 0)), now)
        if hashes:
            self.index.insert(hashes, replica)
        return replica

    def sent(self, replica, request, now, replicas) -> None:
        pass  # charged in choose

    def done(self, replica, request) -> None:
        self.table.done(request.key)

    def report(self, replica, report, now) -> None:
        self.table.report(replica, report, now)

    def cover(self, cache_tokens: int) -> None:
        """The replicas' caches, as their load reports would size the index (the simulated
        schedulers' own KV pools are not the caches modelled here)."""
        if self.index is not None:
            self.index.cover(cache_tokens)

    def prefixes(self, replica, hashes) -> None:
        """A replica's published prefix, as TokenRouter._on_prefix inserts it."""
        self.index.insert(hashes, replica)


class OracleRouter:
    """Exact state: each scheduler's queue now, the requests on their way, what each caches."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.table = LoadTable(stale_after=math.inf, rng=rng)  # idle replicas heartbeat

    def choose(self, request, now, replicas) -> int:
        best, best_wait = 0, math.inf
        for r in replicas:
            self.table.report(r.index, r.scheduler.load_report(r.step_left(now)), now)
            wait = self.table.expected_wait(r.index, sum(r.transit.values()) + r.uncached(request))
            if wait < best_wait:
                best, best_wait = r.index, wait
        return best

    def sent(self, replica, request, now, replicas) -> None:
        replicas[replica].transit[request.key] = replicas[replica].uncached(request)

    def done(self, replica, request) -> None:
        pass

    def report(self, replica, report, now) -> None:
        pass


ROUTERS = ("plain+requests", "requests", "vllm-dp", "prefix", "tokens/2", "tokens/unsharded",
           "tokens", "tokens+prefix", "tokens+prefix/home", "oracle")
# on request only: at the default --sim-per-replica no workload fills the index, so the fixed
# one is the sized one; unsharded: beside other routers, what keeping to a share costs
EXTRA_ROUTERS = ("tokens+prefix/fixed", "tokens+prefix/unsharded")
PLAIN = "plain+"  # a row's prefix for plain vLLM in every replica (the plugin's otherwise)


def make_router(name: str, n: int, rng: random.Random, routers: int = 1, index: int = 0):
    """Router `index` of `routers` over `n` replicas; ``tokens@<share>``: the token router with
    that overflow share; ``tokens+prefix/fixed``: with its prefix index at the fixed size of
    before; ``plain+requests``: Ray's default router over plain vLLM replicas (the others read
    what only the plugin reports)."""
    if name.startswith(PLAIN):
        if name != PLAIN + "requests":
            raise ValueError(f"plain vLLM replicas report no load: only {PLAIN}requests, "
                             f"got {name!r}")
        name = "requests"
    if name == "requests":
        return RequestsRouter(n, rng)
    if name == "vllm-dp":
        return DPRouter(n, rng, routers)
    if name == "prefix":
        return PrefixRouter(n, rng)
    if name == "oracle":
        return OracleRouter(n, rng)
    name, _, overflow = name.partition("@")
    choices = 2 if name == "tokens/2" else 0
    own = (None if name.endswith("/unsharded") or routers == 1
           else router_share(range(n), index, routers))
    prefix = name.startswith("tokens+prefix")
    return TokensRouter(n, rng, choices, prefix, own,
                        float(overflow) if overflow else OVERFLOW_STEP_SHARE,
                        fed=prefix and not name.endswith("/home"),
                        index_blocks=MIN_PREFIX_BLOCKS if name.endswith("/fixed") else None)


def make_routers(name: str, n: int, rng: random.Random, routers: int) -> list:
    """`routers` instances of router `name`; Ray's routers read what the first reads (the
    replicas' own counts, its one prefix tree), the others keep their own state."""
    instances = [make_router(name, n, random.Random(rng.random()), routers, i)
                 for i in range(routers)]
    if name.removeprefix(PLAIN) in ("requests", "prefix"):
        for instance in instances[1:]:
            instance.share(instances[0])
    return instances


# ---- the event loop ---------------------------------------------------------------------------


@dataclass
class SimResult:
    ttft: list[float] = field(default_factory=list)
    makespan: float = 0.0
    computed: int = 0  # prompt tokens the replicas computed (a cache hit saves its prefix)
    route_s: float = 0.0  # wall time in the routers' choose and sent (this process)


class Pool:
    """Schedulers built once per shape and reused across runs (a build costs ~0.4 s). Runs
    follow each other on one simulated clock (``start``): a scheduler's newest arrival, which
    its load report carries, must never be later than the next run's sends."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self._pools: dict[tuple, list] = {}
        self.start = 0.0

    def get(self, n: int, budget: int, chunked: bool, scheduler: str = "prepack") -> list:
        pool = self._pools.setdefault((budget, chunked, scheduler), [])
        while len(pool) < n:
            pool.append(standalone_scheduler(
                self.model_dir, scheduler=scheduler, budget=budget,
                max_model_len=4096 if chunked else budget, chunked_prefill=chunked,
                max_num_seqs=512, num_blocks=400_000, verify=False))
        return pool[:n]


def simulate_routing(pool: Pool, n: int, requests: list[SimRequest], router_name: str,
                     cost: Cost, rate: float, routers: int, seed: int, run: int,
                     chunked: bool, cache_tokens: int = PREFIX_CACHE_TOKENS) -> SimResult:
    """One run on `n` of the pool's replicas: `requests` arriving at `rate` per second through
    `routers` router instances."""
    plain = router_name.startswith(PLAIN)  # vLLM's own scheduler: no clock, no load reports
    schedulers = pool.get(n, cost.budget, chunked, "fcfs" if plain else "prepack")
    # plain+requests draws as requests does: the two rows differ in the replicas only
    rng = random.Random(f"route:{seed}:{router_name.removeprefix(PLAIN)}")
    arrivals_rng = random.Random(f"arrivals:{seed}")
    proxy_rng = random.Random(f"proxy:{seed}")  # which router a request reaches: alike in every row
    n = len(schedulers)
    replicas = [SimReplica(i, s, cache_tokens) for i, s in enumerate(schedulers)]
    instances = make_routers(router_name, n, rng, routers)
    for instance in instances:
        if isinstance(instance, TokensRouter):
            instance.cover(n * cache_tokens)
    fed = getattr(instances[0], "fed", False)
    events: list = []  # (time, order, kind, payload)
    order = 0

    def push(t, kind, payload):
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, payload))

    t = start = pool.start
    clock = [start]
    if not plain:  # the step-cost model learns step times on the simulated clock
        for scheduler in schedulers:
            scheduler.prepack_clock = lambda: clock[0]
            model = scheduler.step_cost_model
            k = 0
            while model.steps < MIN_STEPS:  # replicas that served a while measured (and warmed up)
                k += 1
                tokens = max(1, cost.budget * (k % MIN_STEPS + 1) // MIN_STEPS)
                model.observe(tokens, 1, cost.step(tokens))
    for request in requests:
        t += arrivals_rng.expovariate(rate)
        push(t, "arrive", request)
    result = SimResult()
    owner: dict[int, tuple] = {}  # request key -> (router, replica)
    first_token: set[str] = set()
    steps: dict[int, object] = {}

    def start_step(replica: SimReplica, now: float) -> None:
        out = replica.scheduler.schedule()
        if out.total_num_scheduled_tokens == 0:
            # vLLM's engine runs the empty step too (it hands the finished requests' ids to
            # the workers) and updates from it: the step-cost model learns the replica idles
            fake_step(replica.scheduler, out)
            replica.stepping = False
            if not plain and not replica.scheduler.has_requests():  # idle: reported once
                report = replica.scheduler.load_report()
                for instance in instances:
                    push(now + REPORT_DELAY_S, "report", (instance, replica.index, report))
            return
        replica.stepping = True
        tokens = out.total_num_scheduled_tokens
        replica.step = (now, now + cost.step(tokens), tokens)
        if not plain:
            report = replica.scheduler.load_report(tokens, len(out.num_scheduled_tokens))
            for instance in instances:
                push(now + REPORT_DELAY_S, "report", (instance, replica.index, report))
        steps[replica.index] = out
        push(now + cost.step(out.total_num_scheduled_tokens), "step", replica)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        clock[0] = now
        if kind == "arrive":
            instance = instances[proxy_rng.randrange(routers)]
            started = time.perf_counter()
            r = instance.choose(payload, now, replicas)
            instance.sent(r, payload, now, replicas)
            result.route_s += time.perf_counter() - started
            owner[payload.key] = (instance, r)
            push(now + TRANSIT_S, "deliver", (replicas[r], payload, now))
        elif kind == "deliver":
            replica, request, sent = payload
            result.computed += replica.uncached(request)
            replica.deliver(request, sent, now, run)
            if fed and request.group is not None:  # the replica publishes the prefix it got
                chain = instances[0].hashes(request)
                for instance in instances:
                    push(now + REPORT_DELAY_S, "prefixes", (instance, replica.index, chain))
            if not replica.stepping:
                start_step(replica, now)
        elif kind == "report":
            instance, r, report = payload
            instance.report(r, report, now)
        elif kind == "prefixes":
            instance, r, chain = payload
            instance.prefixes(r, chain)
        elif kind == "done":
            instance, r = owner.pop(payload.key)
            instance.done(r, payload)
        else:  # a step ends
            replica = payload
            out = steps.pop(replica.index)
            scheduler = replica.scheduler
            for engine_id in out.num_scheduled_tokens:
                state = scheduler.requests[engine_id]
                if engine_id not in first_token and state.num_computed_tokens >= state.num_prompt_tokens:
                    first_token.add(engine_id)
                    result.ttft.append(now - replica.requests[engine_id][1])
            for engine_id in fake_step(scheduler, out):
                request, _ = replica.requests.pop(engine_id)
                push(now + COMPLETION_DELAY_S, "done", request)
                result.makespan = max(result.makespan, now)
            start_step(replica, now)
    pool.start = result.makespan + 1.0
    result.makespan -= start
    return result


def capacity(requests: list[SimRequest], cost: Cost, n: int) -> float:
    """Requests per second `n` replicas serve with every step full: each step computes `budget`
    tokens, prompt and decode alike, in a + b x budget seconds."""
    per_request = statistics.fmean(r.length + r.decode for r in requests)
    return n * cost.budget / cost.step(cost.budget) / per_request


WORKLOADS = ("embed", "generate", "prefix", "chat")
AFFINITY = ("prefix", "chat")  # the workloads with prefixes to cache, where prefix routers run


def sim_workload(name: str, n: int, replicas: int, seed: int) -> tuple[list[SimRequest], int]:
    """`n` requests of workload `name` for `replicas`, and a replica's cache in tokens (0: no
    prefixes to cache)."""
    if name == "prefix":
        return prefix_workload(n, 2 * replicas, seed), PREFIX_CACHE_TOKENS
    if name == "chat":
        return chat_workload(n, CHAT_ACTIVE * replicas, seed), CHAT_CACHE_TOKENS
    return workload(name, n, seed), 0


def sim_table(model_dir: str, sizes: list[int], loads: list[float], costs: list[Cost],
              per_replica: int, routers_at: dict[int, int], seed: int,
              policies: tuple[str, ...] = ROUTERS,
              workloads: tuple[str, ...] = WORKLOADS) -> list[dict]:
    """Every router of `policies` (and the oracle) on the same requests and arrivals; ratios
    against the oracle of the run."""
    pool = Pool(model_dir)
    rows, run = [], 0
    # the order of the runs (the replicas' schedulers carry over from one to the next)
    order = (*(r for r in ROUTERS if r != "oracle"), *EXTRA_ROUTERS, "oracle")
    for cost in costs:
        for name in workloads:
            for n in sizes:
                requests, cache_tokens = sim_workload(name, per_replica * n, n, seed)
                chunked = name != "embed"
                names = [r for r in (*order, *(p for p in policies if p not in order))
                         if (r in policies or r == "oracle")
                         and (name in AFFINITY or "prefix" not in r)]
                for load in loads:
                    rate = load * capacity(requests, cost, n)
                    for k in sorted({1, routers_at.get(n, 1)}):
                        results = {}
                        for router in names:
                            run += 1
                            results[router] = simulate_routing(
                                pool, n, requests, router, cost, rate, k, seed, run, chunked,
                                cache_tokens)
                        oracle = results["oracle"]
                        base_mean = statistics.fmean(oracle.ttft)
                        base_p99 = pct(oracle.ttft, 99)
                        for router, res in results.items():
                            rows.append({
                                "cost": cost.name, "workload": name, "replicas": n,
                                "routers": k, "load": load, "router": router,
                                "TTFT mean ms": 1e3 * statistics.fmean(res.ttft),
                                "TTFT p99 ms": 1e3 * pct(res.ttft, 99),
                                "mean vs oracle": statistics.fmean(res.ttft) / base_mean,
                                "p99 vs oracle": pct(res.ttft, 99) / base_p99,
                                "prompt tokens computed vs oracle": res.computed / oracle.computed,
                            })
                            if router.startswith("tokens"):  # the production policy's own
                                # cost (the other routers are stand-ins)
                                rows[-1]["route us"] = 1e6 * res.route_s / len(requests)
    return rows
