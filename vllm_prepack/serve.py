"""Serving on Ray: Ray Serve LLM with the plugin in every replica, routed by tokens.

``vllm-prepack serve`` and its Python builder (``prepack_llm_config`` + Ray Serve LLM's own
``build_openai_app``) run Ray Serve LLM as it is: its OpenAI ingress (``/v1/completions``,
``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/models``), its vLLM server per replica, its
proxy (``/-/healthz``). This project adds three things: the plugin in every engine, the token
router (``token_router.py``), and ``PrepackLLMServer`` (``serve_replica.py``), which gives each
replica's scheduler an address to publish its load on and, on CPU, its own cores. Ray is
imported only when a command runs, so the CLI stays light.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

from vllm_prepack.argtypes import (
    at_least_one,
    at_least_zero,
    json_object,
    port_number,
    prepack_options,
)
from vllm_prepack.config import load_object, plugin_engine_kwargs
from vllm_prepack.errors import last_exception
from vllm_prepack.replica import connect
from vllm_prepack.routing import PrefixIndex

ROUTERS = {
    "tokens": "vllm_prepack.token_router.TokenRouter",
    "requests": None,  # Ray Serve's default: power of two choices on requests in flight
    "prefix": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
}
SERVER_CLS = "vllm_prepack.serve_replica.PrepackLLMServer"
APP_NAME = "vllm-prepack"
PREFIX_BLOCK_TOKENS = 64  # the token router's prefix-affinity granularity
SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. Prefill packing fills each step of "
               "the engine with whole prompts, shortest first, and a router that counts tokens "
               "sends each request where the least work waits ahead of it. 0123456789, (x+y)^2.")


def chars_per_token(model: str, engine_kwargs: dict) -> float:
    """The model tokenizer's characters per token on a sample of English text and code: the
    router's estimate for text prompts until replicas report the real counts. 4.0 (a typical
    BPE) when there is no tokenizer to ask."""
    if engine_kwargs.get("skip_tokenizer_init"):
        return 4.0
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(engine_kwargs.get("tokenizer") or model)
        return len(SAMPLE_TEXT) / max(1, len(tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)))
    except (OSError, ValueError):
        return 4.0


def prepack_llm_config(model: str, *, model_id: str | None = None, replicas: int = 2,
                       engine_kwargs: dict | None = None, prepack: dict | bool = True,
                       router: str = "tokens", router_options: dict | None = None,
                       gpus_per_replica: int = 0, deployment_config: dict | None = None,
                       runtime_env: dict | None = None, **options):
    """A Ray Serve LLM ``LLMConfig`` with the plugin in every replica's engine and the chosen
    router: pass it to ``ray.serve.llm.build_openai_app({"llm_configs": [...]})`` or
    ``build_llm_deployment``, alone or beside other models.

    `prepack`: the plugin's options, True for its defaults, False for plain vLLM. `router`:
    "tokens" (needs the plugin), "requests" (Ray Serve's default) or "prefix" (Ray's
    PrefixCacheAffinityRouter); `router_options` go to it. `gpus_per_replica`: 0 runs on CPU
    (each replica a share of the cores, one logical CPU bundle); 1 or more reserves that many
    GPUs per replica, tensor-parallel above one. Other keyword arguments go to ``LLMConfig``."""
    from ray.serve.llm import LLMConfig

    from vllm_prepack.serve_replica import CPU_SLICES_ENV, LOCAL_MODEL_CALLBACK, PREFIX_FEED_ENV

    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be at least 0, got {gpus_per_replica}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if router_options and ROUTERS[router] is not None:
        _check_router_options(ROUTERS[router], router_options)
    if router == "tokens" and prepack is False:
        raise ValueError("the token router reads the plugin's load reports: it needs the plugin")
    kwargs = plugin_engine_kwargs(engine_kwargs, prepack)
    if gpus_per_replica > 1:
        kwargs.setdefault("tensor_parallel_size", gpus_per_replica)
    deployment = {"num_replicas": replicas, **(deployment_config or {})}
    env = dict((runtime_env or {}).get("env_vars") or {})
    if ROUTERS[router] is not None:
        router_kwargs = dict(router_options or {})
        if router == "tokens":
            router_kwargs.setdefault("chars_per_token", chars_per_token(model, kwargs))
            pooling = kwargs.get("runner") == "pooling"
            if not pooling and kwargs.get("enable_prefix_caching", True):
                router_kwargs.setdefault("prefix_block", PREFIX_BLOCK_TOKENS)
            if router_kwargs.get("prefix_block", 0) > 0:  # the replicas hash as the routers do
                env[PREFIX_FEED_ENV] = PrefixIndex(router_kwargs["prefix_block"],
                                                   router_kwargs["chars_per_token"]).settings
        deployment["request_router_config"] = {
            "request_router_class": ROUTERS[router], "request_router_kwargs": router_kwargs}
    if gpus_per_replica == 0:
        env.setdefault(CPU_SLICES_ENV, str(replicas))
        options.setdefault("placement_group_config", {"bundles": [{"CPU": 1}]})
        if "VLLM_CPU_KVCACHE_SPACE" not in env and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # vLLM's CPU default reserves 92% of the node's memory per engine: share half
            kwargs.setdefault("gpu_memory_utilization", round(0.5 / replicas, 3))
    options.setdefault("callback_config", {"callback_class": LOCAL_MODEL_CALLBACK})
    return LLMConfig(
        model_loading_config={"model_id": model_id or Path(model).name, "model_source": str(model)},
        engine_kwargs=kwargs, deployment_config=deployment, server_cls=SERVER_CLS,
        runtime_env={**(runtime_env or {}), "env_vars": env}, **options)


def _check_router_options(path: str, options: dict) -> None:
    """Raise ValueError naming any option the router's ``initialize_state`` does not take:
    Ray Serve builds the router in the ingress, where a bad one leaves every request waiting
    and says why only in that replica's log."""
    router_cls = load_object(path)
    params = inspect.signature(router_cls.initialize_state).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown:
        known = ", ".join(p for p in params if p != "self")
        raise ValueError(f"router_options {', '.join(map(repr, unknown))} are not options of "
                         f"{router_cls.__name__}; its options: {known}")


