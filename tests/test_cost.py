"""The step-cost model (pure, no vLLM): what it learns from step times, and what it keeps."""

import math
import random
from functools import partial

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_prepack.cost import (
    HALF_LIFE_STEPS,
    MIN_STEPS,
    OUTLIER_FACTOR,
    PROBE_BACKLOG_STEPS,
    PROBE_EVERY,
    PROBE_LIMIT,
    PROBE_SHARE,
    REFIT_EVERY,
    WARMUP_STEPS,
    StepCost,
    StepCostModel,
)
from vllm_prepack.workloads import prompt_lengths


past_warmup = partial(StepCostModel, warmup=0)  # a model past an engine's first steps


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
    got = feed(past_warmup(prior, 0, 1024), steps, truth)
    for step in [(1, 1), (1024, 1), (512, 64)]:
        assert got.seconds(*step) == pytest.approx(truth.seconds(*step), rel=1e-3, abs=1e-9)


def test_noisy_full_steps_stay_near_the_prior_and_spread_moves_to_the_truth():
    """A backlog of nearly full steps says little about a: noisy times leave the prior's
    shape; the same noise over steps of every size finds the truth."""
    truth = StepCost(0.05, 2e-5)  # a = 2500 tokens of work
    rng = random.Random(1)
    full = [(rng.randint(1000, 1024), 4) for _ in range(200)]
    varied = [(rng.randint(1, 1024), 4) for _ in range(200)]
    near_prior = feed(past_warmup(256, 0, 1024), full, truth, noise=0.05)
    assert abs(near_prior.fixed_tokens - 256) < abs(near_prior.fixed_tokens - 2500)
    fitted = feed(past_warmup(256, 0, 1024), varied, truth, noise=0.05)
    assert fitted.fixed_tokens == pytest.approx(2500, rel=0.2)


def test_the_prior_holds_until_min_steps_and_without_learning_only_the_scale_follows():
    truth = StepCost(0.01, 1e-5)
    steps = [(10 + 31 * i, 1) for i in range(2 * MIN_STEPS)]  # refits at MIN_STEPS, then every REFIT_EVERY
    assert (len(steps) - MIN_STEPS) % REFIT_EVERY == 0
    model = past_warmup(64, 0, 1024)
    feed(model, steps[:MIN_STEPS - 1], truth)
    assert model.current == model.prior and model.report()["source"] == "prior" and model.learning
    feed(model, steps[MIN_STEPS - 1:], truth)
    assert not model.learning
    assert model.current.fixed_tokens == pytest.approx(1000, rel=1e-3)
    assert model.report()["source"] == "fit"
    fixed = past_warmup(64, 0, 1024, learn=False)
    got = feed(fixed, steps, truth)
    assert got.fixed_tokens == pytest.approx(64) and fixed.report()["source"] == "fixed"
    assert not fixed.learning  # a fixed shape is acted on as given
    assert got.seconds(512) == pytest.approx(truth.seconds(512), rel=0.1)  # the scale is the data's


def test_collinear_decode_steps_do_not_invent_a_per_sequence_cost():
    """Decode-only steps have tokens == sequences: b and c cannot be told apart, and the
    prior (c = 0) keeps the split while the sum is fitted."""
    truth = StepCost(0.005, 3e-5)
    got = feed(past_warmup(256, 0, 1024), [(n, n) for n in range(1, 200)], truth)
    assert got.per_seq < 0.1 * got.per_token
    assert got.seconds(100, 100) == pytest.approx(truth.seconds(100, 100), rel=1e-3)


