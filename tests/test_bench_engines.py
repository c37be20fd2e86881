"""The bench's step-cost calibration: the fit alone, and on a real engine (CPU backend)."""

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from vllm_prepack.bench.engines import calibrate, fit_step_cost, run_stepwise


GRID = [(t, n) for t in (256, 512, 768, 1024) for n in (1, 4, 16)]


@given(st.floats(0, 1), st.floats(1e-6, 1e-2), st.floats(0, 1e-2),
       st.lists(st.sampled_from(GRID), min_size=3, max_size=len(GRID), unique=True))
def test_the_fit_recovers_a_b_and_c_from_exact_step_times(a, b, c, steps):
    assume(np.linalg.matrix_rank(np.array([(1, t, n) for t, n in steps])) == 3)
    cost = fit_step_cost([(t, n, a + b * t + c * n) for t, n in steps])
    assert cost.fixed == pytest.approx(a, abs=1e-6)
    assert cost.per_token == pytest.approx(b, rel=1e-6)
    assert cost.per_seq == pytest.approx(c, abs=1e-6)


@pytest.mark.parametrize("seconds, held", [
    (lambda t, n: 1e-7 * t * t + 1e-3 * n, 0),  # convex in tokens: the tangent's a below 0
    (lambda t, n: 0.05 + 1e-4 * t - 1e-3 * n, 2),  # more prompts, less time: c below 0
], ids=["a", "c"])
def test_where_the_free_fit_puts_a_or_c_below_zero_the_fit_holds_it_at_zero(seconds, held):
    steps = [(t, n, seconds(t, n)) for t in (512, 768, 1024) for n in (4, 16)]
    cost = fit_step_cost(steps)
    x = np.array([(1, t, n) for t, n, _ in steps])
    kept = [i for i in range(3) if i != held]
    best, *_ = np.linalg.lstsq(x[:, kept], np.array([s for *_, s in steps]), rcond=None)
    expected = dict(zip(kept, best)) | {held: 0.0}
    got = (cost.fixed, cost.per_token, cost.per_seq)
    assert got[held] == 0
    assert got == pytest.approx(tuple(expected[i] for i in range(3)))


def test_the_fit_names_steps_too_alike_and_times_that_do_not_grow():
    with pytest.raises(ValueError, match="two sizes and two prompt counts"):
        fit_step_cost([(512, 4, 0.1), (1024, 8, 0.2), (256, 2, 0.05)])
    with pytest.raises(ValueError, match="do not grow with tokens"):
        fit_step_cost([(128, 4, 0.2), (512, 4, 0.1), (512, 16, 0.1)])


class InProcess:
    """An in-process engine with the bench engine process's `run`."""

    def __init__(self, llm):
        self.llm = llm

    def run(self, prompts, params):
        return run_stepwise(self.llm, prompts, params)


@pytest.mark.engine
def test_a_fixed_cost_added_to_every_step_shows_in_the_calibrated_a(engine, minilm):
    from vllm import PoolingParams, SamplingParams

    from vllm_prepack.touchpoints import delay_model_execution

    embed = PoolingParams(task="embed")
    budget = 768
    # this test's own engine (its model executions sleep from here on): a seed no other test's
    # engine has keeps the shared engines' cache from handing it to one
    llm = engine(minilm, False, runner="pooling", dtype="float32", max_model_len=256,
                 max_num_batched_tokens=budget, seed=768)
    kw = dict(budget=budget, max_len=256, vocab_size=30000, first_id=1000, repeats=3)
    plain = calibrate(InProcess(llm), embed, **kw)
    delay_model_execution(llm, 0.05)
    slept = calibrate(InProcess(llm), embed, **kw)
    assert slept.fixed - plain.fixed == pytest.approx(0.05, abs=0.025)
    assert slept.per_token == pytest.approx(plain.per_token, rel=0.5)


@pytest.mark.engine
def test_the_prefill_part_runs_each_scheduler_on_a_decoder_with_fcfs_outputs(model_root,
                                                                              monkeypatch):
    """The GPU's first table (`--parts prefill`), end to end on the tests' decoder (wide logits:
    greedy far from ties) in fp32 on the CPU: every engine in its own process, the same greedy
    tokens as FCFS's; a calibration that finds step times flat (as on an H200) is reported
    under the jobs' tables instead of losing them."""
    import torch

    from vllm_prepack.bench import scheduler
    from vllm_prepack.bench.engines import FlatSteps
    from vllm_prepack.bench.scheduler import PACKS_ALWAYS, prefill_job
    from vllm_prepack.models import TINY

    def flat(*args, **kwargs):
        raise FlatSteps("step times do not grow with tokens")

    if torch.cuda.is_available():
        pytest.skip("on a GPU the part runs in bf16, where greedy ties across batch shapes are "
                    "not this test's subject; its GPU run is a benchmark")
    monkeypatch.setenv("VLLM_PREPACK_CACHE", str(model_root))
    monkeypatch.setattr(scheduler, "calibrate", flat)
    text = prefill_job(TINY, "tiny", n=24, budget=1024, repeats=1)
    assert "**No step cost fitted on this engine**: step times do not grow with tokens." in text
    names = ("fcfs", "spf", "prepack", PACKS_ALWAYS)
    jobs, fits = text.split("**The step cost the plugin had learned**")

    def rows(part):
        return [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines()
                if line.startswith(("| mmlu |", "| trimodal |"))]

    cells = rows(jobs)
    assert sorted((c[0], c[1]) for c in cells) == sorted(
        (workload, name) for workload in ("mmlu", "trimodal") for name in names)
    assert [c[-1] for c in cells if c[1] != "fcfs"] == ["yes"] * 6
    # the plugin's engines report what they learned (FCFS's and SPF's have no model)
    learned = rows(fits)
    assert sorted((c[0], c[1]) for c in learned) == sorted(
        (workload, name) for workload in ("mmlu", "trimodal") for name in ("prepack", PACKS_ALWAYS))
    assert all(0 <= float(c[5]) <= 1 and int(c[7]) == 0 for c in learned)  # f; no probe


def test_a_shapes_kv_bytes_count_keys_and_values_of_every_layer():
    from vllm_prepack.models import PREFILL_SHAPES

    shape = PREFILL_SHAPES["sheared-1.3b"]  # 24 layers, 16 KV heads of 2048 / 16 = 128
    assert shape.kv_bytes_per_token(2) == 2 * 24 * 16 * 128 * 2


@pytest.mark.engine
def test_the_prefix_part_runs_each_scheduler_with_prefix_caching_and_fcfs_outputs(model_root,
                                                                                   monkeypatch):
    """`--parts prefix` (in the default parts), at its smallest: an engine config vLLM accepts
    (chunked prefill off: the model length within the budget) and one document however few
    prompts; every engine the same greedy tokens as FCFS's."""
    from vllm_prepack.bench.scheduler import prefix_job

    monkeypatch.setenv("VLLM_PREPACK_CACHE", str(model_root))
    text = prefix_job(n=4, budget=1024, repeats=1)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| shared prefixes |")]
    assert [c[1] for c in cells] == ["fcfs", "spf", "prepack"]
    assert [c[-1] for c in cells[1:]] == ["yes", "yes"]