def build_app(*configs, ingress_replicas: int | None = None):
    """Ray Serve LLM's OpenAI app over these models. Each OpenAI ingress replica holds a router
    per model, and the routers split the model's replicas among themselves
    (``routing.router_share``). `ingress_replicas`: a fixed number of ingress replicas; None
    keeps Ray Serve LLM's autoscaled ingress."""
    from ray.serve.llm import build_openai_app

    if ingress_replicas is not None and ingress_replicas < 1:
        raise ValueError(f"ingress_replicas must be at least 1, got {ingress_replicas}")
    builder = {"llm_configs": list(configs)}
    if ingress_replicas is not None:
        builder["ingress_deployment_config"] = {"num_replicas": ingress_replicas}
    return build_openai_app(builder)


class AppStartError(RuntimeError):
    """The app did not come up: Ray Serve gave up on a deployment whose replicas kept failing
    to start; the message names it and the error its replicas raised, in one line."""


def start(app, *, port: int = 8000, host: str = "127.0.0.1", address: str | None = None,
          num_cpus: int | None = None, name: str = APP_NAME) -> None:
    """Start (or join, with `address`) a Ray cluster (``connect``) and run `app` on it; returns
    once every replica is up, or raises AppStartError."""
    from ray import serve

    connect(address, num_cpus)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name=name, route_prefix="/", blocking=False)
    except RuntimeError as e:  # "Deploying application ... failed": the cause is per deployment
        status = serve.status().applications.get(name)
        failed = [f"{deployment}: {last_exception(d.message)}"
                  for deployment, d in (status.deployments.items() if status else ())
                  if d.message and d.status.value != "HEALTHY"]
        raise AppStartError("; ".join(failed) or str(e)) from None


def stop(name: str = APP_NAME, *, joined: bool = False) -> None:
    """Take the app down; a cluster this process started goes with it."""
    import ray
    from ray import serve

    if joined:
        serve.delete(name)
    else:
        serve.shutdown()
        ray.shutdown()


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="a model folder or hub name (default: the embedded demo model)")
    parser.add_argument("--model-id", help="the name clients ask for (default: the folder's name)")
    parser.add_argument("--replicas", type=at_least_one, default=2,
                        help="vLLM engines behind the router, each with the plugin")
    parser.add_argument("--port", type=port_number, default=8000, help="the HTTP port")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--engine-args", type=json_object, default={},
                        help='vLLM engine arguments as JSON, e.g. \'{"runner": "pooling"}\'')
    parser.add_argument("--prepack-options", type=prepack_options, default=None,
                        help="the plugin's options as JSON (default: its defaults)")
    parser.add_argument("--plain", action="store_true", help="plain vLLM, without the plugin")
    parser.add_argument("--router", choices=tuple(ROUTERS), default="tokens",
                        help="tokens: by the prompt tokens each replica holds; requests: Ray "
                             "Serve's power of two choices on requests in flight; prefix: Ray "
                             "Serve LLM's PrefixCacheAffinityRouter")
    parser.add_argument("--gpus-per-replica", type=at_least_zero, default=0,
                        help="0: CPU; 1: one GPU each; more: tensor-parallel replicas")
    parser.add_argument("--ingress-replicas", type=at_least_one, default=None,
                        help="a fixed number of HTTP ingress replicas (each one's router "
                             "routes to its own share of the model's replicas); default: Ray "
                             "Serve LLM's autoscaled ingress")
    parser.add_argument("--address", help="join this Ray cluster instead of starting one")


def main(args) -> int:
    from vllm_prepack.batch import check_model

    engine_kwargs = dict(args.engine_args)
    model = args.model
    check_model(model, engine_kwargs)
    prepack = False if args.plain else (args.prepack_options or True)
    config = prepack_llm_config(model, model_id=args.model_id, replicas=args.replicas,
                                engine_kwargs=engine_kwargs, prepack=prepack, router=args.router,
                                gpus_per_replica=args.gpus_per_replica)
    # a local cluster without GPUs gets enough logical CPUs for the placement, whatever the cores
    cpus = None if args.address or args.gpus_per_replica else max(os.cpu_count() or 1,
                                                                   2 * args.replicas + 4)
    print(f"starting {args.replicas} replica(s) of {config.model_id} "
          f"({'plain vLLM' if args.plain else 'vLLM + prepack'}, router: {args.router}) ...",
          flush=True)
    # before build_app: Ray Serve LLM's builder otherwise starts a local Ray with the machine's
    # cores, too few for the placement on a small machine, and the app never starts
    connect(args.address, cpus)
    try:  # Ctrl-C while the replicas start takes the app down too (a joined cluster keeps it)
        start(build_app(config, ingress_replicas=args.ingress_replicas), port=args.port,
              host=args.host)
        base = f"http://{args.host}:{args.port}"
        print(f"serving {config.model_id} at {base}/v1 (health: {base}/-/healthz); Ctrl-C stops\n"
              f"  from openai import OpenAI\n"
              f"  OpenAI(base_url='{base}/v1', api_key='none').completions.create("
              f"model='{config.model_id}', prompt='Hello', max_tokens=16)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        stop(joined=bool(args.address))
    return 0
