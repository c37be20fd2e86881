"""The model-runner layout hook and the metrics: pure checks, a real engine, a real server."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from vllm import SamplingParams

from vllm_prepack._patches.runner_layout import layout_report
from vllm_prepack.layout import ForwardLayout, LayoutMismatch, check
from vllm_prepack.workloads import prompt_lengths, token_ids

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = token_ids(prompt_lengths("bimodal", 16, seed=9, max_len=300), vocab_size=512, seed=9)
ENGINE = dict(enable_chunked_prefill=True, max_num_batched_tokens=128)


def layout(**kw):
    base = dict(step=3, req_ids=("a", "b"), query_start_loc=(0, 5, 6), start_positions=(0, 9),
                computed=(0, 9), prompt_lens=(5, 4), padded_tokens=2)
    return ForwardLayout(**{**base, **kw})


def test_layout_properties_and_a_clean_check():
    x = layout()
    assert (x.tokens, x.prefill_tokens, x.decode_tokens) == (6, 5, 1)
    assert x.positions_restart
    assert check(x, {"a": 5, "b": 1}, {"a": 5}, {}) == []
    assert check(x, {"a": 5, "b": 1}, {"a": 8}, {"a": 3}) == []  # 3 tokens from the prefix cache


@pytest.mark.parametrize(
    "kw, scheduled, plan, message",
    [
        ({}, {"a": 4, "b": 1}, None, "step 3: request a has 5 tokens in the forward, 4 scheduled"),
        ({"start_positions": (2, 9)}, {"a": 5, "b": 1}, None,
         "step 3: request a starts at position 2, expected 0"),
        ({}, {"a": 5, "b": 1}, {"a": 7}, "step 3: request a was planned 7 tokens, vLLM scheduled 5"),
        ({}, {"a": 5, "b": 1, "c": 2}, None, "scheduled but not in the forward ['c']"),
    ],
)
def test_check_names_the_request_and_step(kw, scheduled, plan, message):
    problems = check(layout(**kw), scheduled, plan, {})
    assert any(message in p for p in problems), problems


def _v2_state():
    """Model Runner V2's per-request state as the hook reads it: the device counter of computed
    tokens and the prompt lengths, in the runner's own slots (the batch maps to slots 2, 0, 1;
    the batch's host copy of computed tokens, the scheduler's optimistic count, says 1 more
    for "b", as after a rejected draft)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    return SimpleNamespace(req_states=SimpleNamespace(
        num_computed_tokens=SimpleNamespace(gpu=torch.tensor([9, 4, 0], dtype=torch.int32)),
        prompt_len=SimpleNamespace(np=np.array([4, 20, 5], dtype=np.int32))))


def _v2_batch(starts=(0, 9, 4), drafts=0):
    """A real Model Runner V2 InputBatch of the installed vLLM: a new 5-token prompt, a decode
    at position 9, a chunk of 3 from position 4, and 2 tokens of CUDA-graph padding (only the
    fields the layout hook reads are set)."""
    import dataclasses

    import numpy as np
    import torch

    from vllm_prepack.touchpoints import internal

    positions = [*range(starts[0], starts[0] + 5), starts[1], *range(starts[2], starts[2] + 3), 0, 0]
    fields = dict(req_ids=["a", "b", "c"], num_reqs=3,
                  query_start_loc_np=np.array([0, 5, 6, 9], dtype=np.int32),
                  positions=torch.tensor(positions, dtype=torch.int64),
                  idx_mapping=torch.tensor([2, 0, 1]), idx_mapping_np=np.array([2, 0, 1]),
                  num_computed_tokens_np=np.array([0, 10, 4], dtype=np.int32),
                  num_draft_tokens=drafts, num_tokens=9, num_tokens_after_padding=11)
    names = {f.name for f in dataclasses.fields(internal.InputBatch)}
    assert fields.keys() <= names, fields.keys() - names  # the fields the hook reads exist
    return internal.InputBatch(**{name: fields.get(name) for name in names})


