"""``vllm-prepack bench serve``: serving on Ray Serve, Ray's routers vs the token router, plain
vLLM vs the plugin; then the routers over simulated replicas, engine-free.

Live (``--parts live``): Ray Serve LLM on this machine, 2 replicas of each model (one core
each), an embedding model (all-MiniLM-L6-v2, real weights) and a small random-weight Llama
(seeded synthetic prompt lengths: no dataset or network needed), the latter also on prompts
that share prefixes (``prefix``: as many prefix tokens as one replica's whole KV cache holds,
which its running requests share, half that for each of two, so where a router sends each
prefix decides what is computed again).
Configurations: plain vLLM or the plugin, behind Ray Serve's default router (power of two
choices on requests in flight), Ray Serve LLM's PrefixCacheAffinityRouter or the token router.
A CPU replica is three processes of about 2.5 GB together, so two configurations are deployed
at a time, as pairs that each hold their ratio's baseline: (plain + default, plugin + tokens),
(plugin + default, plugin + tokens), (plain + default, plain + prefix); on shared prefixes
(plain + default, plugin + tokens), (plain + prefix, plugin + tokens); ``--pairs`` chooses
others. Each run is open-loop Poisson arrivals over HTTP on loopback (vLLM's own ``bench
serve`` request functions: streaming completions, time to the first token; embeddings, time to
the answer), bounded in count and time, of a skewed length mix (or the shared-prefix prompts),
at fractions of the capacity measured first (a backlog on the first pair's base). Runs
alternate between the two configurations of a pair, the same seeded requests and arrival times
for both; medians of the repeats. Routing cost: the token router's own time per request (its
Ray metrics), and Ray Serve's time from a request's arrival at the router to its replica being
chosen, for every router (``serve_request_router_fulfillment_time_ms``). Prefix cache hits:
the share of prompt tokens each configuration's engines found in their prefix caches over all
the pair's runs, both loads (vLLM's counters, each configuration serving under a model id of
its own; a preempted request's recomputation is not in them).

Simulation (``--parts sim``): ``serve_sim.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import time
from dataclasses import dataclass

from vllm_prepack.argtypes import at_least_one, non_negative, positive
from vllm_prepack.bench.report import header, pct, table
from vllm_prepack.bench.serve_sim import EXTRA_ROUTERS, ROUTERS, WORKLOADS, Cost, sim_table
from vllm_prepack.models import DecoderShape
from vllm_prepack.routing import MAX_PREFIX_BLOCKS, MIN_PREFIX_BLOCKS, PrefixIndex
from vllm_prepack.touchpoints import internal

CONFIGS = {  # name: (the plugin, router)
    "plain+requests": (False, "requests"),
    "plain+prefix": (False, "prefix"),
    "prepack+requests": (True, "requests"),
    "prepack+prefix": (True, "prefix"),
    "prepack+tokens": (True, "tokens"),
}
PAIRS = (("plain+requests", "prepack+tokens"), ("prepack+requests", "prepack+tokens"),
         ("plain+requests", "plain+prefix"))
# on shared prefixes: Ray Serve LLM's prefix router is the peer to beat
PREFIX_PAIRS = (("plain+requests", "prepack+tokens"), ("plain+prefix", "prepack+tokens"))
GEN_MODEL = DecoderShape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1408, vocab_size=8192,
                         initializer_range=0.02)
# the prefix workload: 16 shared prefixes of 1024 tokens a run, 16k tokens of KV cache where
# one replica holds them all, 8k where each holds half; a replica's cache holds 16k
# (PREFIX_KV_BLOCKS of 128 tokens) and its running requests take their share of it
PREFIX_CHARS = 1024
PREFIX_GROUPS = 16
PREFIX_KV_BLOCKS = 128
GEN_ENGINE = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=512,
                  enforce_eager=True)
ENGINES = {
    "embed": dict(runner="pooling", dtype="float32", max_model_len=256, max_num_batched_tokens=1024,
                  enforce_eager=True),
    "generate": GEN_ENGINE,
    "prefix": {**GEN_ENGINE, "num_gpu_blocks_override": PREFIX_KV_BLOCKS},
}
GEN_MAX_TOKENS = 16
WARM = 8  # the first prompts warm each app up
METRICS_PORT = 9779
METRICS_EXPORT_S = 15  # Ray exports metrics every few seconds: wait this long to read them
ENV = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}


@dataclass
class Workload:
    kind: str  # "embed" | "generate" | "prefix"
    model: str  # folder
    prompts: list[str]
    lengths: list[int]  # prompt tokens


def embed_workload(model: str, n: int, seed: int) -> Workload:
    """The MiniLM mix (trimodal: queries, passages, long passages; 6-252 tokens) as text of
    whole-word tokens of the model's own vocabulary, so each prompt has its intended length."""
    from transformers import AutoTokenizer

    from vllm_prepack.workloads import prompt_lengths

    tokenizer = AutoTokenizer.from_pretrained(model)
    words = [w for w, i in tokenizer.get_vocab().items() if 2000 <= i < 20000 and w.isalpha()]
    rng = random.Random(f"embed:{seed}")
    lengths = prompt_lengths("trimodal", n, seed=seed)
    prompts = []
    for length in lengths:
        text = " ".join(rng.choice(words) for _ in range(length - 2))  # [CLS] ... [SEP]
        prompts.append(text)
    return Workload("embed", model, prompts, [len(tokenizer(p)["input_ids"]) for p in prompts])


