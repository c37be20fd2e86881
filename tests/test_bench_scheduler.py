"""``bench scheduler``'s scale and policy parts on small backlogs (vLLM's scheduler alone, or the
pure policy: no engine)."""

import pytest

from vllm_prepack.bench.harness import Outcome
from vllm_prepack.bench.scheduler import SCALE_COSTS, policy_alone, scale, wall_floor
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


def test_the_wall_floor_puts_the_step_bound_at_the_calibrated_cost_against_spf_steps():
    """The floor counts ceil(tokens / budget) steps (not FFD's), each at the calibrated fixed
    cost, and the same tokens' and prompts' work on both sides."""
    lengths = [600] * 5 + [100]  # 3100 tokens: bound 4 at 1024 (FFD needs 5)
    spf = Outcome(steps=6, ttft_steps=[], ttft_s=[], sched_s=[])
    row = wall_floor("w", StepCost(0.05, 1e-4, 1e-3), {"spf": spf}, lengths, budget=1024)
    assert row["step bound"] == 4 and row["SPF steps"] == 6
    assert row["f"] == pytest.approx(0.05 / (0.05 + 0.1024))
    assert row["wall at the bound vs SPF's (model)"] == pytest.approx(
        (4 * 0.05 + 0.31 + 6e-3) / (6 * 0.05 + 0.31 + 6e-3))
