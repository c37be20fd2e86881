"""A Ray Serve LLM replica with the load channel: ``PrepackLLMServer``, and the callback that
skips Ray Serve LLM's download tasks for a local model folder.

Imported by Ray Serve in every replica process (``LLMConfig.server_cls`` names it).
"""

from __future__ import annotations

import math
import os

import ray
from ray.serve.llm import LLMConfig, LLMServer

from vllm_prepack import touchpoints as touch
from vllm_prepack.config import CONFIG_KEY, is_plugin_scheduler
from vllm_prepack.load_channel import (
    METADATA_KEY,
    PREFIX_HASHING_KEY,
    PREFIX_METADATA_KEY,
    PrefixPublisher,
    free_port,
)
from vllm_prepack.routing import PrefixIndex

CPU_SLICES_ENV = "VLLM_PREPACK_CPU_SLICES"  # replicas that share this node's cores (CPU only)
# "block:chars_per_token" of the token router's prefix affinity: the replica publishes the
# prefix hashes of the prompts it receives, hashed as the routers hash them
PREFIX_FEED_ENV = "VLLM_PREPACK_PREFIX_FEED"
LOCAL_MODEL_CALLBACK = "vllm_prepack.serve_replica.LocalModelCallback"


class PrepackLLMServer(LLMServer):
    """Ray Serve LLM's server, plus: before its engine starts, a replica with the plugin picks a
    port for its scheduler to publish its load on and advertises it in its replica metadata
    (read by the token router); with ``VLLM_PREPACK_PREFIX_FEED`` set (the token router's
    prefix affinity), it publishes the prefix hashes of every completion and chat prompt it
    receives, so that every router knows what the others sent here (as it arrives: one vLLM
    then rejects is counted too; not under Ray Serve LLM's direct streaming, which passes
    these methods by); on CPU, with ``VLLM_PREPACK_CPU_SLICES`` set, its engine's threads are
    bound to its share of the node's cores (vLLM's default binds every replica to the same
    cores)."""

    async def __init__(self, llm_config: LLMConfig, **kwargs):
        self._load_endpoint = None
        self._prefixes: tuple[PrefixIndex, PrefixPublisher] | None = None
        kwargs_now = llm_config.engine_kwargs
        if has_plugin(kwargs_now):
            host = ray.util.get_node_ip_address()
            port = free_port(host)
            extra = dict(kwargs_now.get("additional_config") or {})
            extra[CONFIG_KEY] = {**extra.get(CONFIG_KEY, {}), "load_endpoint": f"tcp://{host}:{port}"}
            llm_config.update_engine_kwargs(additional_config=extra)
            self._load_endpoint = f"tcp://{host}:{port}"
            feed = prefix_feed(os.environ.get(PREFIX_FEED_ENV, ""))
            if feed is not None and not touch.serve_llm_direct_streaming():
                self._prefixes = (PrefixIndex(*feed), PrefixPublisher(host))
        slices = int(os.environ.get(CPU_SLICES_ENV, "0"))
        if slices and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core_slice(
                touch.replica_local_rank(), slices, os.cpu_count() or 1)
        await super().__init__(llm_config, **kwargs)

    def _advertised(self) -> dict:
        out = {METADATA_KEY: self._load_endpoint} if self._load_endpoint else {}
        if self._prefixes is not None:
            index, publisher = self._prefixes
            out.update({PREFIX_METADATA_KEY: publisher.endpoint,
                        PREFIX_HASHING_KEY: index.settings})
        return out

    def _publish_prefix(self, request) -> None:
        if self._prefixes is not None:
            index, publisher = self._prefixes
            publisher.publish(index.chain(request))

    async def chat(self, request, raw_request_info=None):
        self._publish_prefix(request)
        return await super().chat(request, raw_request_info)

    async def completions(self, request, raw_request_info=None):
        self._publish_prefix(request)
        return await super().completions(request, raw_request_info)

    async def record_replica_metadata(self) -> dict:
        """Ray Serve publishes this to routers once the replica is up."""
        return self._advertised()

    async def record_routing_stats(self) -> dict:
        """Ray Serve LLM's routing stats, plus the load endpoint (what a replica's actor answers
        when asked directly: ``touchpoints.llm_replicas``)."""
        return {**await super().record_routing_stats(), **self._advertised()}


def prefix_feed(value: str) -> tuple[int, float] | None:
    """``VLLM_PREPACK_PREFIX_FEED``'s (block, chars_per_token); None where unset."""
    if not value:
        return None
    try:
        block, chars = value.split(":")
        feed = int(block), float(chars)
    except ValueError:
        feed = None
    if feed is None or feed[0] < 1 or not 0 < feed[1] < math.inf:
        raise ValueError(f"{PREFIX_FEED_ENV} must be 'block:chars_per_token' (a block of at "
                         f"least 1 token, a positive ratio), got {value!r}")
    return feed


def has_plugin(engine_kwargs: dict) -> bool:
    """The engine runs the plugin's scheduler (by path, or the class itself)."""
    cls = engine_kwargs.get("scheduler_cls")
    return cls is not None and is_plugin_scheduler(cls)


def core_slice(rank: int, slices: int, cores: int) -> str:
    """The cores (vLLM's VLLM_CPU_OMP_THREADS_BIND syntax) of the `rank`-th of `slices` replicas
    sharing `cores`; replicas beyond the cores share them round robin."""
    per = max(1, cores // slices)
    first = (rank * per) % cores
    last = min(first + per, cores) - 1
    return str(first) if first == last else f"{first}-{last}"


class LocalModelCallback(touch.internal.CallbackBase):
    """Skips Ray Serve LLM's model download tasks for a model that is a folder already: each is
    a fresh Ray worker process per replica (importing Ray Serve LLM and vLLM) that finds nothing
    to download; ``CallbackCtx.run_init_node = False`` is Ray's documented switch (the base
    class is not public: touchpoints.py). On a cluster of several nodes the folder must be on
    every node (shared storage), as vLLM needs it there anyway."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and os.path.isdir(source):
            self.ctx.run_init_node = False