def test_model_runner_v2_layout_from_a_real_input_batch():
    from vllm_prepack.touchpoints import v2_layout_inputs

    x = ForwardLayout(step=1, padded_tokens=2, **v2_layout_inputs(_v2_state(), _v2_batch()))
    assert x.req_ids == ("a", "b", "c") and x.query_start_loc == (0, 5, 6, 9)
    assert x.computed == (0, 9, 4) and x.prompt_lens == (5, 4, 20)  # by slot, from the device
    assert x.positions_restart and (x.prefill_tokens, x.decode_tokens) == (8, 1)
    assert check(x, {"a": 5, "b": 1, "c": 3}, {"a": 5, "c": 3}, {}) == []
    shifted = ForwardLayout(step=1, padded_tokens=2,
                            **v2_layout_inputs(_v2_state(), _v2_batch((1, 9, 4))))
    assert any("request a starts at position 1, expected 0" in p
               for p in check(shifted, {"a": 5, "b": 1, "c": 3}, None, {}))


def test_model_runner_v2_wrappers_record_and_check_each_forward():
    """The hook's wrappers on a runner class with Model Runner V2's leading parameters (read from
    the installed class), checked against a real SchedulerOutput: one layout a forward the
    plugin scheduled, none for a dummy run or for vLLM's own warm-up outputs (no step cost), a
    plan vLLM did not follow fails loudly, and where drafts are verified only the plan is
    checked."""
    import inspect
    from types import SimpleNamespace

    from vllm_prepack._patches import runner_layout
    from vllm_prepack.touchpoints import attach_plan, attach_step_cost, internal

    real = internal.ModelRunnerV2
    assert list(inspect.signature(real.prepare_inputs).parameters)[:2] == ["self", "scheduler_output"]
    execute = inspect.signature(real.execute_model).parameters
    assert list(execute)[:2] == ["self", "scheduler_output"] and "dummy_run" in execute

    class Runner:
        vllm_config = SimpleNamespace(additional_config={"prepack": {"debug_layout": True}})
        req_states = _v2_state().req_states
        pcp_manager = None
        drafts = 0

        def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False):
            if dummy_run:  # a profiling run: long, and no layout of a plan
                time.sleep(0.5)
                return None
            return self.prepare_inputs(scheduler_output, None, None, 0)

        def prepare_inputs(self, scheduler_output, batch_req_state, batch_desc, num_active_loras):
            return _v2_batch(drafts=self.drafts)

    runner_layout._wrap_execute_model(Runner)
    runner_layout._wrap_prepare_inputs(Runner)
    runner = Runner()
    output = internal.SchedulerOutput.make_empty()
    output.num_scheduled_tokens = {"a": 5, "b": 1, "c": 3}
    output.total_num_scheduled_tokens = 9
    runner.execute_model(output)  # vLLM's own warm-up step: not the plugin's
    attach_step_cost(output, {"steps": 1})
    attach_plan(output, {"a": 5, "c": 3})
    runner.execute_model(output)
    runner.execute_model(output, dummy_run=True)
    report = runner_layout.layout_report(SimpleNamespace(model_runner=runner))
    assert (report["forwards"], report["checked_forwards"], report["padded_tokens"]) == (1, 1, 2)
    assert report["recent"][-1]["seconds"] < 0.5  # the profiling run's time is not the forward's
    attach_plan(output, {"a": 4, "c": 3})
    with pytest.raises(LayoutMismatch, match="request a was planned 4 tokens, vLLM scheduled 5"):
        runner.execute_model(output)
    runner.drafts = 2  # verifying drafts: the layout is recorded, the plan still checked
    with pytest.raises(LayoutMismatch, match="request a was planned 4 tokens"):
        runner.execute_model(output)
    attach_plan(output, {"a": 5, "c": 3})
    runner.execute_model(output)
    report = runner_layout.layout_report(SimpleNamespace(model_runner=runner))
    assert (report["forwards"], report["checked_forwards"]) == (4, 2)


