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