def test_the_share_counts_a_full_steps_sequences():
    """a's share of a full step counts the step's work per sequence too (at the sequences per
    token of the steps of half the budget or more seen; decode steps, one token a sequence,
    would make it many times a full step's): where a step's work is all per sequence (b = 0,
    which the fit reads as b <= 0), the share is a's share of the step's time, not 1, as it was
    while the share counted b alone. A backlog's full steps cannot tell b from c, and then the
    share does not hang on the split."""
    truth = StepCost(0.1, 0.0, 4e-3)
    rng = random.Random(5)
    full = [(rng.randint(600, 1024), rng.randint(1, 32)) for _ in range(4 * MIN_STEPS)]
    decode = [(n, n) for n in range(16, 128, 2)]
    steps = [step for pair in zip(full, decode) for step in pair]
    model = past_warmup(256, 0, 1024)
    feed(model, steps, truth)
    weights = [model.decay ** age for age in reversed(range(len(steps)))]  # the newest: 1
    per_token = (sum(w * n for w, (t, n) in zip(weights, steps) if t >= 512)
                 / sum(w * t for w, (t, n) in zip(weights, steps) if t >= 512))
    share = truth.fixed / truth.seconds(1024, 1024 * per_token)
    assert model.current.per_token < 1e-3 * truth.per_seq
    assert model.share() == pytest.approx(share, rel=1e-3) and share < 0.6
    assert StepCost(1.0, 0.0, 0.1, seqs_per_token=0.01).fixed_share(1000) == pytest.approx(0.5)


def test_an_outlier_step_is_clipped_and_empty_steps_are_ignored():
    truth = StepCost(0.01, 1e-5)
    model = past_warmup(1000, 0, 1024)
    steps = [(t, 1) for t in range(10, 1024, 11)]
    feed(model, steps, truth)
    before = model.current
    model.observe(512, 1, 1000.0)  # a 1000 s stall: counted as OUTLIER_FACTOR x the prediction
    model.observe(0, 0, 5.0)
    model.observe(512, 1, float("nan"))
    assert model.steps == len(steps) + 1
    assert model.fit()[0].seconds(512) < OUTLIER_FACTOR * before.seconds(512)


def test_a_bad_prior_is_refused():
    with pytest.raises(ValueError, match="tokens >= 0"):
        StepCostModel(math.inf, 0, 1024)
    with pytest.raises(ValueError, match="tokens >= 0"):
        StepCostModel(-1, 0, 1024)


def backlog(model, truth, steps, noise, seed=0):
    """Full steps of a backlog (1000-1024 tokens), but where the model asks for a probe: the
    probe steps' indices."""
    rng = random.Random(seed)
    probed = []
    for i in range(steps):
        cap = model.probe_tokens(waiting_tokens=10**9)
        tokens = cap if cap is not None else rng.randint(1000, 1024)
        seqs = rng.randint(1, 16) if cap is not None else rng.randint(2, 40)
        model.observe(tokens, seqs, truth.seconds(tokens, seqs) * (1 + rng.gauss(0, noise)))
        if cap is not None:
            assert cap == 1024 * PROBE_SHARE
            probed.append(i)
    return probed


@pytest.mark.parametrize("fixed_tokens", [8, 17_500])  # a CPU's share 0.01, an H200's 0.945
def test_a_backlog_of_full_steps_probes_once_and_then_decides(fixed_tokens):
    """Noisy full steps leave a and b confounded (the test above): the model, still undecided
    at its first fit, asks for one half step, and its time decides which side of the
    threshold the share lies."""
    truth = StepCost.in_tokens(fixed_tokens, per_token=1e-5)
    share = fixed_tokens / (fixed_tokens + 1024)
    unprobed = past_warmup(256, 0, 1024)  # no threshold: never probes
    assert backlog(unprobed, truth, 200, noise=0.05) == []
    fitted = unprobed.current.fixed_tokens  # nearer the prior than the truth, in ratio
    assert abs(math.log(fitted / 256)) < abs(math.log(fitted / fixed_tokens))
    model = past_warmup(256, 0, 1024, threshold=0.4)
    probed = backlog(model, truth, 200, noise=0.05)
    assert probed == [MIN_STEPS]
    assert model.decided() and (model.share() >= 0.4) == (share >= 0.4)
    assert model.share() == pytest.approx(share, abs=0.1)
    assert model.report()["probes"] == 1
    # packing always, no side to decide, but the bins' gaps follow the share's value: probed
    # the same, once, until the steps spread
    always = past_warmup(256, 0, 1024, threshold=0.0, share_used=True)
    assert backlog(always, truth, 200, noise=0.05) == [MIN_STEPS]
    assert always.share() == pytest.approx(share, abs=0.1)