def generate_workload(model: str, n: int, seed: int) -> Workload:
    """Bimodal chat + documents (up to 1500 tokens) as text for the byte-level tokenizer."""
    from vllm_prepack.workloads import prompt_lengths

    rng = random.Random(f"generate:{seed}")
    lengths = prompt_lengths("bimodal", n, seed=seed, max_len=1500)
    return Workload("generate", model, [_text(rng, length) for length in lengths], lengths)


def shared_prefix_workload(model: str, n: int, seed: int, start: int, block: int) -> Workload:
    """Generation prompts that share prefixes, as text for the byte-level tokenizer: each opens
    with one of PREFIX_GROUPS prefixes of PREFIX_CHARS tokens (a system prompt, few-shot
    examples), then a suffix of its own (lognormal, median 74 tokens). Each `block` of
    prompts from `start` on (a run's) draws from prefixes of its own, so that each run starts
    with cold caches and router state; the prompts before `start` (warm-up, capacity) too."""
    rng = random.Random(f"prefix:{seed}")
    prefixes: dict[tuple[int, int], str] = {}
    prompts = []
    for i in range(n):
        key = ((i - start) // block, rng.randrange(PREFIX_GROUPS))
        if key not in prefixes:
            prefixes[key] = _text(random.Random(f"prefix:{seed}:{key}"), PREFIX_CHARS)
        prompts.append(prefixes[key] + _text(rng, max(8, round(rng.lognormvariate(4.3, 0.6)))))
    return Workload("prefix", model, prompts, [len(p) for p in prompts])


def _text(rng: random.Random, chars: int) -> str:
    """Random letters and spaces: one token a character for the byte-level tokenizer."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(chars))


# ---- the client ----------------------------------------------------------------------------


@dataclass
class RunResult:
    ttft: list[float]  # seconds, successful requests
    errors: int
    seconds: float  # first send to last answer
    prompt_tokens: int

    @property
    def throughput(self) -> float:
        return len(self.ttft) / self.seconds if self.seconds > 0 else float("nan")


async def _drive(url: str, model_id: str, workload: Workload, indices: list[int],
                 offsets: list[float], timeout_s: float) -> RunResult:
    """Send request i at offsets[i] seconds (open loop), with vLLM's bench request functions."""
    import aiohttp
    generate = workload.kind != "embed"
    func = internal.ASYNC_REQUEST_FUNCS["openai" if generate else "openai-embeddings"]
    api = f"{url}/v1/{'completions' if generate else 'embeddings'}"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()

        async def one(i: int, at: float):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            request = internal.RequestFuncInput(prompt=workload.prompts[i], api_url=api, model=model_id,
                                       prompt_len=workload.lengths[i], ignore_eos=True,
                                       output_len=GEN_MAX_TOKENS if generate else 0)
            try:
                out = await func(request, session)
            except asyncio.TimeoutError:
                return None, time.perf_counter() - start
            return out, time.perf_counter() - start

        done = await asyncio.gather(*(one(i, at) for i, at in zip(indices, offsets)))
    ok = [out for out, _ in done if out is not None and out.success]
    ttft = [out.ttft if generate else out.latency for out in ok]
    return RunResult(ttft, len(done) - len(ok), max(t for _, t in done) - offsets[0],
                     sum(workload.lengths[i] for i in indices))


def poisson_offsets(n: int, rate: float, max_seconds: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process at `rate`, at most `n` and within `max_seconds`."""
    rng, t, out = random.Random(f"poisson:{seed}"), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        if t > max_seconds:
            break
        out.append(t)
    return out


def run(url: str, model_id: str, workload: Workload, indices: list[int], offsets: list[float],
        timeout_s: float = 300.0) -> RunResult:
    return asyncio.run(_drive(url, model_id, workload, indices, offsets, timeout_s))


# ---- deployments ---------------------------------------------------------------------------


def model_name(kind: str, config: str) -> str:
    """The model id a configuration serves `kind` under: its own, so that the engines' metrics
    (labelled by model) tell the configurations apart."""
    return f"{kind}-{config.replace('+', '-')}"


def deploy(names, workload: Workload, replicas: int) -> None:
    """Each configuration as its own Ray Serve app at /<name>, started together."""
    from ray import serve

    from vllm_prepack.serve import build_app, prepack_llm_config

    targets = []
    for name in names:
        plugin, router = CONFIGS[name]
        config = prepack_llm_config(workload.model, model_id=model_name(workload.kind, name),
                                    replicas=replicas,
                                    engine_kwargs=ENGINES[workload.kind], prepack=plugin,
                                    router=router, runtime_env=ENV)
        targets.append(serve.RunTarget(build_app(config), name=name, route_prefix=f"/{name}"))
    if targets:
        serve.run_many(targets)


def app_url(name: str) -> str:
    return f"http://127.0.0.1:8000/{name}"


def undeploy(names) -> None:
    from ray import serve

    for name in names:
        serve.delete(name)


def metrics() -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_sum(text: str, name: str, **tags) -> float:
    """Sum of a Prometheus metric's samples whose labels include `tags`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if all(found.get(k) == v for k, v in tags.items()):
                total += float(value)
    return total


def app_totals(app: str, model_id: str) -> dict[str, float]:
    """The app's counters so far: Ray Serve's time to a chosen replica (count, ms) for its LLM
    deployment, the token router's routes and wall and CPU seconds, and its engines' prompt
    tokens looked up in and found in their prefix caches."""
    text = metrics()
    tags = dict(application=app, deployment=f"PrepackLLMServer:{model_id}", handle_source="REPLICA")
    return {
        "count": metric_sum(text, "ray_serve_request_router_fulfillment_time_ms_count", **tags),
        "ms": metric_sum(text, "ray_serve_request_router_fulfillment_time_ms_sum", **tags),
        "routes": metric_sum(text, "ray_vllm_prepack_routes_total", application=app),
        "wall": metric_sum(text, "ray_vllm_prepack_route_seconds_total", application=app),
        "cpu": metric_sum(text, "ray_vllm_prepack_route_cpu_seconds_total", application=app),
        "cpu samples": metric_sum(text, "ray_vllm_prepack_route_cpu_samples_total",
                                  application=app),
        "prefix queries": metric_sum(text, "ray_vllm_prefix_cache_queries_total",
                                     model_name=model_id),
        "prefix hits": metric_sum(text, "ray_vllm_prefix_cache_hits_total", model_name=model_id),
    }


def app_costs(before: dict[str, float], after: dict[str, float]) -> dict:
    """Between two totals: Ray Serve's mean time to a chosen replica (ms) and the token
    router's own wall and CPU time (us) per request, where it runs; the share of prompt tokens
    found in the prefix caches, where they were looked up."""
    d = {k: after[k] - before[k] for k in after}
    out = {"route ms (Ray)": d["ms"] / d["count"] if d["count"] else float("nan")}
    if d["routes"]:
        out["token router us"] = 1e6 * d["wall"] / d["routes"]
    if d["cpu samples"]:
        out["token router CPU us"] = 1e6 * d["cpu"] / d["cpu samples"]
    if d["prefix queries"]:
        out["prefix cache hits"] = d["prefix hits"] / d["prefix queries"]
    return out


# ---- the live part -------------------------------------------------------------------------


def live_model(args, kind: str) -> tuple[list[dict], list[str]]:
    """Every pair on fresh prompts (a prompt served twice by one app would hit its prefix
    cache; on shared prefixes, every run on prefixes of its own); within a pair both
    configurations get the same prompts and arrival times."""
    from vllm_prepack.models import decoder_model, minilm_model

    pairs = args.pairs or (PREFIX_PAIRS if kind == "prefix" else PAIRS)
    start = WARM + args.capacity_requests
    n = start + len(pairs) * len(args.loads) * args.repeats * args.requests
    if kind == "embed":
        workload = embed_workload(str(minilm_model()), n, 0)
    elif kind == "prefix":
        workload = shared_prefix_workload(str(decoder_model(GEN_MODEL)), n, 0, start,
                                          args.requests)
    else:
        workload = generate_workload(str(decoder_model(GEN_MODEL)), n, 0)
    fresh = iter(range(WARM, n))
    rows, notes, rate, deployed = [], [], None, set()
    for pair in pairs:
        ids = {c: model_name(kind, c) for c in pair}
        undeploy(deployed - set(pair))
        deploy([c for c in pair if c not in deployed], workload, args.replicas)
        deployed = set(pair)
        failing = {c: warm(app_url(c), ids[c], workload) for c in pair}
        notes += [f"{c}: {error}" for c, error in failing.items() if error]
        if rate is None:
            backlog = [next(fresh) for _ in range(args.capacity_requests)]
            rate = run(app_url(pair[0]), ids[pair[0]], workload, backlog,
                       [0.0] * len(backlog)).throughput
            notes.append(f"capacity (a backlog of {len(backlog)} on {pair[0]}): "
                         f"{rate:.2f} requests/s")
        configs = [c for c in pair if not failing[c]]
        time.sleep(METRICS_EXPORT_S)  # the warm-up's and the capacity run's routes, exported
        before = {c: app_totals(c, ids[c]) for c in configs}
        for load in args.loads:
            results = {c: [] for c in configs}
            for repeat in range(args.repeats):
                offsets = poisson_offsets(args.requests, load * rate, args.max_seconds, repeat)
                indices = [next(fresh) for _ in range(args.requests)][:len(offsets)]
                for c in (configs if repeat % 2 == 0 else configs[::-1]):
                    results[c].append(run(app_url(c), ids[c], workload, indices, offsets))
            rows += pair_rows(kind, pair, load, results)
        time.sleep(METRICS_EXPORT_S)
        costs = {c: app_costs(before[c], app_totals(c, ids[c])) for c in configs}
        if kind == "prefix":
            notes += [f"{c}: no prefix cache counters read (vLLM's engine metrics off?)"
                      for c in configs if "prefix cache hits" not in costs[c]]
        for row in rows:
            if row["pair"] == pair_label(pair):
                row.update(costs.get(row["config"], {}))
    undeploy(deployed)
    return rows, notes


def pair_label(pair) -> str:
    return f"{pair[0]} vs {pair[1]}"


def warm(url: str, model_id: str, workload: Workload) -> str | None:
    """A few requests before measuring; the error if the configuration cannot serve them."""
    result = run(url, model_id, workload, list(range(WARM)), [0.05 * i for i in range(WARM)],
                 timeout_s=60.0)
    if result.errors:
        return f"{result.errors} of {WARM} warm-up requests failed or hung (60 s)"
    return None


def pair_rows(kind: str, pair, load: float, results: dict[str, list[RunResult]]) -> list[dict]:
    """Medians over the repeats; ratios against the pair's first configuration."""
    def med(runs, f):
        return statistics.median(f(r) for r in runs)

    base = results.get(pair[0])
    rows = []
    for c, runs in results.items():
        row = {"model": kind, "pair": pair_label(pair), "load": load, "config": c,
               "requests": sum(len(r.ttft) + r.errors for r in runs), "errors": sum(r.errors for r in runs),
               "TTFT mean s": med(runs, lambda r: statistics.fmean(r.ttft)),
               "TTFT p99 s": med(runs, lambda r: pct(r.ttft, 99)),
               "req/s": med(runs, lambda r: r.throughput)}
        if base:
            row["mean vs base"] = row["TTFT mean s"] / med(base, lambda r: statistics.fmean(r.ttft))
            row["p99 vs base"] = row["TTFT p99 s"] / med(base, lambda r: pct(r.ttft, 99))
            row["req/s vs base"] = row["req/s"] / med(base, lambda r: r.throughput)
        rows.append(row)
    return rows


LIVE_COLUMNS = ["model", "pair", "load", "config", "requests", "errors", "TTFT mean s",
                "TTFT p99 s", "req/s", "mean vs base", "p99 vs base", "req/s vs base",
                "route ms (Ray)", "token router us", "token router CPU us", "prefix cache hits"]


def live(args) -> str:
    import ray
    from ray import serve

    check_pairs(args.pairs, args.models)
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        rows, notes = [], []
        for kind in args.models:
            r, n = live_model(args, kind)
            rows += r
            notes += [f"{kind}: {x}" for x in n]
    finally:
        serve.shutdown()
        ray.shutdown()
    return (f"**Live: Ray Serve LLM, {args.replicas} replicas per configuration** "
            f"({args.requests} requests a run at most, {args.max_seconds:.0f} s of arrivals at "
            f"most, {args.repeats} repeats alternating, medians; loads are fractions of the "
            f"measured capacity; ratios against the pair's first configuration)\n\n"
            + table(rows, LIVE_COLUMNS) + "\n" + "".join(f"- {n}\n" for n in notes))


# ---- the router alone ----------------------------------------------------------------------

ROUTE_PASSES = 5  # each row's requests in passes, the median pass reported: a collection of the
# process's whole heap (this one imports Ray and vLLM) lands in one pass, not in every row

# requests a row routed one by one after a walk over COLD_BYTES, as a router finds its caches
# after the engines' steps between two requests at a few a second
COLD_REQUESTS = 200
COLD_BYTES = 64 << 20
ROUTE_COLUMNS = ["replicas", "routers", "prefix affinity", "prompt", "CPU us / request",
                 "wall us / request", "CPU us / request, caches cold", "prefix feed us / request"]
INDEX_REPLICAS = 64  # replicas a full prefix index's blocks were sent to
INDEX_OWNERS = PrefixIndex().owners  # replicas a block was sent to: the router's most
INDEX_CHAIN = 16  # blocks a prompt (1024 tokens in blocks of 64)
INDEX_COLUMNS = ["blocks", "MiB", "bytes / block", "insert us / new prompt",
                 "insert us / known prompt", "the same, an owner forgotten", "forget ms",
                 "walk over every block ms"]


async def _no_queue(deadline_s: float) -> int:
    """A stand-in replica's queue length, for Ray's probe of every new replica (the token
    router reads the load channel instead)."""
    return 0


class StandaloneRouter:
    """The token router without a cluster, for the route bench and the router's tests: Ray
    Serve's router base class and request types, stand-in replicas with the attributes a router
    reads (Ray's RunningReplica looks its actor up), each publishing its load over the real load
    channel and, with `prefix_feeds`, the prefixes it receives (``feeds``: a
    ``PrefixPublisher`` each). Build it inside the event loop that routes, as Ray builds
    routers."""

    def __init__(self, names, app: str = "bench", max_ongoing: int = 64,
                 prefix_feeds: bool = False, **router_kwargs) -> None:
        from types import SimpleNamespace

        from vllm_prepack.load_channel import (
            METADATA_KEY,
            PREFIX_HASHING_KEY,
            PREFIX_METADATA_KEY,
            LoadPublisher,
            PrefixPublisher,
            free_port,
        )
        from vllm_prepack.token_router import TokenRouter

        deployment = internal.DeploymentID(name="PrepackLLMServer:m", app_name=app)
        self.router = TokenRouter(deployment_id=deployment,
                                  handle_source=internal.DeploymentHandleSource.REPLICA)
        self.router.initialize_state(**router_kwargs)
        self.replicas, self.publishers, self.feeds = {}, {}, {}
        for name in names:
            endpoint = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
            self.publishers[name] = LoadPublisher(endpoint)
            metadata = {METADATA_KEY: endpoint}
            if prefix_feeds:
                feed = self.feeds[name] = PrefixPublisher("127.0.0.1")
                metadata[PREFIX_METADATA_KEY] = feed.endpoint
                metadata[PREFIX_HASHING_KEY] = self.router._prefix.settings
            self.replicas[name] = SimpleNamespace(
                replica_id=internal.ReplicaID(unique_id=str(name), deployment_id=deployment),
                replica_metadata=metadata, node_id=None, availability_zone=None,
                multiplexed_model_ids=set(), max_ongoing_requests=max_ongoing,
                get_queue_len=_no_queue)

    @staticmethod
    def request(request_id: str, prompt):
        """A pending OpenAI completion request of `prompt` (text or token ids)."""
        from types import SimpleNamespace

        return internal.PendingRequest(
            args=[SimpleNamespace(model="m", prompt=prompt), None], kwargs={},
            metadata=internal.RequestMetadata(request_id=request_id,
                                              internal_request_id=request_id))

    def close(self) -> None:
        for publisher in (*self.publishers.values(), *self.feeds.values()):
            publisher.close()
        self.router.close()


def route_cost(sizes: list[int], requests: int = 3000, cold_requests: int = COLD_REQUESTS) -> str:
    """The token router's own cost per request, alone in this process (``StandaloneRouter``):
    replicas that report different loads, OpenAI completion bodies of text or token ids."""
    from vllm_prepack.routing import LoadReport, decode_chain, encode_chain
    from vllm_prepack.token_router import replica_key

    import numpy as np

    total = requests + cold_requests
    shared = shared_prefix_workload("", total, seed=0, start=0, block=total).prompts
    walk = np.ones(COLD_BYTES // 8)
    per_pass = requests // ROUTE_PASSES
    if per_pass < 1:
        raise ValueError(f"the route bench needs at least {ROUTE_PASSES} requests a row")
    # name: (request i's prompt, the router's characters a token)
    prompts = {"text, 800 chars": (lambda i: f"{i} {'lorem ipsum ' * 67}", 4.0),
               "text, 6000 chars": (lambda i: f"{i} {'lorem ipsum ' * 500}", 4.0),
               "1500 token ids": (lambda i: list(range(1500)), 4.0),
               "live shared prefixes": (shared.__getitem__, 1.0)}

    async def one(n: int, routers: int, block: int, prompt, chars_per_token: float
                  ) -> tuple[float, float, float, float | None]:
        served = StandaloneRouter(range(n), chars_per_token=chars_per_token, prefix_block=block,
                                  place=(0, routers), prefix_feeds=block > 0)
        router, replicas = served.router, list(served.replicas.values())
        router.update_replicas(replicas)
        for i, publisher in enumerate(served.publishers.values()):
            publisher.publish(LoadReport(1, time.time(), 100 * i, 0, i % 7, 2048, 0.0, i, 0))
        deadline = time.time() + 30
        while len(router._table._views) < n and time.time() < deadline:
            await asyncio.sleep(0.01)
        pending = [served.request(str(i), prompt(i)) for i in range(per_pass * ROUTE_PASSES)]
        cpus, walls = [], []
        for start in range(0, len(pending), per_pass):
            cpu, wall = time.thread_time(), time.perf_counter()
            for p in pending[start:start + per_pass]:
                ranks = await router.choose_replicas(replicas, p)
                router.on_request_completed(ranks[0][0].replica_id,
                                            p.metadata.internal_request_id)
            cpus.append(time.thread_time() - cpu)
            walls.append(time.perf_counter() - wall)
        cpu, wall = statistics.median(cpus), statistics.median(walls)
        colds = []
        for i in range(len(pending), len(pending) + cold_requests):
            p = served.request(str(i), prompt(i))
            walk.sum()
            started = time.thread_time()
            ranks = await router.choose_replicas(replicas, p)
            router.on_request_completed(ranks[0][0].replica_id, p.metadata.internal_request_id)
            colds.append(time.thread_time() - started)
        feed = None
        if block:  # the feed's thread per request a replica received: decode, insert (into an
            # index that has not met these prompts, as for the other routers' sends)
            messages = [(replica_key(replicas[i % n].replica_id),
                         encode_chain(router._prefix.chain(p.args[0])))
                        for i, p in enumerate(pending)]
            router._prefix = PrefixIndex(block, chars_per_token)
            feed = time.perf_counter()
            for key, data in messages:
                router._on_prefix(key, decode_chain(data), 0.0)
            feed = 1e6 * (time.perf_counter() - feed) / len(messages)
            if not router._prefix._blocks:  # a feed under keys the router does not know
                raise RuntimeError("the prefix feed inserted nothing: its replica keys are not "
                                   "the router's")
        served.close()
        return 1e6 * cpu / per_pass, 1e6 * wall / per_pass, 1e6 * statistics.median(colds), feed

    rows = []
    for n in sizes:
        for routers in (1, 8) if n >= 8 else (1,):
            for block in (0, 64):
                for name, (prompt, chars_per_token) in prompts.items():
                    cpu, wall, cold, feed = asyncio.run(one(n, routers, block, prompt,
                                                            chars_per_token))
                    rows.append({"replicas": n, "routers": routers,
                                 "prefix affinity": "on" if block else "off", "prompt": name,
                                 "CPU us / request": cpu, "wall us / request": wall,
                                 "CPU us / request, caches cold": cold})
                    if feed is not None:
                        rows[-1]["prefix feed us / request"] = feed
    return (f"**The token router alone** (this process, no cluster: Ray Serve's router base "
            f"class and request types, every replica reporting over the load channel; "
            f"`choose_replicas` then `on_request_completed`, {requests} requests a row in "
            f"{ROUTE_PASSES} passes, the median pass's time per request; 'caches cold': "
            f"the median of {cold_requests} more requests, each routed after a walk over "
            f"{COLD_BYTES >> 20} MiB, as the router finds its caches after the engines' steps "
            f"between requests at a few a second; with 8 "
            f"routers, router 0's share of the replicas and the overflow check over all; "
            f"each text prompt differs from the others in its first characters: the cost of "
            f"hashing and looking up prefixes, not of a hit; the token ids are the same in "
            f"every request: a hit on every block; the live shared prefixes are the "
            f"prompts of `--models prefix` (1100 characters on average, one a token, "
            f"{PREFIX_GROUPS} prefixes of {PREFIX_CHARS}: 16-18 blocks of 64, 16 of them hits "
            f"once met); with prefix affinity, 'prefix "
            f"feed' is the router's other thread: each request's prefix as the replica that "
            f"got it publishes it, decoded and inserted into an index that has not met it (as "
            f"the other routers' sends are), wall time in this process alone, over all the "
            f"row's requests in one pass)\n\n"
            + table(rows, ROUTE_COLUMNS))


def index_cost(sizes: list[int], inserts: int = 5000) -> str:
    """The prefix index's memory and its costs at the sizes it may take: filled with prompts of
    INDEX_CHAIN new blocks, each sent to INDEX_OWNERS of INDEX_REPLICAS replicas in turn (every
    block's owners full), its memory as Python allocates it (tracemalloc, over the fill alone);
    then `inserts` new prompts, each dropping as many old blocks; then the most recent of them
    (as many as half the index holds) sent to INDEX_OWNERS - 1 more replicas (owners full
    again) and to one more (each block drops its oldest owner), before and after one of their
    owners is forgotten (then it drops that one first); then a replica forgotten, and a walk
    taking another out of every block, as forgetting did before."""
    import tracemalloc

    rng = random.Random(0)
    names = [f"replica-{i:02d}-{rng.getrandbits(64):016x}" for i in range(INDEX_REPLICAS)]
    firsts = INDEX_REPLICAS - INDEX_OWNERS  # the new prompts' first owners; the rest after
    others, fifth = names[firsts:-1], names[-1]

    def chain() -> list[int]:
        return [rng.getrandbits(63) for _ in range(INDEX_CHAIN)]

    def timed(work) -> float:
        started = time.perf_counter()
        for args in work:
            index.insert(*args)
        return 1e6 * (time.perf_counter() - started) / len(work)

    rows = []
    for size in sizes:
        index = PrefixIndex(64, capacity=size, owners=INDEX_OWNERS)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(-(-size // INDEX_CHAIN)):
            hashes = chain()
            for j in range(INDEX_OWNERS):
                index.insert(hashes, names[(i + j) % INDEX_REPLICAS])
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        new = [chain() for _ in range(inserts)]
        fresh = timed([(hashes, names[i % firsts]) for i, hashes in enumerate(new)])
        recent = new[-min(inserts, size // (2 * INDEX_CHAIN)):]  # all still in the index
        for hashes in recent:
            for name in others:
                index.insert(hashes, name)
        half = len(recent) // 2
        known = timed([(hashes, fifth) for hashes in recent[:half]])
        index.forget(others[0])
        after = timed([(hashes, fifth) for hashes in recent[half:]])
        blocks = index._blocks
        full = sum(len(blocks.get(h, ())) == INDEX_OWNERS for c in recent for h in c)
        if full != len(recent) * INDEX_CHAIN:
            raise RuntimeError(f"the timed prompts' blocks were not all full: {full}")
        started = time.perf_counter()
        index.forget(names[0])
        forget = time.perf_counter() - started
        gone, started = names[1], time.perf_counter()
        for h, owners in list(blocks.items()):  # what forgetting did before: every block
            if gone in owners:
                blocks[h] = tuple(o for o in owners if o != gone)
        walk = time.perf_counter() - started
        rows.append({"blocks": len(blocks), "MiB": held / 2**20, "bytes / block": held / size,
                     "insert us / new prompt": fresh, "insert us / known prompt": known,
                     "the same, an owner forgotten": after, "forget ms": 1e3 * forget,
                     "walk over every block ms": 1e3 * walk})
    return (f"**The prefix index** (`routing.PrefixIndex`, alone: filled with prompts of "
            f"{INDEX_CHAIN} new blocks, each sent to {INDEX_OWNERS} of {INDEX_REPLICAS} "
            f"replicas (every block's owners full), its memory as Python allocates it over the "
            f"fill (tracemalloc); then {inserts} new prompts into the full index, each dropping "
            f"as many old blocks; then the most recent of those (as many as half the index "
            f"holds), owners full again, sent to one more replica, before and after one of "
            f"their owners is forgotten; then a replica forgotten, and a walk taking another "
            f"out of every block, as forgetting did before)\n\n"
            + table(rows, INDEX_COLUMNS))


# ---- the simulation ------------------------------------------------------------------------

SIM_COLUMNS = ["cost", "workload", "replicas", "routers", "load", "router", "TTFT mean ms",
               "TTFT p99 ms", "mean vs oracle", "p99 vs oracle", "prompt tokens computed vs oracle",
               "route us"]


def sim(args) -> str:
    from vllm_prepack.models import TINY, decoder_model

    costs = [cost for cost in (Cost("cpu", 0.0, args.cpu_token_us * 1e-6, 512),
                               Cost("gpu", args.gpu_step_ms * 1e-3, args.gpu_token_us * 1e-6, 2048))
             if cost.name in args.sim_costs]
    routers_at = {n: args.sim_routers for n in args.sim_sizes if n >= args.sim_routers_from}
    policies = (*args.sim_policies, *(f"tokens@{share:g}" for share in args.sim_overflow_shares))
    rows = sim_table(str(decoder_model(TINY)), args.sim_sizes, args.sim_loads, costs,
                     args.sim_per_replica, routers_at, seed=0, policies=policies,
                     workloads=tuple(args.sim_workloads))
    return (f"**Simulation: routers at {', '.join(map(str, args.sim_sizes))} replicas** "
            f"(vLLM's scheduler with the plugin in each replica, plain vLLM's in the "
            f"plain+requests row, no model; a step of T tokens "
            f"costs a + b x T: cpu a = 0, b = {args.cpu_token_us} us; gpu a = "
            f"{args.gpu_step_ms} ms, b = {args.gpu_token_us} us; {args.sim_per_replica} requests "
            f"per replica, Poisson, loads as fractions of full-step capacity; ratios against the "
            f"oracle on the same requests and arrivals)\n\n" + table(rows, SIM_COLUMNS))


def config_pair(value: str) -> tuple[str, str]:
    """'base:other', two of CONFIGS."""
    pair = tuple(value.split(":"))
    if len(pair) != 2 or not set(pair) <= set(CONFIGS) or pair[0] == pair[1]:
        raise argparse.ArgumentTypeError(f"a pair is two different configurations "
                                         f"'base:other' of {', '.join(CONFIGS)}, got {value!r}")
    return pair


def check_pairs(pairs, models) -> None:
    """`--pairs` runs on every model of `--models`: each pair once, and Ray's prefix router,
    which cannot route ``/v1/embeddings``, not on the embedding model."""
    if not pairs:
        return
    if len(set(pairs)) < len(pairs):
        raise ValueError(f"--pairs names a pair twice: {[':'.join(p) for p in pairs]}")
    if "embed" in models and any(CONFIGS[c][1] == "prefix" for pair in pairs for c in pair):
        raise ValueError("Ray Serve LLM's prefix router cannot route /v1/embeddings: run the "
                         "pairs with a +prefix configuration without --models embed")


def add_arguments(parser) -> None:
    parser.add_argument("--parts", nargs="+", default=["live", "route", "sim"],
                        choices=["live", "route", "sim"],
                        help="live: Ray Serve apps on real engines; route: the routers' own "
                             "cost; sim: simulated replicas at scale")
    parser.add_argument("--route-sizes", type=at_least_one, nargs="+", default=[2, 8, 64],
                        help="replicas behind the router in the 'route' part")
    parser.add_argument("--models", nargs="+", default=["embed", "generate"],
                        choices=["embed", "generate", "prefix"],
                        help="prefix: the generation model on prompts that share prefixes")
    parser.add_argument("--pairs", nargs="+", type=config_pair, default=None,
                        help="pairs of configurations to run on every model of --models, "
                             f"each 'base:other' (of {', '.join(CONFIGS)}); default: each "
                             "model's own")
    parser.add_argument("--replicas", type=at_least_one, default=2,
                        help="engines per app in the 'live' part")
    parser.add_argument("--loads", type=positive, nargs="+", default=[0.7, 1.0],
                        help="offered loads of the 'live' part, x the measured capacity")
    parser.add_argument("--repeats", type=at_least_one, default=3,
                        help="runs of each 'live' row")
    parser.add_argument("--requests", type=at_least_one, default=120,
                        help="requests per run, at most")
    parser.add_argument("--max-seconds", type=positive, default=40.0,
                        help="seconds of arrivals per run, at most")
    parser.add_argument("--capacity-requests", type=at_least_one, default=96,
                        help="the backlog whose throughput sets the 'live' part's capacity")
    # a run of 64 replicas costs about 4 ms of this process per request and router: these
    # defaults take some 15 minutes on one core
    parser.add_argument("--sim-sizes", type=at_least_one, nargs="+", default=[8, 32, 64],
                        help="replicas simulated")
    parser.add_argument("--sim-loads", type=positive, nargs="+", default=[0.8],
                        help="offered loads of the simulation, x its replicas' capacity")
    parser.add_argument("--sim-per-replica", type=at_least_one, default=25,
                        help="requests per replica simulated")
    parser.add_argument("--sim-routers", type=at_least_one, default=8,
                        help="also run with this many routers at --sim-routers-from replicas "
                             "and more")
    parser.add_argument("--sim-routers-from", type=at_least_one, default=32,
                        help="the fewest replicas run with --sim-routers routers")
    parser.add_argument("--sim-overflow-shares", type=non_negative, nargs="*", default=[],
                        help="also the token router with these overflow shares of a step "
                             "(rows tokens@<share>; the default share is the 'tokens' row)")
    parser.add_argument("--sim-workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                        help="chat: multi-turn conversations (serve_sim.chat_workload)")
    parser.add_argument("--sim-costs", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"],
                        help="the step-cost models to simulate (--cpu-token-us, --gpu-*)")
    parser.add_argument("--sim-policies", nargs="+", default=list(ROUTERS),
                        choices=(*ROUTERS, *EXTRA_ROUTERS),
                        help="routers to simulate (the oracle always runs: the ratios' baseline)")
    parser.add_argument("--cpu-token-us", type=positive, default=50.0,
                        help="the simulated CPU step's cost of a token (its fixed cost 0)")
    parser.add_argument("--gpu-step-ms", type=non_negative, default=3.0,
                        help="the simulated GPU step's fixed cost")
    parser.add_argument("--gpu-token-us", type=positive, default=8.5,
                        help="the simulated GPU step's cost of a token")


def main(args) -> str:
    parts = [header("bench serve: Ray Serve, routers and the plugin")]
    if "live" in args.parts:
        parts.append(live(args))
    if "route" in args.parts:
        parts.append(route_cost(args.route_sizes))
        parts.append(index_cost([MIN_PREFIX_BLOCKS, MAX_PREFIX_BLOCKS]))
    if "sim" in args.parts:
        parts.append(sim(args))
    return "\n".join(parts)
