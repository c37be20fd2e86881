"""``bench scheduler``'s scale and policy parts on small backlogs (vLLM's scheduler alone, or the
pure policy: no engine)."""

import pytest

from vllm_prepack.bench.harness import SLOW_FIRST_STEPS, NoisyStepCost, Outcome
from vllm_prepack.bench.scheduler import (
    SCALE_COSTS, _coverage, _point_label, in_model, policy_alone, scale, wall_floor)
from vllm_prepack.cost import StepCost


def _rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in lines[2:]]


def test_the_policy_part_times_every_plan_warm_and_cold_for_each_row():
    """Every row of the scale part's grid, each timed warm and after an eviction copy."""
    rows = _rows(policy_alone([300], budget=256, steps=4, evict=1 << 20))
    assert [(r["chunked prefill"], r["plugin's step cost"]) for r in rows] == [
        (chunked, cost) for chunked in ("on", "off") for cost in SCALE_COSTS]
    for row in rows:
        for warmth in ("warm", "cold"):
            p50, first, rest = (float(row[f"planning ms, {warmth} ({q})"])
                                for q in ("p50", "first", "max of the rest"))
            assert 0 < p50 <= max(first, rest) and first > 0
        assert float(row["admitted/step"]) > 0


def test_the_scale_part_runs_only_the_baselines_asked_for(tiny_model):
    """At 1M waiting each baseline holds a copy of the backlog: 'presorted' alone still gives the
    plugin's added cost per admitted request, and no column or note of FCFS or SPF is left."""
    text = scale(tiny_model, [300], budget=1024, steps=3, baselines=["presorted", "presorted"])
    rows = _rows(text)
    assert [(r["chunked prefill"], r["plugin's step cost"]) for r in rows] == [
        (chunked, cost) for chunked in ("on", "off") for cost in SCALE_COSTS]
    presorted = "FCFS on a shortest-first backlog"
    assert set(rows[0]) == {
        "chunked prefill", "waiting requests", "plugin's step cost", "prepack ms/step (p50)",
        "planning ms (p50)", "planning ms (max)", "admitted/step prepack",
        "µs per admitted, prepack", f"{presorted}, ms/step (p50)", f"admitted/step, {presorted}",
        "prepack's added µs per admitted"}
    for row in rows:
        assert float(row[f"{presorted}, ms/step (p50)"]) > 0
        assert float(row["admitted/step prepack"]) > 0
    assert f"baselines: {presorted};" in text and "SGLang's scheduler" not in text
    full = scale(tiny_model, [300], budget=1024, steps=3)
    columns = set(_rows(full)[0])
    assert {"FCFS ms/step (p50)", "SPF ms/step (p50)", "µs per admitted, SPF"} <= columns
    assert "SGLang's scheduler" in full
    with pytest.raises(ValueError, match="unknown scale baselines"):
        scale(tiny_model, [300], budget=1024, baselines=["sorted"])


def test_repeated_scale_timings_report_each_rows_median_and_range(monkeypatch):
    """Each row the median of its timings, the range beside the columns it names: the
    timings scripted here (the plugin's planning p50 1, 5, 2 ms; the baseline's step 1 ms)."""
    from vllm_prepack.bench import scheduler as bench

    planning = iter([1.0, 5.0, 2.0] * 2)  # chunked on, then off

    def timed(model_dir, runs, lengths, budget, chunked, steps):
        plan = next(planning)
        got = {label: {"ms": 2.0 * plan, "admitted": 100.0, "us per admitted": 20.0 * plan,
                       "plan_p50": plan, "plan_max": 1000.0 * plan}
               for label in runs if label in SCALE_COSTS}
        got["presorted"] = {"ms": 1.0, "admitted": 100.0, "us per admitted": 10.0}
        return got

    monkeypatch.setattr(bench, "_time_side_by_side", timed)
    text = scale("no-model", [100], budget=1024, steps=2, baselines=["presorted"], repeats=3)
    rows = _rows(text)
    assert len(rows) == 2 * len(SCALE_COSTS) and "the median of 3 such timings" in text
    for row in rows:
        assert float(row["planning ms (p50)"]) == 2.0
        assert row["planning ms (p50), range"] == "1 to 5"
        assert row["planning ms (max), range"] == "1,000 to 5,000"
        assert float(row["prepack's added µs per admitted"]) == 30.0  # (2 x 2 - 1) ms / 100
        assert row["prepack's added µs per admitted, range"] == "10 to 90"
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        scale("no-model", [100], budget=1024, repeats=0)


def test_the_wall_floor_puts_the_step_bound_at_the_calibrated_cost_against_spf_steps():
    """The floor counts ceil(tokens / budget) steps (not FFD's), each at the calibrated fixed
    cost, and the same tokens' and prompts' work on both sides; f counts a full step's
    prompts (budget x prompts / tokens), as the plugin's share does."""
    lengths = [600] * 5 + [100]  # 3100 tokens: bound 4 at 1024 (FFD needs 5)
    spf = Outcome(steps=6, ttft_steps=[], ttft_s=[], sched_s=[])
    row = wall_floor("w", StepCost(0.05, 1e-4, 1e-3), {"spf": spf}, lengths, budget=1024)
    assert row["step bound"] == 4 and row["SPF steps"] == 6
    assert row["f"] == pytest.approx(0.05 / (0.05 + 0.1024 + 1e-3 * 1024 * 6 / 3100))
    assert row["wall at the bound vs SPF's (model)"] == pytest.approx(
        (4 * 0.05 + 0.31 + 6e-3) / (6 * 0.05 + 0.31 + 6e-3))