@example(share=0.96875, noise=0.047, seed=1)  # b read <= 0 after a probe: the share is ~1
@settings(max_examples=60, deadline=None)
@given(share=st.one_of(st.floats(0.0, 0.25), st.floats(0.55, 0.99)), noise=st.floats(0, 0.05),
       seed=st.integers(0, 1000))
def test_probes_put_the_share_on_its_side_of_the_threshold(share, noise, seed):
    """Any step cost at least 0.15 from the threshold, any noise up to 5%: after a backlog of
    full steps and the probes it asks for, the fitted share is on the truth's side."""
    fixed_tokens = share * 1024 / (1 - share)
    model = past_warmup(256, 0, 1024, threshold=0.4)
    probed = backlog(model, StepCost.in_tokens(fixed_tokens, per_token=2e-5), 400, noise, seed)
    assert (model.share() >= 0.4) == (share >= 0.4)
    assert len(probed) <= PROBE_LIMIT + 2  # 400 steps: at most two more, 212 steps apart


def test_a_share_on_the_threshold_is_probed_a_few_times_spaced_out():
    """Where the share sits on the threshold either choice costs about the same: PROBE_LIMIT
    probes PROBE_EVERY steps apart, then one each time the count of recent ones has decayed
    by one (0.5% of the steps)."""
    model = past_warmup(256, 0, 1024, threshold=0.4)
    truth = StepCost.in_tokens(0.4 * 1024 / 0.6, per_token=1e-5)
    probed = backlog(model, truth, 2000, noise=0.05)
    first = int(PROBE_LIMIT)
    assert probed[:first] == [MIN_STEPS + i * PROBE_EVERY for i in range(first)]
    decay = HALF_LIFE_STEPS * math.log2(PROBE_LIMIT / (PROBE_LIMIT - 1))  # 212 steps
    later = [b - a for a, b in zip(probed[first - 1:], probed[first:])]
    assert len(later) > 2 and min(later[1:]) >= decay - 1  # the first: those four had aged


@pytest.mark.parametrize("case", ["varied steps", "learning off", "always packs", "never packs",
                                  "short backlog"])
def test_no_probe_where_the_steps_decide_or_nothing_is_open(case):
    truth = StepCost.in_tokens(17_500, per_token=1e-5)
    options = {"learning off": {"learn": False, "threshold": 0.4},
               "always packs": {"threshold": 0.0},
               "never packs": {"threshold": 1.0}}.get(case, {"threshold": 0.4})
    model = past_warmup(256, 0, 1024, **options)
    waiting = (PROBE_BACKLOG_STEPS * 1024 - 1) if case == "short backlog" else 10**9
    rng = random.Random(0)
    for _ in range(4 * MIN_STEPS):
        assert model.probe_tokens(waiting) is None
        tokens = rng.randint(1, 1024) if case == "varied steps" else 1024
        model.observe(tokens, 4, truth.seconds(tokens, 4) * (1 + rng.gauss(0, 0.05)))
    assert model.probes == 0


@pytest.mark.parametrize("seed", range(3))
def test_a_shortest_first_backlog_with_a_drift_probes_and_finds_a(seed):
    """The engine bench's mmlu backlog (1000 prompts, 65,038 tokens: 63.5 full steps) run
    shortest first on a CPU engine with a 150 ms sleep a step (its calibrated a and b,
    BENCHMARKS.md), each step 2% noisy and the early ones slower, as a real engine's are. The
    prompts per step fall from ~60 to 4 while the steps stay full, so the drift reads as a
    per-sequence cost and moves a: the full steps alone leave the share far from the truth
    (0.25 to 1 across seeds before the share counted c) at a standard deviation that counts
    the noise only, and can look decided (seed 0). Undecided until its steps differ in size
    (TOKEN_SPREAD), the model probes: the backlog is deep enough (PROBE_BACKLOG_STEPS), and the
    probe finds a."""
    truth = StepCost(161e-3, 0.0894e-3)
    share = truth.fixed_share(1024)  # 0.637
    lengths = sorted(prompt_lengths("mmlu", 1000, seed=11, max_len=256))
    rng = random.Random(seed)
    model = StepCostModel(256, 0, 1024, threshold=0.4)
    waiting, step = sum(lengths), 0
    while lengths:
        cap = model.probe_tokens(waiting) or 1024
        tokens = seqs = 0
        while lengths and tokens + lengths[0] <= cap:
            tokens += lengths.pop(0)
            seqs += 1
        drift = 1 + 0.3 * math.exp(-step / 15)
        model.observe(tokens, seqs, truth.seconds(tokens, seqs) * drift * (1 + rng.gauss(0, 0.02)))
        waiting -= tokens
        step += 1
    assert model.probes >= 1
    assert model.decided() and model.share() == pytest.approx(share, abs=0.05)


