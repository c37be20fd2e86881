"""``bench scheduler``'s engine-free policy part on a small backlog (pure: no vLLM engine)."""

from vllm_prepack.bench.scheduler import SCALE_COSTS, policy_alone


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