def test_install_wraps_the_runners_of_the_installed_vllm():
    """Every model runner class of this release has its execute_model and its layout method
    wrapped (the plugin installs the hook when vLLM loads it); a runner without the wrapper is
    reported as not observed, not as idle."""
    from types import SimpleNamespace

    from vllm_prepack._patches import runner_layout
    from vllm_prepack.touchpoints import internal, model_runners

    runner_layout.install()
    for runner_class in model_runners():
        assert runner_class.execute_model in runner_layout._WRAPPED
        layout_method = (runner_class.prepare_inputs if runner_class is internal.ModelRunnerV2
                         else runner_class._build_attention_metadata)
        assert layout_method in runner_layout._WRAPPED, runner_class

    class Other:
        def execute_model(self, scheduler_output):
            return None

    report = runner_layout.layout_report(SimpleNamespace(model_runner=Other()))
    assert "does not observe Other" in report["unsupported"]


def generate(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.engine
def test_recorded_layout_through_collective_rpc(engine, tiny_model):
    llm = engine(tiny_model, {"record_layout": True}, **ENGINE)
    assert generate(llm) == generate(engine(tiny_model, False, **ENGINE))  # only observes
    [report] = llm.collective_rpc(layout_report)
    assert report["forwards"] > 0 and report["positions_restart_violations"] == 0
    assert report["prefill_tokens"] == sum(map(len, PROMPTS))  # every prompt token, once
    assert report["decode_tokens"] == len(PROMPTS) * (PARAMS.max_tokens - 1)
    assert report["sequences_per_forward"] > 1
    assert report["padded_tokens"] == 0  # CPU: no CUDA graphs
    last = report["recent"][-1]
    assert last["query_start_loc"][0] == 0 and last["seconds"] > 0
    cost = report["step_cost"]  # the scheduler's step-cost model, as last planned
    assert cost["per_token_s"] > 0 and cost["steps"] > 0 and cost["source"] in ("prior", "fit")


@pytest.mark.engine
def test_hook_is_inert_when_off(engine, tiny_model):
    assert engine(tiny_model, True, **ENGINE).collective_rpc(layout_report) == [None]
    assert engine(tiny_model, False, **ENGINE).collective_rpc(layout_report) == [None]


@pytest.mark.engine
def test_debug_layout_checks_every_forward(engine, tiny_model):
    llm = engine(tiny_model, {"debug_layout": True}, **ENGINE)
    generate(llm)
    [report] = llm.collective_rpc(layout_report)
    assert report["checked_forwards"] == report["forwards"] > 0


_FAILED_ENGINES: list = []  # engines a test made fail, alive for the process (tests/conftest.py)


@pytest.mark.engine
def test_debug_layout_fails_loudly_on_a_corrupted_plan(tiny_model, monkeypatch):
    from vllm_prepack import policy
    from vllm_prepack.bench.engines import build_llm

    original = policy.WaitingSet.plan

    def corrupted(self, limits, step=0, now=0.0):
        plan = original(self, limits, step, now)
        if plan:  # the first pick claims one more token than will be scheduled
            plan.codes[next(iter(plan.codes))] += 1 << policy.REASON_BITS
        return plan

    llm = build_llm(tiny_model, {"debug_layout": True}, dtype="float32", max_model_len=512,
                    num_gpu_blocks_override=64, enable_prefix_caching=False, **ENGINE)
    _FAILED_ENGINES.append(llm)  # kept: dropping an in-process engine breaks later ones
    monkeypatch.setattr(policy.WaitingSet, "plan", corrupted)
    with pytest.raises(LayoutMismatch, match=r"packed layout mismatch: step 1: request \S+ was "
                                             r"planned (\d+) tokens, vLLM scheduled (?!\1)\d+"):
        generate(llm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.engine
def test_prometheus_metrics_from_a_real_server(tiny_model, tmp_path):
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--enforce-eager", "--num-gpu-blocks-override", "64",
           "--max-num-batched-tokens", "128",
           "--scheduler-cls", "vllm_prepack.PrepackScheduler",
           "--additional-config", json.dumps({"prepack": {"aging_steps": 32}})]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(1)
        for prompt in PROMPTS[:6]:
            body = json.dumps({"model": tiny_model, "prompt": prompt, "max_tokens": 4,
                               "temperature": 0}).encode()
            req = urllib.request.Request(base + "/v1/completions", body,
                                         {"Content-Type": "application/json"})
            assert json.load(urllib.request.urlopen(req, timeout=60))["choices"]
        time.sleep(1)
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    finally:
        server.terminate()
        server.wait(timeout=60)
    values = {}
    for line in metrics.splitlines():
        if line.startswith("vllm_prepack:") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    assert values["vllm_prepack:steps_total"] > 0
    assert values["vllm_prepack:scheduled_tokens_total"] >= sum(map(len, PROMPTS[:6]))
    assert values["vllm_prepack:budget_fill_ratio_count"] == values["vllm_prepack:steps_total"]
    assert values["vllm_prepack:time_to_first_token_seconds_count"] == 6
    assert values["vllm_prepack:queue_wait_seconds_count"] == 6
    assert values["vllm_prepack:padded_tokens_total"] == 0  # CPU: no CUDA graphs
    # the step-cost model, fitted from the whole steps' times the iteration details carry
    assert values["vllm_prepack:step_cost_per_token_seconds"] > 0
    assert values["vllm_prepack:step_cost_fixed_seconds"] >= 0


def test_metrics_record_each_step_and_finished_request():
    """The stat logger alone (the real server test above covers the wiring): a step's tokens,
    fill, sequences and CUDA-graph padding; TTFT and queue time per request; off for other
    schedulers."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from vllm_prepack.metrics import PrepackStatLogger
    from vllm_prepack.touchpoints import internal

    def config(scheduler_cls):
        return SimpleNamespace(
            scheduler_config=SimpleNamespace(scheduler_cls=scheduler_cls, max_num_batched_tokens=100),
            model_config=SimpleNamespace(served_model_name="metrics-test", model="m", enforce_eager=False),
            compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name="FULL"),
                                               cudagraph_capture_sizes=[8, 16, 64, 128]),
            additional_config={"prepack": {"step_cost_fixed_tokens": 50}})

    logger = PrepackStatLogger(config("vllm_prepack.PrepackScheduler"))
    step = internal.SchedulerIterationDetails(iteration_index=1, num_ctx_requests=2, num_ctx_tokens=40,
                                              num_generation_requests=3, num_generation_tokens=3,
                                              elapsed_ms=0.0)
    iteration = SimpleNamespace(time_to_first_tokens_iter=[0.2, 0.4],
                                finished_requests=[SimpleNamespace(queued_time=0.1)])
    logger.record(SimpleNamespace(iteration_details=step), iteration)
    logger.record(SimpleNamespace(iteration_details=None), None)  # no step, no request
    value = lambda name: REGISTRY.get_sample_value(  # noqa: E731
        f"vllm_prepack:{name}", {"model_name": "metrics-test", "engine": "0"})
    assert (value("steps_total"), value("scheduled_tokens_total"), value("padded_tokens_total")) == (
        1, 43, 64 - 43)
    assert value("budget_fill_ratio_sum") == pytest.approx(0.43)
    assert value("sequences_per_step_sum") == 5
    assert (value("time_to_first_token_seconds_count"), value("queue_wait_seconds_count")) == (2, 1)
    # the step-cost gauges: the prior's shape until steps carry their time, then the fit
    assert value("step_cost_per_sequence_seconds") == 0 and value("step_cost_fixed_seconds") > 0
    for tokens in range(5, 100, 5):  # 0.5 ms fixed + 10 us a token, the whole step's time
        timed = internal.SchedulerIterationDetails(
            iteration_index=2, num_ctx_requests=1, num_ctx_tokens=tokens, num_generation_requests=0,
            num_generation_tokens=0, elapsed_ms=0.5 + 0.01 * tokens)
        logger.record(SimpleNamespace(iteration_details=timed), None)
    assert value("step_cost_fixed_seconds") == pytest.approx(5e-4, rel=1e-3)
    assert value("step_cost_per_token_seconds") == pytest.approx(1e-5, rel=1e-3)
    plain = PrepackStatLogger(config(None))
    plain.record(SimpleNamespace(iteration_details=step), iteration)
    assert not plain.active and value("steps_total") == 1 + 19  # the step above and the timed ones
