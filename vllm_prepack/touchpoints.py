"""The registry of every non-public interface the project touches: vLLM's, transformers' and Ray's.

vLLM's scheduler and model runner are not public interfaces (vLLM 0.33 logs as much when a
``scheduler_cls`` is set), and they change between releases. So every private class, attribute,
overridden or patched method and undeclared attribute the project uses is listed here, with the
releases it was read in and, where releases differ, the one function below that branches. The
rest of the project reaches vLLM internals only through this module: classes through
``internal.<Name>`` (imported lazily, so the packing core and the HF path import without vLLM),
everything else through the functions below. ``tests/test_touchpoints.py`` checks that no other
module imports a non-public vLLM module or sets an attribute on a vLLM object, that every
scheduler attribute ``scheduler.py`` reads is listed, and that every listed import resolves.

Supported vLLM: ``SUPPORTED_VLLM`` (the newest release and the ones before it that the CI matrix
runs). On any other release the plugin refuses to start, in one line naming the range and
``ALLOW_ENV``; with that variable set it warns, runs, and checks its mirror of vLLM's budget
against what vLLM scheduled on every step.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger("vllm_prepack")

SUPPORTED_VLLM = ((0, 31), (0, 32), (0, 33), (0, 34))  # minor releases; patch releases included
TESTED_VLLM = ("0.31.0", "0.32.0", "0.33.0", "0.34.0")
VLLM_RANGE = ">=0.31,<0.35"
ALLOW_ENV = "VLLM_PREPACK_ALLOW_UNTESTED_VLLM"
TESTED_TRANSFORMERS = ("5.17", "5.19")
TESTED_RAY = ("2.60.0",)


class How(str, enum.Enum):
    IMPORT = "imported"  # a class or function the project imports
    SUBCLASS = "subclassed"
    OVERRIDE = "overridden"  # a method of a subclassed class, replaced
    READ = "read"  # an attribute or field read
    CALL = "called"  # a method called
    REPLACE = "replaced"  # an attribute vLLM owns, assigned by the project
    SET = "set"  # an attribute the project adds to a vLLM object
    PATCH = "patched"  # a method wrapped at run time (patches/)


@dataclass(frozen=True)
class TouchPoint:
    what: str  # "module:Name" for imports, "Owner.attr" otherwise
    how: How
    where: str  # the project's modules that use it
    checked: tuple[str, ...] = TESTED_VLLM  # releases whose source was read for it
    differs: str = ""  # how releases differ, and the function here that branches
    alias: str = ""  # ``internal.<alias>`` where two imports share a name

    @property
    def name(self) -> str:
        """Its name under ``internal`` (imports only)."""
        return self.alias or self.what.rsplit(":", 1)[1]

    def read_in(self, version: tuple[int, int]) -> bool:
        """Whether it exists in that release (one of those its source was read in)."""
        return any(parse_version(release) == version for release in self.checked)

    @property
    def owner(self) -> str:
        return self.what.split(".", 1)[0]

    @property
    def attribute(self) -> str:
        return self.what.split(".", 1)[1]


_V = How
_SCHED = "scheduler.py"
_BEFORE_0_34 = TESTED_VLLM[:3]
TOUCH_POINTS: tuple[TouchPoint, ...] = (
    # ---- vLLM classes -----------------------------------------------------------------------
    TouchPoint("vllm.v1.core.sched.scheduler:Scheduler", _V.SUBCLASS, f"{_SCHED}, bench/baselines.py"),
    TouchPoint("vllm.v1.core.sched.async_scheduler:AsyncScheduler", _V.SUBCLASS, _SCHED,
               differs="0.31/0.32 override _update_request_with_output here; 0.33 folds it into "
                       "Scheduler (not touched by the project)"),
    TouchPoint("vllm.v1.core.sched.request_queue:RequestQueue", _V.SUBCLASS,
               f"{_SCHED}, bench/baselines.py"),
    TouchPoint("vllm.v1.core.sched.request_queue:SchedulingPolicy", _V.IMPORT, _SCHED),
    TouchPoint("vllm.v1.core.sched.interface:PauseState", _V.IMPORT, _SCHED),
    TouchPoint("vllm.v1.metrics.stats:SchedulerIterationDetails", _V.IMPORT, _SCHED),
    TouchPoint("vllm.v1.utils:compute_iteration_details", _V.IMPORT, _SCHED),
    TouchPoint("vllm.v1.metrics.loggers:StatLoggerBase", _V.SUBCLASS, "metrics.py"),
    TouchPoint("vllm.v1.worker.gpu_model_runner:GPUModelRunner", _V.PATCH, "patches/runner_layout.py",
               checked=_BEFORE_0_34,
               differs="the V1 runner (CPUs, and GPUs with VLLM_USE_V2_MODEL_RUNNER=0) until "
                       "0.33; removed in 0.34: touchpoints.model_runners"),
    TouchPoint("vllm.v1.worker.gpu.model_runner:GPUModelRunner", _V.PATCH,
               "patches/runner_layout.py", alias="ModelRunnerV2",
               differs="Model Runner V2: GPUs with Triton from 0.31; from 0.34 GPUs and x86 "
                       "CPUs (its CPU runner subclasses it), but not the standalone CPU runner "
                       "of other CPUs without Triton, which the hook does not wrap"),
    TouchPoint("vllm.v1.request:Request", _V.IMPORT, "bench/harness.py (requests without an engine)"),
    TouchPoint("vllm.v1.outputs:ModelRunnerOutput", _V.IMPORT, "bench/harness.py",
               differs="0.34 drops req_id_to_index (outputs follow req_ids): "
                       "touchpoints.runner_output_fields"),
    TouchPoint("vllm.v1.kv_cache_interface:KVCacheConfig", _V.IMPORT, "bench/harness.py"),
    TouchPoint("vllm.v1.kv_cache_interface:KVCacheGroupSpec", _V.IMPORT, "bench/harness.py"),
    TouchPoint("vllm.v1.kv_cache_interface:FullAttentionSpec", _V.IMPORT, "bench/harness.py"),
    TouchPoint("vllm.v1.structured_output:StructuredOutputManager", _V.IMPORT, "bench/harness.py"),
    TouchPoint("vllm.engine.arg_utils:EngineArgs", _V.IMPORT, "bench/harness.py"),
    # ---- the scheduler: methods the project overrides, attributes it reads ------------------
    TouchPoint("Scheduler.__new__", _V.OVERRIDE, _SCHED,
               differs="vLLM picks AsyncScheduler only without a scheduler_cls: the plugin picks"),
    TouchPoint("Scheduler.__init__", _V.OVERRIDE, f"{_SCHED}, bench/baselines.py"),
    TouchPoint("Scheduler.schedule", _V.OVERRIDE, f"{_SCHED}, bench/baselines.py"),
    TouchPoint("Scheduler.make_stats", _V.OVERRIDE, _SCHED),
    TouchPoint("Scheduler.waiting", _V.REPLACE, f"{_SCHED}, bench/baselines.py",
               differs="the waiting loop (and its break with chunked prefill off) is the same "
                       "in 0.31-0.34 for text requests; 0.34 skips, with chunked prefill off, a "
                       "multimodal request whose encoder inputs do not fit, and appends a "
                       "started async KV load to kv_holding_waiting; the plugin refuses 0.34's "
                       "async KV load queue and cache-aware admission at start: "
                       "touchpoints.check_waiting_order"),
    *(TouchPoint(f"Scheduler.{name}", _V.READ, _SCHED) for name in (
        "kv_holding_waiting", "running", "policy", "current_step", "max_num_active_reqs",
        "max_model_len", "num_waiting_for_streaming_input",
        "adaptive_long_prefill_threshold", "num_sampled_tokens_per_step", "_pause_state",
        "prefill_capacity_bound", "kv_cache_manager", "lora_config", "scheduler_config",
        "vllm_config", "cache_config", "log_stats",
    )),
    TouchPoint("Scheduler.get_request_counts", _V.CALL, _SCHED),
    TouchPoint("Scheduler._is_blocked_waiting_status", _V.CALL, f"{_SCHED}, touchpoints.passed_over"),
    TouchPoint("Scheduler._handle_blocked_waiting_request", _V.CALL, "touchpoints.passed_over",
               differs="0.33 keeps a failed grammar's error (a dict of RequestError), 0.31/0.32 "
                       "its id (a set), each ended at the next update; 0.34 also reserves a "
                       "finished remote KV load's blocks, a request of kv_holding_waiting, never "
                       "of the plugin's queue"),
    TouchPoint("Scheduler.local_prefill_interval", _V.READ, "touchpoints.prefills_deferred",
               checked=("0.33.0", "0.34.0"),
               differs="0.33 holds prefills back locally every prefill_schedule_interval steps "
                       "without data parallelism (also num_executed_steps, last_prefill_step); "
                       "0.31/0.32 only under DP throttling"),
    TouchPoint("Scheduler.lora_config.max_loras", _V.READ, _SCHED,
               differs="0.33 counts the adapters of every running request against max_loras, "
                       "0.31/0.32 those of the running requests scheduled this step: "
                       "touchpoints.active_adapters"),
    # ---- requests, outputs, stats ------------------------------------------------------------
    *(TouchPoint(f"Request.{name}", _V.READ, f"{_SCHED}, bench/baselines.py") for name in (
        "request_id", "num_tokens", "num_computed_tokens", "priority", "arrival_time",
        "lora_request", "num_output_placeholders", "num_tokens_with_spec", "num_prompt_tokens",
        "max_tokens", "next_decode_eligible_step", "is_prefill_chunk", "status", "block_hashes",
    )),
    TouchPoint("KVCacheManager.prefix_cache_lookup_enabled", _V.CALL, "touchpoints.cached_prefix_tokens",
               differs="0.34: prefix_cache_hit_limit != 0, before: not skip_reading_prefix_cache"),
    TouchPoint("KVCacheManager.coordinator.find_longest_cache_hit", _V.CALL,
               "touchpoints.cached_prefix_tokens",
               differs="0.33 adds an optional max_cache_hit_length to get_computed_blocks; 0.34 "
                       "bounds a hit by Request.get_max_cache_hit_length (the prompt-logprobs "
                       "start), where before it was num_tokens - 1"),
    TouchPoint("Request.get_max_cache_hit_length", _V.CALL, "touchpoints.cached_prefix_tokens",
               checked=("0.34.0",)),
    TouchPoint("SchedulerConfig.max_num_inflight_kv_loads", _V.READ,
               "touchpoints.check_waiting_order", checked=("0.34.0",),
               differs="with a KV connector, 0.34 keeps async loads in async_kv_waiting"),
    TouchPoint("Scheduler.connector", _V.READ, "touchpoints.check_waiting_order"),
    TouchPoint("Scheduler.cache_aware_window", _V.READ, "touchpoints.check_waiting_order",
               checked=("0.34.0",),
               differs="0.34's cache_aware_admission_window reorders the head of waiting; the "
                       "plugin refuses it (it orders waiting itself)"),
    *(TouchPoint(f"SchedulerOutput.{name}", _V.READ, f"{_SCHED}, patches/runner_layout.py")
      for name in ("num_scheduled_tokens", "total_num_scheduled_tokens", "preempted_req_ids",
                   "scheduled_new_reqs", "scheduled_cached_reqs")),
    TouchPoint("CachedRequestData.resumed_req_ids", _V.READ,
               "touchpoints.scheduled_plan_inputs / admitted_req_ids",
               checked=_BEFORE_0_34,
               differs="0.34 sends a resumed request whole among scheduled_new_reqs"),
    TouchPoint("SchedulerConfig.long_prefill_token_threshold", _V.READ,
               "touchpoints.long_prefill_threshold",
               differs="0.34 applies it only with chunked prefill"),
    TouchPoint("SchedulerOutput.prepack_plan", _V.SET, "touchpoints.attach_plan / plan_of",
               differs="0.33 adds fields (encoder_input_updates, skip_drafts); the plan rides as "
                       "an undeclared attribute, pickled with the output to the workers"),
    TouchPoint("SchedulerStats.iteration_details", _V.REPLACE, _SCHED),
    TouchPoint("IterationStats.time_to_first_tokens_iter", _V.READ, "metrics.py"),
    TouchPoint("IterationStats.finished_requests", _V.READ, "metrics.py"),
    TouchPoint("SpeculativeConfig.max_num_new_slots_for_drafting", _V.READ, _SCHED),
    TouchPoint("LLM.llm_engine.engine_core.engine_core.scheduler", _V.READ,
               "touchpoints.engine_scheduler (in-process engines: tests, benchmarks, replicas)"),
    # ---- the model runner (patches/runner_layout.py) -----------------------------------------
    TouchPoint("GPUModelRunner.execute_model", _V.PATCH, "patches/runner_layout.py",
               checked=_BEFORE_0_34),
    TouchPoint("GPUModelRunner._build_attention_metadata", _V.PATCH, "patches/runner_layout.py",
               checked=_BEFORE_0_34,
               differs="0.33 adds keyword parameters after num_tokens_padded (passed through)"),
    *(TouchPoint(f"GPUModelRunner.{name}", _V.READ, "touchpoints.runner_layout_inputs",
                 checked=_BEFORE_0_34)
      for name in ("vllm_config", "query_start_loc", "positions", "input_batch")),
    TouchPoint("ModelRunnerV2.prepare_inputs", _V.PATCH, "patches/runner_layout.py"),
    *(TouchPoint(f"InputBatch.{name}", _V.READ, "touchpoints.v2_layout_inputs (Model Runner V2)")
      for name in ("req_ids", "num_reqs", "query_start_loc_np", "positions", "idx_mapping",
                   "idx_mapping_np", "num_draft_tokens", "num_tokens",
                   "num_tokens_after_padding")),
    *(TouchPoint(f"ModelRunnerV2.req_states.{name}", _V.READ, "touchpoints.v2_layout_inputs")
      for name in ("num_computed_tokens.gpu", "prompt_len.np")),
    TouchPoint("ModelRunnerV2.pcp_manager", _V.READ, "touchpoints.v2_layout_whole"),
    TouchPoint("ModelRunnerV2.execute_model", _V.PATCH, "patches/runner_layout.py",
               differs="takes dummy_run (profiling, graph capture): passed through"),
    TouchPoint("ModelRunnerV2.vllm_config", _V.READ, "touchpoints.runner_recorder"),
    *(TouchPoint(f"ModelRunnerV2.{name}", _V.SET, "touchpoints.runner_recorder / runner_output, "
                 "patches/runner_layout.py")
      for name in ("_prepack_patched", "_prepack_recorder", "_prepack_output")),
    TouchPoint("vllm.v1.worker.gpu.input_batch:InputBatch", _V.IMPORT,
               "tests/test_layout.py (a real InputBatch read without an engine)"),
    TouchPoint("vllm.v1.core.sched.output:SchedulerOutput", _V.IMPORT,
               "tests/test_layout.py (the V2 wrappers checked against a real output)"),
    TouchPoint("GPUModelRunner._prepack_patched", _V.SET, "patches/runner_layout.py",
               checked=_BEFORE_0_34),
    TouchPoint("GPUModelRunner._prepack_recorder", _V.SET, "touchpoints.runner_recorder",
               checked=_BEFORE_0_34),
    TouchPoint("GPUModelRunner._prepack_output", _V.SET, "touchpoints.runner_output",
               checked=_BEFORE_0_34),
    # ---- transformers (hf.py) ----------------------------------------------------------------
    *(TouchPoint(what, _V.IMPORT, "hf.py", checked=TESTED_TRANSFORMERS) for what in (
        "transformers.cache_utils:DynamicLayer", "transformers.cache_utils:DynamicSlidingWindowLayer",
        "transformers.masking_utils:AttentionMaskInterface", "transformers.masking_utils:sdpa_mask",
        "transformers.integrations.sdpa_attention:sdpa_attention_forward",
    )),
    TouchPoint("DynamicLayer.lazy_initialization", _V.CALL, "hf.py", checked=TESTED_TRANSFORMERS),
    TouchPoint("DynamicCache.layers", _V.REPLACE, "hf.py", checked=TESTED_TRANSFORMERS),
    TouchPoint("PretrainedConfig._attn_implementation", _V.READ, "hf.py", checked=TESTED_TRANSFORMERS),
    # ---- the step-cost model ------------------------------------------------------------------
    TouchPoint("Scheduler.update_from_output", _V.OVERRIDE, _SCHED),
    TouchPoint("Scheduler.has_unfinished_requests", _V.CALL, _SCHED,
               differs="the step clock runs while it holds; all of 0.31-0.34 leave out streaming "
                       "sessions waiting for input and count 0 under PAUSED_ALL; under "
                       "PAUSED_NEW 0.31 counts running requests only, 0.32-0.34 also waiting "
                       "ones that hold KV blocks"),
    TouchPoint("Scheduler.max_num_scheduled_tokens", _V.REPLACE,
               f"{_SCHED} (read), touchpoints.token_budget_cap (lowered for one schedule())",
               differs="schedule() takes it as the step's token budget and asserts the step "
                       "within it, in 0.31-0.34 (and aligns hybrid models' chunks to it, with "
                       "chunked prefill only, where no probe runs)"),
    TouchPoint("SchedulerOutput.prepack_step_cost", _V.SET, "touchpoints.attach_step_cost / step_cost_of",
               differs="rides like prepack_plan, with record_layout"),
    TouchPoint("SchedulerIterationDetails.elapsed_ms", _V.SET, _SCHED,
               differs="vLLM's own details time the forward alone; the plugin's, the whole step"),
    # ---- KV fit: offer vLLM only requests whose blocks are free -------------------------------
    *(TouchPoint(f"Scheduler.{name}", _V.READ, "touchpoints.kv_block_accounting")
      for name in ("kv_cache_config", "block_size", "num_lookahead_tokens", "requests")),
    TouchPoint("KVCacheConfig.kv_cache_groups", _V.READ, "touchpoints.kv_block_accounting"),
    TouchPoint("vllm.v1.kv_cache_interface:SlidingWindowSpec", _V.IMPORT,
               "touchpoints.kv_block_accounting"),
    TouchPoint("KVCacheManager.block_pool.get_num_free_blocks", _V.CALL, "touchpoints.free_kv_blocks",
               differs="counts evictable prefix-cache blocks as free, as allocate_slots does"),
    TouchPoint("KVCacheManager.watermark_blocks", _V.READ, "touchpoints.free_kv_blocks",
               differs="absent before the watermark: read as 0"),
    TouchPoint("LLM.llm_engine.engine_core.engine_core.model_executor.execute_model", _V.PATCH,
               "touchpoints.delay_model_execution (bench/engines.py only: a GPU's fixed step cost)",
               checked=("0.32.0",)),
    # ---- serving on Ray: the load report, the token router, the replica server ----------------
    TouchPoint("Scheduler.add_request", _V.OVERRIDE, _SCHED,
               differs="counts new request ids for the load report (a streaming session's "
                       "next input comes under its old id), and stops the step clock of an "
                       "idle scheduler; 0.31-0.34 put a new request into waiting, but neither "
                       "rests on it"),
    *(TouchPoint(f"vllm.benchmarks.lib.endpoint_request_func:{name}", _V.IMPORT,
                 "bench/serve.py (vLLM's bench serve client, request by request)")
      for name in ("ASYNC_REQUEST_FUNCS", "RequestFuncInput")),
    TouchPoint("Request.num_output_tokens", _V.READ, "touchpoints.running_load"),
    TouchPoint("KVCacheConfig.num_blocks", _V.READ, "touchpoints.kv_cache_tokens"),
    TouchPoint("ray.llm._internal.common.callbacks.base:CallbackBase", _V.SUBCLASS,
               "serve_replica.LocalModelCallback", checked=TESTED_RAY),
    TouchPoint("CallbackCtx.run_init_node", _V.REPLACE, "serve_replica.LocalModelCallback",
               checked=TESTED_RAY),
    TouchPoint("ray.llm._internal.serve.constants:RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING",
               _V.IMPORT, "touchpoints.serve_llm_direct_streaming (serve_replica.py)",
               checked=TESTED_RAY),
    *(TouchPoint(f"PendingRequest.{name}", _V.READ, "touchpoints.request_body / request_key / "
                 "multiplexed_model_id (token_router.py)", checked=TESTED_RAY)
      for name in ("args", "metadata.internal_request_id", "metadata.multiplexed_model_id")),
    TouchPoint("PendingRequest.routing_context.should_backoff", _V.REPLACE,
               "touchpoints.allow_backoff (token_router.py)", checked=TESTED_RAY),
    TouchPoint("RequestRouter._deployment_id", _V.READ, "touchpoints.deployment_tags",
               checked=TESTED_RAY),
    TouchPoint("ReplicaContext.rank.local_rank", _V.READ, "touchpoints.replica_local_rank",
               checked=TESTED_RAY),
    *(TouchPoint(f"ReplicaContext.{name}", _V.READ, "touchpoints.router_shard",
                 checked=TESTED_RAY)
      for name in ("rank.rank", "world_size", "_deployment_config.autoscaling_config")),
    *(TouchPoint(f"ray.serve._private.{path}", _V.IMPORT,
                 "bench/serve.py (the token router driven without a cluster)", checked=TESTED_RAY)
      for path in ("common:DeploymentID", "common:DeploymentHandleSource", "common:ReplicaID",
                   "common:RequestMetadata", "request_router.common:PendingRequest")),
    TouchPoint("ReplicaActor.record_routing_stats", _V.CALL, "touchpoints.llm_replicas",
               checked=TESTED_RAY,
               differs="found by Ray Serve's actor naming, SERVE_REPLICA::<app>#<deployment>#<id> "
                       "(touchpoints.router_shard counts an autoscaled ingress's replicas by it)"),
)

REQUIRED_ATTRIBUTES: tuple[str, ...] = tuple(
    tp.attribute for tp in TOUCH_POINTS
    if tp.owner == "Scheduler" and tp.how in (How.READ, How.CALL, How.REPLACE)
    and "." not in tp.attribute and tp.checked == TESTED_VLLM
)


class _Internal:
    """``internal.Scheduler`` etc.: the classes and functions TOUCH_POINTS lists as imports,
    imported on first use."""

    def __init__(self) -> None:
        self._paths = {tp.name: tp.what for tp in TOUCH_POINTS if ":" in tp.what}

    def __getattr__(self, name: str):
        path = self.__dict__["_paths"].get(name)
        if path is None:
            raise AttributeError(f"{name} is not a registered touch point (vllm_prepack/touchpoints.py)")
        module, _, attr = path.partition(":")
        value = getattr(importlib.import_module(module), attr)
        setattr(self, name, value)
        return value


internal = _Internal()


# ---- versions --------------------------------------------------------------------------------


class UnsupportedVLLM(RuntimeError):
    """The installed vLLM is not a release this version of the plugin was checked against."""


def vllm_version() -> tuple[int, int]:
    import vllm

    return parse_version(vllm.__version__)


def parse_version(text: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", text)
    if found is None:
        raise UnsupportedVLLM(f"cannot read a vLLM version from {text!r}")
    return int(found.group(1)), int(found.group(2))


def check_vllm_version(version: str | None = None) -> bool:
    """At engine start: True where the release is supported; raises UnsupportedVLLM (one line)
    where it is not, unless ALLOW_ENV is set, which warns and returns False (the caller then
    checks its budget mirror on every step)."""
    if version is None:
        import vllm

        version = vllm.__version__
    if parse_version(version) in SUPPORTED_VLLM:
        return True
    message = (f"vllm-prepack supports vLLM {VLLM_RANGE} (checked on {', '.join(TESTED_VLLM)}), "
               f"not {version}: install a supported vLLM, or set {ALLOW_ENV}=1 to run anyway")
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        logger.warning("%s; %s is set: running, with the budget mirror checked every step",
                       message.split(":")[0], ALLOW_ENV)
        return False
    raise UnsupportedVLLM(message)


@lru_cache(maxsize=None)
def _at_least(minor: int) -> bool:
    """Whether the installed vLLM is 0.`minor` or newer (read once per release it is asked of)."""
    return vllm_version() >= (0, minor)


# ---- the scheduler: reads that differ between releases ---------------------------------------


def prefills_deferred(scheduler, throttle_prefills: bool) -> bool:
    """Whether the coming schedule() holds new prefills (and prefill chunks) back: DP prefill
    throttling in every release, and from 0.33 also the local prefill cadence."""
    interval = getattr(scheduler, "local_prefill_interval", 1) if _at_least(33) else 1
    if not throttle_prefills and interval <= 1:
        return False  # most steps: nothing below can defer
    chunks_only = all(r.is_prefill_chunk for r in scheduler.running)
    if chunks_only or scheduler.prefill_capacity_bound:
        return False
    if throttle_prefills:
        return True
    return (scheduler.num_executed_steps + 1) - scheduler.last_prefill_step < interval


def active_adapters(scheduler, scheduled: dict[str, int]) -> frozenset:
    """LoRA adapters that count against max_loras when the waiting phase starts."""
    running = scheduler.running if _at_least(33) else (
        r for r in scheduler.running if r.request_id in scheduled)
    return frozenset(r.lora_request.lora_int_id for r in running
                     if r.lora_request and r.lora_request.lora_int_id > 0)


def long_prefill_threshold(scheduler) -> int:
    """vLLM's cap on one running request's tokens a step (0: none); from 0.34 it applies only
    with chunked prefill."""
    config = scheduler.scheduler_config
    if _at_least(34) and not config.enable_chunked_prefill:
        return 0
    return config.long_prefill_token_threshold


def check_waiting_order(scheduler) -> None:
    """Refuse what in 0.34 lets vLLM order waiting requests past the plugin's queue: its
    cache-aware admission reorders the queue's head, and async KV loads wait in a queue apart
    that vLLM interleaves with it by arrival. The plugin would plan steps vLLM then changes."""
    if getattr(scheduler, "cache_aware_window", 0) > 0:
        raise ValueError(
            "vllm-prepack orders the waiting queue itself: set cache_aware_admission_window to 0 "
            "(its shortest-first order already counts each request's prefix-cache hit)")
    if (getattr(scheduler.scheduler_config, "max_num_inflight_kv_loads", None)
            and scheduler.connector is not None):
        raise ValueError(
            "vllm-prepack plans every waiting request, and max_num_inflight_kv_loads keeps "
            "async KV loads in a queue of vLLM's own: unset it to run with the plugin")


def passed_over(scheduler, request) -> bool:
    """Whether vLLM's waiting loop passes over `request` now for its status (its
    structured-output grammar still compiling, a streaming session waiting for input; not its
    other skips: a LoRA adapter over the limit, output still in flight): vLLM's own check,
    which also promotes a request that became ready to WAITING and marks a failed grammar for
    vLLM to end at its next update (the loop does both on reaching it; this may come first)."""
    return (scheduler._is_blocked_waiting_status(request.status)
            and not scheduler._handle_blocked_waiting_request(request))


def cached_prefix_tokens(scheduler, request) -> int:
    """Prompt tokens a prefix-cache hit would skip now (vLLM's own lookup, no statistics)."""
    manager = scheduler.kv_cache_manager
    if not request.block_hashes or not manager.prefix_cache_lookup_enabled(request):
        return 0
    if _at_least(34):  # the hit vLLM takes, bounded as get_computed_blocks bounds it
        _, hit, _ = manager.coordinator.find_longest_cache_hit(
            request.block_hashes, request.get_max_cache_hit_length())
        return hit
    _, hit, _ = manager.coordinator.find_longest_cache_hit(request.block_hashes,
                                                            request.num_tokens - 1)
    return hit


@dataclass(frozen=True)
class KVBlocks:
    """How vLLM counts a request's KV blocks where one full-attention group holds every layer."""

    block_size: int
    lookahead: int  # slots allocate_slots adds for speculative tokens

    def to_admit(self, num_tokens: int, uncached: int) -> int:
        """Blocks vLLM must find free to admit a waiting request of `num_tokens` tokens whose
        last `uncached` are not computed or cached (vLLM checks the whole sequence fits at
        admission, scheduler_reserve_full_isl; cached blocks are taken as held by others)."""
        reused = (num_tokens - uncached) // self.block_size
        return max(0, -(-(num_tokens + self.lookahead) // self.block_size) - reused)

    def most_to_admit(self, tokens: int, seqs: int, max_len: int) -> int:
        """The most blocks admitting `seqs` requests with `tokens` uncached tokens in all can
        need (one of them chunked, up to `max_len` tokens): to_admit is at most
        (uncached + lookahead) // block_size + 2 a request."""
        size, ahead = self.block_size, self.lookahead
        return (tokens + seqs * ahead) // size + 2 * seqs + (max_len + ahead) // size + 2

    def to_extend(self, computed: int, tokens: int) -> int:
        """Blocks a running request with `computed` tokens allocates for `tokens` more."""
        size, ahead = self.block_size, self.lookahead
        return max(0, -(-(computed + tokens + ahead) // size) - -(-(computed + ahead) // size))


def kv_block_accounting(scheduler) -> KVBlocks | None:
    """The block arithmetic of a plain full-attention KV cache; None where the estimate would
    not hold (several KV groups: hybrid, sliding-window or Mamba models; no KV cache): there
    the plugin does not track KV blocks and vLLM alone finds out what fits."""
    groups = getattr(getattr(scheduler, "kv_cache_config", None), "kv_cache_groups", ())
    block_size = getattr(scheduler, "block_size", None)  # read from 0.32 on
    if len(groups) != 1 or not block_size:
        return None
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, internal.FullAttentionSpec) or isinstance(spec, internal.SlidingWindowSpec):
        return None
    return KVBlocks(block_size, getattr(scheduler, "num_lookahead_tokens", 0))


def free_kv_blocks(scheduler) -> tuple[int, int]:
    """Free KV blocks now, and the watermark vLLM keeps free when admitting waiting requests."""
    manager = scheduler.kv_cache_manager
    return manager.block_pool.get_num_free_blocks(), getattr(manager, "watermark_blocks", 0)


def capture_sizes(vllm_config) -> tuple[int, ...]:
    """CUDA-graph capture sizes in force, () when the engine runs eager (CPU, enforce_eager)."""
    model_config = vllm_config.model_config
    compilation = vllm_config.compilation_config
    if model_config is None or model_config.enforce_eager or compilation.cudagraph_mode is None:
        return ()
    if compilation.cudagraph_mode.name == "NONE":
        return ()
    return tuple(sorted(compilation.cudagraph_capture_sizes or ()))


def delay_model_execution(llm, seconds: float) -> None:
    """Benchmarks only: every model execution of an in-process engine first sleeps `seconds`,
    standing in for a GPU's fixed cost per step (launches, graph replay) on a CPU engine."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    inner = executor.execute_model

    def delayed(*args, **kwargs):
        time.sleep(seconds)
        return inner(*args, **kwargs)

    executor.execute_model = delayed


@contextmanager
def token_budget_cap(scheduler, tokens: int | None):
    """One ``schedule()`` of `scheduler` with vLLM's step token budget lowered to `tokens`
    (a probe step of the step-cost model); None leaves it. vLLM's own mechanism then fills the
    smaller step, running requests first, so the plan's mirror of it holds unchanged."""
    if tokens is None:
        yield
        return
    budget = scheduler.max_num_scheduled_tokens
    scheduler.max_num_scheduled_tokens = min(budget, tokens)
    try:
        yield
    finally:
        scheduler.max_num_scheduled_tokens = budget


def engine_scheduler(llm):
    """The scheduler of an ``LLM`` whose engine core runs in this process, else None."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    return getattr(core, "scheduler", None)


# ---- the plan, from the scheduler to the model runner ----------------------------------------


def attach_plan(output, plan: dict[str, int]) -> None:
    """The plugin's plan rides on vLLM's SchedulerOutput to the model runner (debug_layout)."""
    output.prepack_plan = plan


def plan_of(output) -> dict[str, int] | None:
    return getattr(output, "prepack_plan", None)


def attach_step_cost(output, report: dict) -> None:
    """The step cost in force rides to the model runner for ``layout_report`` (record_layout)."""
    output.prepack_step_cost = report


def step_cost_of(output) -> dict | None:
    return getattr(output, "prepack_step_cost", None)


# ---- the model runner (patches/runner_layout.py) ---------------------------------------------

_UNSET = object()


def runner_recorder(runner, make):
    """The runner's layout recorder, made by `make(vllm_config)` on first use (None: off)."""
    rec = runner.__dict__.get("_prepack_recorder", _UNSET)
    if rec is _UNSET:
        rec = runner._prepack_recorder = make(runner.vllm_config)
    return rec


def runner_output(runner, output=_UNSET):
    """The SchedulerOutput of the forward in progress (set by execute_model's wrapper, taken
    once by the attention-metadata wrapper); with `output`, sets it."""
    if output is not _UNSET:
        runner._prepack_output = output
        return output
    return runner.__dict__.get("_prepack_output")


def model_runners() -> tuple[type, ...]:
    """The model-runner classes of this release the layout hook wraps: the V1 runner (until
    0.33) and Model Runner V2."""
    if _at_least(34):
        return (internal.ModelRunnerV2,)
    return (internal.GPUModelRunner, internal.ModelRunnerV2)


def v2_layout_inputs(runner, batch) -> dict:
    """Plain lists of the layout Model Runner V2 built for this forward (its InputBatch):
    sequence boundaries, each request's first position, computed and prompt tokens. Computed
    tokens come from the runner's device counter, which its positions are built from: the
    batch's host copy is the scheduler's optimistic count, ahead of it after rejected drafts."""
    states = runner.req_states
    computed = states.num_computed_tokens.gpu[batch.idx_mapping].cpu().numpy()
    prompt_lens = states.prompt_len.np[batch.idx_mapping_np]
    return _layout_lists(batch.num_reqs, batch.req_ids, batch.query_start_loc_np, batch.positions,
                         computed, prompt_lens)


def v2_layout_whole(runner, batch) -> bool:
    """Whether Model Runner V2's InputBatch is its forward's whole layout: not where it verifies
    drafts (adaptive verification re-lays the query after the host copy) or holds one
    prefill-context-parallel rank's share."""
    return not batch.num_draft_tokens and runner.pcp_manager is None


def runner_layout_inputs(runner, num_reqs: int) -> dict:
    """Plain lists of the layout the V1 runner built for this forward: sequence boundaries,
    each request's first position, computed and prompt tokens."""
    batch = runner.input_batch
    return _layout_lists(num_reqs, batch.req_ids, runner.query_start_loc.np, runner.positions,
                         batch.num_computed_tokens_cpu, batch.num_prompt_tokens)


def _layout_lists(num_reqs, req_ids, query_start_loc, positions, computed, prompt_lens) -> dict:
    import torch

    qsl = query_start_loc[: num_reqs + 1].tolist()
    starts = positions[torch.tensor(qsl[:-1], dtype=torch.long, device=positions.device)].tolist()
    return dict(req_ids=tuple(req_ids[:num_reqs]), query_start_loc=tuple(qsl),
                start_positions=tuple(starts), computed=tuple(computed[:num_reqs].tolist()),
                prompt_lens=tuple(prompt_lens[:num_reqs].tolist()))


def scheduled_plan_inputs(output) -> tuple[dict, dict]:
    """From a SchedulerOutput: tokens scheduled per request, and the computed tokens (a
    prefix-cache hit) of the requests admitted or resumed this step (from 0.34 a resumed
    request comes among the new ones)."""
    cached = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    cached.update(_resumed(output))
    return dict(output.num_scheduled_tokens), cached


def admitted_req_ids(output) -> list[str]:
    """From a SchedulerOutput: the requests admitted or resumed this step."""
    return [r.req_id for r in output.scheduled_new_reqs] + [req_id for req_id, _ in _resumed(output)]


def _resumed(output) -> list[tuple[str, int]]:
    """(request, computed tokens) of the requests resumed this step that are not among the new
    ones: before 0.34 they come among the cached requests, from 0.34 as new ones (none here)."""
    if _at_least(34):
        return []
    resumed = output.scheduled_cached_reqs
    return [(req_id, computed) for req_id, computed in
            zip(resumed.req_ids, resumed.num_computed_tokens) if req_id in resumed.resumed_req_ids]


def runner_output_fields(req_ids: list[str]) -> dict:
    """The fields a ModelRunnerOutput needs beside req_ids: before 0.34, the index of each."""
    return {} if _at_least(34) else {"req_id_to_index": {r: i for i, r in enumerate(req_ids)}}


def observe_schedule(scheduler, observe):
    """Call ``observe(seconds, output)`` after every ``schedule()`` of this scheduler (an
    instance attribute over the class's method); returns the function that stops it."""
    inner = scheduler.schedule

    def timed(*args, **kwargs):
        started = time.perf_counter()
        output = inner(*args, **kwargs)
        observe(time.perf_counter() - started, output)
        return output

    scheduler.schedule = timed
    return lambda: scheduler.__dict__.pop("schedule", None)


# ---- serving on Ray: the load report --------------------------------------------------------


def kv_cache_tokens(scheduler, blocks: KVBlocks | None) -> int:
    """Tokens the engine's KV cache holds (its blocks, of their size): the most its prefix
    cache can keep, for the token router's prefix index. `blocks`: ``kv_block_accounting``'s;
    None (several KV groups share the blocks: hybrid, sliding-window models): 0, not known."""
    return scheduler.kv_cache_config.num_blocks * blocks.block_size if blocks is not None else 0


def running_load(scheduler) -> tuple[int, int]:
    """(prompt tokens running requests have still to prefill, running requests that decode).

    Reads ``Scheduler.running`` and ``Request.num_prompt_tokens / num_computed_tokens /
    max_tokens / num_output_tokens``. Called right after ``schedule()``, which has already
    advanced ``num_computed_tokens`` by the step's tokens: the counts are those once the step
    has run. A request whose step yields its last token (pooling requests, whose max_tokens is
    1, and generation at its max_tokens) finishes with it, so it does not count as decoding.
    vLLM keeps no such totals: a scan of the running requests, O(running) a step."""
    prefill = decoding = 0
    for request in scheduler.running:
        left = request.num_prompt_tokens - request.num_computed_tokens
        if left > 0:
            prefill += left
        elif request.max_tokens - request.num_output_tokens > 1:
            decoding += 1
    return prefill, decoding


# ---- Ray Serve (2.60.0): the request router's view of a request -----------------------------

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


def serve_llm_direct_streaming() -> bool:
    """Ray Serve LLM's opt-in direct streaming (``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1``,
    ray/llm/_internal/serve/constants.py, Ray 2.60): requests reach vLLM's own web app in the
    server, past ``LLMServer.chat`` and ``completions``."""
    from ray.llm._internal.serve import constants

    return bool(constants.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING)


def replica_local_rank() -> int:
    """This replica's rank among its deployment's replicas on its node:
    ``serve.get_replica_context().rank.local_rank`` (``ReplicaContext`` is a DeveloperAPI).
    Ray Serve LLM offsets per-replica ports by it the same way."""
    from ray import serve

    return serve.get_replica_context().rank.local_rank


def router_shard() -> tuple[int, int] | None:
    """(rank, replicas) of the Ray Serve replica this code runs in (a router runs in its
    caller's process: Ray Serve LLM's ingress); None outside a replica. The rank is
    ``ReplicaContext.rank.rank`` (a DeveloperAPI; Ray keeps ranks contiguous at the target
    count and updates the context when it moves one). The size is ``world_size`` for a fixed
    number of replicas; under ``autoscaling_config`` (read from the private
    ``_deployment_config``) ``world_size`` is the config's ``num_replicas`` (ray/serve/_private/
    replica.py, Ray 2.60), not the live count, so the replicas are counted among the named
    actors by Ray Serve's naming (``_replica_actors``: one list from Ray's GCS, where
    ``serve.status()`` builds every application's details): those starting or stopping count
    too. To be called off the event loop."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:
        return None
    if context._deployment_config.autoscaling_config is None:
        return context.rank.rank, context.world_size
    return context.rank.rank, max(1, len(_replica_actors(context.app_name, context.deployment)))


def _replica_actors(app_name: str, deployment: str) -> list[str]:
    """The names of a deployment's replica actors, found among the named actors (public
    ``ray.util.list_named_actors``) by Ray Serve's naming,
    ``SERVE_REPLICA::<app>#<deployment>#<id>`` in namespace "serve"."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == "serve" and actor["name"].startswith(prefix)]


def llm_replicas(app_name: str, model_id: str) -> list[dict]:
    """The live replicas of a model served by Ray Serve LLM with ``PrepackLLMServer``: each
    one's actor handle (``ray.kill`` it to kill the replica), the load endpoint it advertises
    (tests and the bench watch loads) and its prefix feed's (None where it publishes none).

    Finds the replica actors (``_replica_actors``) with Ray Serve LLM's deployment name
    ``<server class>:<model id, escaped>``; then calls each
    replica actor's ``record_routing_stats`` (the method Ray Serve's controller polls, which runs
    the server's hook of that name; ray/serve/_private/replica.py, Ray 2.60). Ray has no public
    way to read a replica's metadata outside a request router."""
    import ray

    from vllm_prepack.load_channel import METADATA_KEY, PREFIX_METADATA_KEY

    deployment = "PrepackLLMServer:" + model_id.replace("/", "--").replace(".", "_")
    out = []
    for name in _replica_actors(app_name, deployment):
        handle = ray.get_actor(name, namespace="serve")
        try:
            stats = ray.get(handle.record_routing_stats.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue  # dead, or not up yet
        out.append({"name": name, "actor": handle, "endpoint": stats.get(METADATA_KEY),
                    "prefix_endpoint": stats.get(PREFIX_METADATA_KEY)})
    return out
