"""The plugin's one config object, parsed from ``additional_config={"prepack": {...}}``."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, NamedTuple

from vllm_prepack.cost import StepCostModel
from vllm_prepack.policy import FILL_SLACK, PACK_SHARE, AgingBound, WaitingSet

CONFIG_KEY = "prepack"
RENAMED = {"chunked_order": "order"}  # an option's old name -> its name (the old is still read)
SCHEDULER_CLS = "vllm_prepack.PrepackScheduler"
# the plugin's schedulers by every name vLLM may be given (the async variant: AsyncScheduler's)
PLUGIN_SCHEDULERS = frozenset({
    SCHEDULER_CLS, "vllm_prepack.PrepackAsyncScheduler",
    "vllm_prepack.scheduler.PrepackScheduler", "vllm_prepack.scheduler.PrepackAsyncScheduler"})


class PrepackConfigError(ValueError):
    """A bad ``additional_config["prepack"]`` value; the message names the key."""


class StarvationWarning(UserWarning):
    """Options under which a waiting request may never run (no aging bound)."""


@dataclass(frozen=True)
class PrepackConfig:
    """Options of the packing scheduler and the model-runner hook.

    Every request gets a deadline when it arrives; past it, it goes first (earliest deadline
    first), whatever its length. The deadline is the earliest of:
    aging_drain_factor: this many times the steps the waiting queue it joined needs to drain
        (waiting tokens / step budget, itself included): about what FCFS would make it wait.
        Fixed at arrival, it keeps p99 TTFT near FCFS's under steady arrivals (shortest-first
        alone stretched it to 3x FCFS at load 0.95), while a backlog that arrived together
        keeps its packing (its deadlines fall where the backlog would have drained).
    aging_steps: a fixed number of steps. Off by default: a fixed bound shorter than a deep
        backlog would turn the rest of that backlog into FCFS.
    aging_seconds: a wall-time bound (checked oldest first).
    At least one should stay on, or a long prompt can wait behind short ones indefinitely.
    max_swaps: best-fit exchanges per step (policy step c); 0 gives pure shortest-first.
    order: the order of the requests not yet due: "shortest" (shortest prompt first) or
        "ratio" (highest response ratio, (wait + service) / service in steps, first: HRRN;
        with no deadline on (aging_* null) it schedules as the HRRN baseline does, but for
        exact ties; with whole prompts, where a step's fixed cost makes packing pay
        (pack_fixed_share), it goes on past a prompt that does not fit, where HRRN in vLLM
        ends the step). The best-fit exchange and the filler reserve are off with it.
        BENCHMARKS.md has both over the drain factor.
        ``chunked_order``, its name before it applied to whole prompts, is still read.
    min_chunk_tokens: never start a prefill chunk smaller than this, except to fill a CUDA-graph
        padding gap (those tokens are computed anyway).
    cuda_graph_topup: use the padding gap of the step's CUDA-graph size (GPU only).
    step_cost_fixed_tokens: the prior of a step's fixed cost, in tokens of work (a / b: a
        step costs as much as this many tokens more than its own). Learnt from the engine's
        step times (``learn_step_cost``), so the prior only acts over the first steps.
    step_cost_seq_tokens: the prior of the cost of a sequence, in tokens of work (c / b).
    learn_step_cost: fit a, b, c online from the engine's measured step times; false: the
        policy keeps the prior's shape (the seconds reported still follow the steps). While the
        fit cannot tell which side of ``pack_fixed_share`` a's share lies (a backlog of full
        steps), or, packing always, how large it is (it sets the bins' gaps, bin_fill_slack),
        a step of a deep backlog of whole prompts runs at half the budget, a probe: on
        a GPU each costs about one step's fixed cost; they are few and spaced out (``cost.py``).
    pack_fixed_share: pack steps (filler reserve, best-fit exchange) only where the fixed cost
        is at least this share of a full step's cost, a / (a + b x budget + c x the sequences
        a full step holds; a fitted share from PACK_Z standard deviations above it until as
        many below, ``policy.py``): 0 always packs
        (the fewest steps where a dominates), 1 never (shortest first, lowest mean TTFT where
        steps cost their tokens). Between: the frontier from latency to throughput
        (BENCHMARKS.md).
    bin_fill_slack: wherever it packs (order "shortest"), the share of the makespan the bins may
        give up for a lower mean TTFT: their gaps stay open up to this / (a's share) of the
        tokens binned, at the share as now known (gaps left open at a lower share are a debt the
        next bins pay; before the fit, this alone, as if a step were all fixed cost), and the
        short prompts that would have closed them go first instead of waiting for their bins;
        0 to 0.25. The other axis of the frontier: 0.015 for a serving
        user's mean TTFT where the fillers are many short prompts (the bimodal and trimodal
        mixes; elsewhere filling every bin costs at most about 1% of the mean), 0 for the
        fewest steps: offline first-fit decreasing's bins over the backlog (all but its last
        four steps' worth), every gap closed as far as a free prompt fits, with shortest-first
        waiting while it is binned, so it spends no filler a bin would take (a few ms of
        planning a plan while a deep backlog is binned; BENCHMARKS.md).
    record_layout: the model-runner hook records each forward's packed layout.
    debug_layout: the hook also checks that layout against the scheduler's plan, and the
        scheduler checks its mirror of vLLM's running-request budget against what vLLM then
        scheduled; either raises on a mismatch (the tests run the budget check on every step).
    load_endpoint: a ZMQ endpoint (``tcp://*:5601``) where the scheduler publishes its load
        every step (``load_channel.py``): what the token router reads. The serve builder sets
        it per replica.
    """

    aging_steps: int | None = None
    aging_seconds: float | None = None
    aging_drain_factor: float | None = 1.0
    max_swaps: int = 4
    order: str = "shortest"
    min_chunk_tokens: int = 0
    cuda_graph_topup: bool = True
    step_cost_fixed_tokens: float = 256.0
    step_cost_seq_tokens: float = 0.0
    learn_step_cost: bool = True
    pack_fixed_share: float = PACK_SHARE
    bin_fill_slack: float = FILL_SLACK
    record_layout: bool = False
    debug_layout: bool = False
    load_endpoint: str | None = None

    @property
    def aging(self) -> AgingBound:
        return AgingBound(self.aging_steps, self.aging_seconds, self.aging_drain_factor)

    @property
    def may_starve(self) -> bool:
        """Shortest-first with every aging bound off: a long prompt waits for as long as
        shorter ones keep arriving (a response ratio grows with the wait: "ratio" cannot)."""
        return self.order == "shortest" and self.aging == AgingBound()

    def waiting_set(self) -> WaitingSet:
        """An empty waiting set (the packing policy) with these options."""
        return WaitingSet(self.aging, self.max_swaps, self.pack_fixed_share, self.order,
                          self.bin_fill_slack)

    def step_cost_model(self, capacity: int) -> StepCostModel:
        """The step-cost model these options describe, for steps of `capacity` tokens: it probes
        where the policy's choice (``pack_fixed_share``) is still open, or where the share sets
        the bins' gaps (``bin_fill_slack`` / the share: packing always, order "shortest")."""
        gaps = self.order == "shortest" and self.bin_fill_slack > 0 and self.pack_fixed_share < 1
        return StepCostModel(self.step_cost_fixed_tokens, self.step_cost_seq_tokens, capacity,
                             learn=self.learn_step_cost, threshold=self.pack_fixed_share,
                             share_used=gaps)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> PrepackConfig:
        """Parse and validate; raises PrepackConfigError naming the offending key."""
        raw = (additional_config or {}).get(CONFIG_KEY, {})
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise PrepackConfigError(
                f"additional_config[{CONFIG_KEY!r}] must be a JSON object, got {type(raw).__name__}"
            )
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known) - set(RENAMED))
        if unknown:
            raise PrepackConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} in additional_config"
                f"[{CONFIG_KEY!r}]; known options: {', '.join(sorted(known))}"
            )
        for old, new in RENAMED.items():
            if old in raw and new in raw:
                raise PrepackConfigError(f"additional_config[{CONFIG_KEY!r}] names both "
                                         f"{new!r} and its old name {old!r}; keep {new!r}")
        values = {}
        for name, value in raw.items():
            new = RENAMED.get(name, name)
            values[new] = _check(name, value, _KINDS[new])
        if values.get("debug_layout"):
            values["record_layout"] = True
        return dataclasses.replace(cls(), **values)


