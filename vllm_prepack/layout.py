"""The packed layout of one forward, its check against the scheduler's plan, and aggregates.

Pure Python: the model-runner patch (``patches/runner_layout.py``) extracts plain lists from
vLLM's runner and hands them here, so the logic is tested without an engine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace


class LayoutMismatch(AssertionError):
    """The runner's packed layout disagrees with what the scheduler planned (debug_layout)."""


@dataclass(frozen=True)
class ForwardLayout:
    step: int  # the runner's forward counter
    req_ids: tuple[str, ...]
    query_start_loc: tuple[int, ...]  # sequence boundaries, len(req_ids) + 1
    start_positions: tuple[int, ...]  # position id of each request's first token this forward
    computed: tuple[int, ...]  # each request's computed tokens before this forward
    prompt_lens: tuple[int, ...]
    padded_tokens: int  # tokens added to reach a CUDA-graph size
    seconds: float = 0.0  # host time of the forward (filled in after it ran)

    @property
    def tokens(self) -> int:
        return self.query_start_loc[-1] - self.query_start_loc[0]

    def scheduled(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    @property
    def prefill_tokens(self) -> int:
        return sum(
            min(self.scheduled(i), max(0, self.prompt_lens[i] - self.computed[i]))
            for i in range(len(self.req_ids))
        )

    @property
    def decode_tokens(self) -> int:
        return self.tokens - self.prefill_tokens

    @property
    def positions_restart(self) -> bool:
        """Every request's positions start at its computed-token offset (0 for a new prompt)."""
        return self.start_positions == self.computed


def check(
    layout: ForwardLayout,
    scheduled: Mapping[str, int],
    plan: Mapping[str, int] | None,
    cached: Mapping[str, int],
) -> list[str]:
    """Mismatches between the runner's layout, vLLM's schedule and the plugin's plan.

    scheduled: tokens per request in the SchedulerOutput; plan: tokens the plugin planned for
    the requests it admitted this step (None when no plan reached the runner); cached: tokens of
    newly admitted requests that prefix caching supplied (they count towards the plan).
    """
    problems = []
    where = f"step {layout.step}"
    if set(layout.req_ids) != set(scheduled):
        missing = sorted(set(scheduled) - set(layout.req_ids))
        extra = sorted(set(layout.req_ids) - set(scheduled))
        problems.append(f"{where}: requests scheduled but not in the forward {missing}, "
                        f"in the forward but not scheduled {extra}")
    for i, req_id in enumerate(layout.req_ids):
        if req_id in scheduled and layout.scheduled(i) != scheduled[req_id]:
            problems.append(f"{where}: request {req_id} has {layout.scheduled(i)} tokens in the "
                            f"forward, {scheduled[req_id]} scheduled")
        if layout.start_positions[i] != layout.computed[i]:
            problems.append(f"{where}: request {req_id} starts at position "
                            f"{layout.start_positions[i]}, expected {layout.computed[i]}")
    return problems + check_plan(layout.step, scheduled, plan, cached)


def check_plan(step: int, scheduled: Mapping[str, int], plan: Mapping[str, int] | None,
               cached: Mapping[str, int]) -> list[str]:
    """The plan's part of ``check``: what vLLM scheduled for the requests the plugin planned."""
    problems = []
    for req_id, tokens in (plan or {}).items():
        got = scheduled.get(req_id, 0) + cached.get(req_id, 0)
        if got != tokens:
            problems.append(f"step {step}: request {req_id} was planned {tokens} tokens, "
                            f"vLLM scheduled {scheduled.get(req_id, 0)} (+{cached.get(req_id, 0)} cached)")
    return problems


class LayoutRecorder:
    """Aggregates of every forward, plus the last few layouts in full."""

    def __init__(self, keep: int = 64, debug: bool = False) -> None:
        self.debug = debug
        self.recent: deque[ForwardLayout] = deque(maxlen=keep)
        self.forwards = 0
        self.tokens = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.sequences = 0
        self.padded_tokens = 0
        self.restart_violations = 0
        self.seconds = 0.0
        self.hook_seconds = 0.0  # the recorder's own time (what the hook costs a forward)
        self.checked = 0
        self.step_cost: dict | None = None  # the scheduler's step-cost model, as last planned

    def add(self, layout: ForwardLayout) -> None:
        self.forwards += 1
        prefill = layout.prefill_tokens
        self.tokens += layout.tokens
        self.prefill_tokens += prefill
        self.decode_tokens += layout.tokens - prefill
        self.sequences += len(layout.req_ids)
        self.padded_tokens += layout.padded_tokens
        self.restart_violations += not layout.positions_restart
        self.recent.append(layout)

    def finish(self, seconds: float) -> None:
        if self.recent:
            self.recent[-1] = replace(self.recent[-1], seconds=seconds)
        self.seconds += seconds

    def summary(self, recent: int = 8) -> dict:
        n = max(1, self.forwards)
        return {
            "forwards": self.forwards,
            "tokens": self.tokens,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "sequences_per_forward": self.sequences / n,
            "padded_tokens": self.padded_tokens,
            "positions_restart_violations": self.restart_violations,
            "forward_seconds_mean": self.seconds / n,
            "hook_seconds_mean": self.hook_seconds / n,
            "checked_forwards": self.checked,
            "step_cost": self.step_cost,
            "recent": [asdict(x) for x in list(self.recent)[-recent:]],
        }


def raise_on(problems: Sequence[str]) -> None:
    if problems:
        raise LayoutMismatch("packed layout mismatch: " + "; ".join(problems))