@pytest.mark.parametrize("slow", [(0, 1), (WARMUP_STEPS + 3, WARMUP_STEPS + 5)],
                         ids=["engine warm-up", "stalls before the first fit"])
def test_slow_early_steps_are_left_out_of_the_fit(slow):
    """Two steps at 20x a step's cost among a backlog's first steps, those of many short
    prompts: counted, they read as a per-sequence cost and a = 0; left out (the engine's first
    WARMUP_STEPS always, later ones as far slower than the rest), the fit finds a. Steps slow
    in one shape only stay (below)."""
    truth = StepCost(10.5e-3, 0.6e-6, 0.127e-3)  # an H200's (BENCHMARKS.md)
    rng = random.Random(3)
    model = StepCostModel(256, 0, 1024)
    for i in range(3 * MIN_STEPS):
        tokens, seqs = rng.randint(900, 1024), max(2, 60 - 2 * i)
        model.observe(tokens, seqs, truth.seconds(tokens, seqs) * (20 if i in slow else 1))
    assert model.current.fixed == pytest.approx(truth.fixed, rel=0.05)
    assert model.steps == 3 * MIN_STEPS - WARMUP_STEPS


def test_steps_slow_in_one_shape_only_are_kept():
    """A GPU's decode steps are slow per token and a CPU's full steps slow per step, next to
    the rest; neither is a warm-up step, and each is what the fit needs."""
    gpu, cpu = StepCost(10e-3, 1e-6), StepCost(1e-4, 1e-4)
    steps = [(1024, 8)] * (MIN_STEPS - 4) + [(8, 8)] * 4
    for truth in (gpu, cpu):
        model = past_warmup(256, 0, 1024)
        feed(model, steps, truth)
        assert model.current.seconds(8, 8) == pytest.approx(truth.seconds(8, 8), rel=1e-3)
        assert model.current.seconds(1024, 8) == pytest.approx(truth.seconds(1024, 8), rel=1e-3)


def test_stalled_steps_leave_the_fit_undecided_and_the_plan_unpacked():
    """A CPU engine's steps cost their tokens (a = 0), but 15% of them stall at 1.3-2.5x their
    time, and here every probe does: the fitted share crosses the threshold now and then (in
    some of the seeds, checked), while the policy's plan, given the fit and its standard
    deviation, never packs."""
    from vllm_prepack.policy import PACK_SHARE, Entry, StepLimits, WaitingSet

    crossed = 0
    for seed in range(6):
        rng = random.Random(seed)
        model = StepCostModel(256, 0, 1024, threshold=PACK_SHARE)
        waiting = WaitingSet(pack_share=PACK_SHARE)
        for key, length in enumerate(prompt_lengths("trimodal", 40, seed=seed, max_len=256)):
            waiting.add(Entry(key=key, length=length, step=0))
        for _ in range(400):
            cap = model.probe_tokens(10**9)
            tokens = cap or 1024 - rng.randrange(60)
            stalled = rng.random() < 0.15 or cap
            model.observe(tokens, 8, 1e-4 * tokens * (rng.uniform(1.3, 2.5) if stalled
                                                      else rng.gauss(1, 0.03)))
            crossed += model.share() >= PACK_SHARE
            waiting.plan(StepLimits(budget=1024, seats=64, chunked_prefill=False,
                                    cost=model.current, share_sd=model.fitted_share_sd()))
            assert not waiting.packing, seed
        assert model.probes >= 1
    assert crossed > 0
