"""Prometheus metrics for ``vllm serve``: the ``vllm.stat_logger_plugins`` entry point.

vLLM builds stat loggers in its frontend process (AsyncLLM), which sees ``SchedulerStats`` and
``IterationStats`` of every step; these metrics appear on the server's ``/metrics`` next to
vLLM's own. They are recorded only when the engine runs the plugin's scheduler. The step-cost
gauges come from the same model the scheduler fits (``cost.py``), fed the same step times
(the plugin's iteration details carry each whole step's time).
"""

from __future__ import annotations

from functools import lru_cache

from vllm_prepack.config import PrepackConfig, is_plugin_scheduler
from vllm_prepack.policy import padding_gap
from vllm_prepack.touchpoints import capture_sizes, internal

_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@lru_cache(maxsize=1)
def _metrics():
    """One set per process: prometheus_client refuses to register a name twice."""
    from prometheus_client import Counter, Gauge, Histogram

    labels = ["model_name", "engine"]
    return {
        "fill": Histogram("vllm_prepack:budget_fill_ratio",
                          "Scheduled tokens per step / max_num_batched_tokens", labels,
                          buckets=_RATIO_BUCKETS),
        "seqs": Histogram("vllm_prepack:sequences_per_step", "Requests in each forward step",
                          labels, buckets=_COUNT_BUCKETS),
        "padded": Counter("vllm_prepack:padded_tokens",
                          "Tokens added to reach a CUDA-graph capture size", labels),
        "tokens": Counter("vllm_prepack:scheduled_tokens", "Tokens scheduled", labels),
        "steps": Counter("vllm_prepack:steps", "Forward steps with work", labels),
        "queue": Histogram("vllm_prepack:queue_wait_seconds",
                           "Time from arrival to first scheduling, finished requests", labels,
                           buckets=_SECONDS_BUCKETS),
        "ttft": Histogram("vllm_prepack:time_to_first_token_seconds", "Time to first token",
                          labels, buckets=_SECONDS_BUCKETS),
        "cost_fixed": Gauge("vllm_prepack:step_cost_fixed_seconds",
                            "Fitted fixed cost of a forward step (a)", labels),
        "cost_token": Gauge("vllm_prepack:step_cost_per_token_seconds",
                            "Fitted cost of a token of a step (b)", labels),
        "cost_seq": Gauge("vllm_prepack:step_cost_per_sequence_seconds",
                          "Fitted cost of a sequence of a step (c)", labels),
    }


class PrepackStatLogger(internal.StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        self.active = is_plugin_scheduler(vllm_config.scheduler_config.scheduler_cls)
        if not self.active:
            return
        self.budget = vllm_config.scheduler_config.max_num_batched_tokens
        self.capture_sizes = capture_sizes(vllm_config)
        model = vllm_config.model_config.served_model_name or vllm_config.model_config.model
        model = model[0] if isinstance(model, (list, tuple)) else model
        self.m = {k: m.labels(model_name=str(model), engine=str(engine_index))
                  for k, m in _metrics().items()}
        config = PrepackConfig.from_additional_config(vllm_config.additional_config)
        self.cost = config.step_cost_model(self.budget)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if not self.active:
            return
        details = scheduler_stats.iteration_details if scheduler_stats is not None else None
        if details is not None and not details.is_dummy:
            tokens = details.num_ctx_tokens + details.num_generation_tokens
            if tokens:
                self.m["steps"].inc()
                self.m["tokens"].inc(tokens)
                self.m["fill"].observe(tokens / self.budget)
                self.m["seqs"].observe(details.num_ctx_requests + details.num_generation_requests)
                self.m["padded"].inc(padding_gap(tokens, self.capture_sizes))
                seqs = details.num_ctx_requests + details.num_generation_requests
                self.cost.observe(tokens, seqs, details.elapsed_ms / 1e3)
                cost = self.cost.current
                self.m["cost_fixed"].set(cost.fixed)
                self.m["cost_token"].set(cost.per_token)
                self.m["cost_seq"].set(cost.per_seq)
        if iteration_stats is not None:
            for seconds in iteration_stats.time_to_first_tokens_iter:
                self.m["ttft"].observe(seconds)
            for finished in iteration_stats.finished_requests:
                self.m["queue"].observe(finished.queued_time)

    def log_engine_initialized(self):
        pass
