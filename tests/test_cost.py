"""The step-cost model (pure, no vLLM): what it learns from step times, and what it keeps."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_prepack.cost import MIN_STEPS, OUTLIER_FACTOR, REFIT_EVERY, StepCost, StepCostModel


def feed(model, steps, truth, noise=0.0, seed=0):
    rng = random.Random(seed)
    for tokens, seqs in steps:
        model.observe(tokens, seqs, truth.seconds(tokens, seqs) * (1 + rng.uniform(-noise, noise)))
    return model.current


@settings(max_examples=100, deadline=None)
@given(fixed=st.floats(0, 0.1), per_token=st.floats(1e-7, 1e-3), per_seq=st.floats(0, 1e-3),
       prior=st.floats(0, 4096), seed=st.integers(0, 1000))
def test_exact_step_times_with_spread_give_back_a_b_c(fixed, per_token, per_seq, prior, seed):
    """Whatever the prior, exact step times over varied steps are fitted exactly (the
    prior's pull scales with the steps' scatter, here none)."""
    truth = StepCost(fixed, per_token, per_seq)
    rng = random.Random(seed)
    steps = [(rng.randint(1, 1024), rng.randint(1, 64)) for _ in range(3 * MIN_STEPS)]
    got = feed(StepCostModel(prior, 0, 1024), steps, truth)
    for step in [(1, 1), (1024, 1), (512, 64)]:
        assert got.seconds(*step) == pytest.approx(truth.seconds(*step), rel=1e-3, abs=1e-9)


def test_noisy_full_steps_stay_near_the_prior_and_spread_moves_to_the_truth():
    """A backlog of nearly full steps says little about a: noisy times leave the prior's
    shape; the same noise over steps of every size finds the truth."""
    truth = StepCost(0.05, 2e-5)  # a = 2500 tokens of work
    rng = random.Random(1)
    full = [(rng.randint(1000, 1024), 4) for _ in range(200)]
    varied = [(rng.randint(1, 1024), 4) for _ in range(200)]
    near_prior = feed(StepCostModel(256, 0, 1024), full, truth, noise=0.05)
    assert abs(near_prior.fixed_tokens - 256) < abs(near_prior.fixed_tokens - 2500)
    fitted = feed(StepCostModel(256, 0, 1024), varied, truth, noise=0.05)
    assert fitted.fixed_tokens == pytest.approx(2500, rel=0.2)


def test_the_prior_holds_until_min_steps_and_without_learning_only_the_scale_follows():
    truth = StepCost(0.01, 1e-5)
    steps = [(10 + 31 * i, 1) for i in range(2 * MIN_STEPS)]  # refits at MIN_STEPS, then every REFIT_EVERY
    assert (len(steps) - MIN_STEPS) % REFIT_EVERY == 0
    model = StepCostModel(64, 0, 1024)
    feed(model, steps[:MIN_STEPS - 1], truth)
    assert model.current == model.prior and model.report()["source"] == "prior"
    feed(model, steps[MIN_STEPS - 1:], truth)
    assert model.current.fixed_tokens == pytest.approx(1000, rel=1e-3)
    assert model.report()["source"] == "fit"
    fixed = StepCostModel(64, 0, 1024, learn=False)
    got = feed(fixed, steps, truth)
    assert got.fixed_tokens == pytest.approx(64) and fixed.report()["source"] == "fixed"
    assert got.seconds(512) == pytest.approx(truth.seconds(512), rel=0.1)  # the scale is the data's


def test_collinear_decode_steps_do_not_invent_a_per_sequence_cost():
    """Decode-only steps have tokens == sequences: b and c cannot be told apart, and the
    prior (c = 0) keeps the split while the sum is fitted."""
    truth = StepCost(0.005, 3e-5)
    got = feed(StepCostModel(256, 0, 1024), [(n, n) for n in range(1, 200)], truth)
    assert got.per_seq < 0.1 * got.per_token
    assert got.seconds(100, 100) == pytest.approx(truth.seconds(100, 100), rel=1e-3)


def test_an_outlier_step_is_clipped_and_empty_steps_are_ignored():
    truth = StepCost(0.01, 1e-5)
    model = StepCostModel(1000, 0, 1024)
    steps = [(t, 1) for t in range(10, 1024, 11)]
    feed(model, steps, truth)
    before = model.current
    model.observe(512, 1, 1000.0)  # a 1000 s stall: counted as OUTLIER_FACTOR x the prediction
    model.observe(0, 0, 5.0)
    model.observe(512, 1, float("nan"))
    assert model.steps == len(steps) + 1
    model.fit()
    assert model.fit().seconds(512) < OUTLIER_FACTOR * before.seconds(512)


def test_a_bad_prior_is_refused():
    with pytest.raises(ValueError, match="tokens >= 0"):
        StepCostModel(-1, 0, 1024)