class _Kind(NamedTuple):
    typ: type
    lowest: float | None = None  # lowest allowed value (a float 0: positive, unless zero_ok)
    nullable: bool = False
    highest: float | None = None
    zero_ok: bool = False
    choices: tuple[str, ...] = ()  # the values a string may take (empty: any)


_KINDS: dict[str, _Kind] = {
    "aging_steps": _Kind(int, 1, True),
    "aging_seconds": _Kind(float, 0, True),
    "aging_drain_factor": _Kind(float, 0, True),
    "max_swaps": _Kind(int, 0),
    "order": _Kind(str, choices=("shortest", "ratio")),
    "min_chunk_tokens": _Kind(int, 0),
    "cuda_graph_topup": _Kind(bool),
    "step_cost_fixed_tokens": _Kind(float, 0, zero_ok=True),
    "step_cost_seq_tokens": _Kind(float, 0, zero_ok=True),
    "learn_step_cost": _Kind(bool),
    "pack_fixed_share": _Kind(float, 0, highest=1, zero_ok=True),
    "bin_fill_slack": _Kind(float, 0, highest=0.25, zero_ok=True),
    "record_layout": _Kind(bool),
    "debug_layout": _Kind(bool),
    "load_endpoint": _Kind(str, None, True),
}


def _check(name: str, value: Any, kind: _Kind) -> Any:
    typ, lowest, nullable, highest, zero_ok, choices = kind
    where = f"additional_config[{CONFIG_KEY!r}][{name!r}]"
    if value is None:
        if nullable:
            return None
        raise PrepackConfigError(f"{where} may not be null")
    is_bool = isinstance(value, bool)
    if typ is str and not isinstance(value, str):
        raise PrepackConfigError(f"{where} must be a string, got {value!r}")
    if choices and value not in choices:
        raise PrepackConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if typ is bool and not is_bool:
        raise PrepackConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int and (is_bool or not isinstance(value, int)):
        raise PrepackConfigError(f"{where} must be an integer, got {value!r}")
    if typ is float and (is_bool or not isinstance(value, (int, float))):
        raise PrepackConfigError(f"{where} must be a number, got {value!r}")
    if typ is float and math.isinf(value):
        raise PrepackConfigError(f"{where} must be finite, got {value!r}")
    positive = lowest == 0 and typ is float and not zero_ok
    if lowest is not None and not value >= lowest:
        bound = "positive" if positive else f">= {lowest}"
        raise PrepackConfigError(f"{where} must be {bound}, got {value!r}")
    if positive and value == 0:
        raise PrepackConfigError(f"{where} must be positive, got {value!r}")
    if highest is not None and not value <= highest:
        raise PrepackConfigError(f"{where} must be <= {highest}, got {value!r}")
    return typ(value)