def test_a_schedule_in_the_model_is_timed_from_the_steps_that_started_its_requests():
    """Each step costs a + b x the tokens and c x the prompts it started (a step that starts
    none, a alone); TTFT is the end of a request's step; both against SPF's."""
    lengths = [100, 100, 900]
    cost = StepCost(1.0, 1e-3, 0.01)
    spf = Outcome(steps=2, ttft_steps=[1, 1, 2], ttft_s=[], sched_s=[])
    late = Outcome(steps=3, ttft_steps=[3, 3, 1], ttft_s=[], sched_s=[])
    rows = {r["scheduler"]: r for r in in_model("w", cost, {"spf": spf, "late": late}, lengths)}
    first, second = 1 + 0.2 + 0.02, 1 + 0.9 + 0.01  # SPF: the two short, then the long
    assert rows["spf"]["TTFT mean s (model)"] == pytest.approx((2 * first + first + second) / 3)
    assert rows["spf"]["wall s (model)"] == pytest.approx(first + second)
    long, idle = 1 + 0.9 + 0.01, 1.0  # late: the long, a step that starts nothing, the two
    end = long + idle + 1 + 0.2 + 0.02
    assert rows["late"]["TTFT mean s (model)"] == pytest.approx((2 * end + long) / 3)
    assert rows["late"]["wall vs SPF (model)"] == pytest.approx(end / (first + second))
    assert rows["spf"]["mean vs SPF (model)"] == 1 and rows["late"]["steps"] == 3


def _outcome(mean: float, wall: float) -> Outcome:
    return Outcome(steps=1, ttft_steps=[], ttft_s=[mean], sched_s=[], wall=wall)


def test_the_frontier_check_names_the_baselines_no_plugin_point_matches_on_both_axes():
    """A baseline is covered by a point at least as good on both mean TTFT and makespan (one
    point per baseline, not one axis from each); one not covered is named with how much worse
    the nearest point is on its worse axis; the marks are 1.02x the best baseline's mean and
    FFD's makespan."""
    # the plugin's own run ("prepack") is no baseline, however good
    baselines = {"fcfs": _outcome(3.0, 10.0), "spf": _outcome(1.0, 10.4),
                 "ffd": _outcome(1.2, 10.0), "prepack": _outcome(0.5, 9.0)}
    points = {"low mean": _outcome(1.0, 10.3), "low makespan": _outcome(1.5, 10.0)}
    got = _coverage(points, baselines)
    assert got == {"no plugin point as good": "ffd (+3%)", "both marks": "none"}
    got = _coverage({**points, "knee": _outcome(1.01, 10.1)}, baselines)
    assert got == {"no plugin point as good": "ffd (+1%)", "both marks": "knee"}
    got = _coverage({**points, "knee": _outcome(1.2, 10.0)}, baselines)
    assert got["no plugin point as good"] == "none"
    # the same schedule's costs summed in another order: equal, not worse
    same = {"same": _outcome(1.2, 10.0 * (1 + 1e-12))}
    assert _coverage(same, {**baselines, "fcfs": _outcome(9, 99), "spf": _outcome(9, 99)})[
        "no plugin point as good"] == "none"


def test_an_engine_warm_up_costs_full_steps_whatever_the_first_steps_hold():
    """The first steps' extra time is (warmup - 1) x a full step's, not warmup x their own: a
    part-full first step (FCFS's often are) must not read as a cheaper warm-up."""
    truth = StepCost(fixed=2.0, per_token=1.0)
    full = truth.seconds(100)
    for tokens in (10, 100):
        clock = NoisyStepCost(truth, noise=0.0, warmup=3.0, budget=100)
        times = [clock.seconds(tokens) for _ in range(SLOW_FIRST_STEPS + 1)]
        slow = [truth.seconds(tokens) + 2 * full] * SLOW_FIRST_STEPS
        assert times == slow + [truth.seconds(tokens)]
    with pytest.raises(ValueError, match="budget"):
        NoisyStepCost(truth, noise=0.0, warmup=3.0)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        NoisyStepCost(truth, noise=0.0, warmup=0.5, budget=100)


def test_a_point_is_labelled_by_its_options_of_any_type():
    """Numbers as the tables print them; a name or null (`--prepack-options` may hold either)."""
    assert _point_label({"pack_fixed_share": 0.0, "bin_fill_slack": 0.06}) == (
        "pack_fixed_share 0, bin_fill_slack 0.06")
    assert _point_label({"order": "ratio", "aging_drain_factor": None, "debug_layout": True}) == (
        'order "ratio", aging_drain_factor null, debug_layout true')