def plugin_engine_kwargs(engine_kwargs: Mapping[str, Any] | None = None,
                         options: Mapping[str, Any] | bool | None = True) -> dict:
    """vLLM engine arguments with the plugin switched on: what ``--scheduler-cls`` and
    ``--additional-config`` say on the command line, for ``LLM(**kwargs)``, ``AsyncEngineArgs``
    and the ``engine_kwargs`` of Ray Data LLM and Ray Serve LLM.

    `options`: the plugin's options, True or None for its defaults (or those already in
    ``engine_kwargs["additional_config"]["prepack"]``), False for plain vLLM (the arguments
    returned unchanged). Other ``additional_config`` keys are kept; it may be given as vLLM's
    command line takes it, a JSON string. The options are validated here, so a bad one fails
    before any engine or cluster starts; so does a ``scheduler_cls`` that is not the plugin's
    (or a subclass of it), which would otherwise be replaced without a word."""
    kwargs = dict(engine_kwargs or {})
    if options is False:
        return kwargs
    extra = kwargs.get("additional_config") or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError as e:
            raise PrepackConfigError(f"additional_config is not JSON ({e}): {extra!r}") from None
    if not isinstance(extra, Mapping):
        raise PrepackConfigError(f"additional_config must be a JSON object, got {type(extra).__name__}")
    extra = dict(extra)
    if options is not True and options is not None:
        extra[CONFIG_KEY] = dict(options)
    extra.setdefault(CONFIG_KEY, {})
    PrepackConfig.from_additional_config(extra)
    given = kwargs.get("scheduler_cls")
    if given is not None and not is_plugin_scheduler(given):
        raise PrepackConfigError(
            f"the engine arguments name scheduler_cls {_scheduler_name(given)!r}, and the plugin "
            f"is the scheduler ({SCHEDULER_CLS}): leave scheduler_cls out, or run plain vLLM")
    kwargs.update(scheduler_cls=given or SCHEDULER_CLS, additional_config=extra)
    return kwargs


def _scheduler_name(cls) -> str:
    if isinstance(cls, str):
        return cls
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', cls)}"


def load_object(path: str):
    """The object a dotted path names (``package.module.Name``), as vLLM and Ray Serve resolve
    a scheduler or router class given by path."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def is_plugin_scheduler(cls) -> bool:
    """Whether vLLM's ``scheduler_cls`` (a dotted path or the class) is the plugin's scheduler
    or a subclass of it. A path outside PLUGIN_SCHEDULERS is imported to be told (a user's
    subclass; this imports vLLM)."""
    if isinstance(cls, str):
        if cls in PLUGIN_SCHEDULERS:
            return True
        try:
            cls = load_object(cls)
        except (ImportError, AttributeError, ValueError):
            return False
    return any(_scheduler_name(base) in PLUGIN_SCHEDULERS for base in getattr(cls, "__mro__", ()))
