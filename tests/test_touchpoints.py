"""The registry of vLLM (and Ray) internals: complete, true on the installed vLLM, and the only way in."""

import ast
import logging
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vllm_prepack import touchpoints
from vllm_prepack.touchpoints import TOUCH_POINTS, How, internal

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted([*(ROOT / "vllm_prepack").rglob("*.py"), *(ROOT / "patches").glob("*.py")])
REGISTRY = ROOT / "vllm_prepack" / "touchpoints.py"
# vLLM's public modules: what its documentation shows users import
PUBLIC_VLLM = {"vllm", "vllm.sampling_params", "vllm.pooling_params", "vllm.outputs"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(tree: ast.AST):
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


@pytest.mark.parametrize("path", [p for p in PRODUCT if p != REGISTRY], ids=lambda p: p.name)
def test_only_the_registry_imports_vllm_or_ray_internals(path):
    private = sorted({m for m in _imports(_tree(path))
                      if ((m == "vllm" or m.startswith("vllm.")) and m not in PUBLIC_VLLM)
                      or (m.startswith("ray.") and any(p.startswith("_") for p in m.split(".")))})
    assert not private, f"{path.relative_to(ROOT)} imports {private}: go through touchpoints.py"


def _set_attributes(tree: ast.AST):
    """(object, attribute) of every attribute assignment and setattr() call."""
    for node in _runtime_nodes(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute):
                yield ast.unparse(target.value), target.attr
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
            yield ast.unparse(node.args[0]), "<setattr>"


def test_no_module_but_the_registry_sets_attributes_on_vllm_objects():
    """Attributes the registry lists as set or replaced on vLLM objects are set only there; the
    patch (patches/) wraps the runner's methods, the subclasses assign their own state."""
    listed = {tp.attribute.rsplit(".", 1)[-1] for tp in TOUCH_POINTS
              if tp.how in (How.SET, How.PATCH) and "." in tp.what and ":" not in tp.what}
    offenders = []
    for path in PRODUCT:
        if path == REGISTRY:
            continue
        for obj, attr in _set_attributes(_tree(path)):
            patching = path.parent.name == "patches" and obj == "runner_class"
            if (attr in listed or attr == "<setattr>" or attr.startswith("_prepack")) and not patching:
                offenders.append(f"{path.relative_to(ROOT)}: {obj}.{attr}")
    assert not offenders, offenders


def _self_reads(path: Path, classes: set[str]) -> tuple[set[str], set[str]]:
    """Attributes read as ``self.x`` in the given classes, and those they define or assign."""
    read, own = set(), set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef):
                    own.add(item.name)
                elif isinstance(item, ast.Attribute) and getattr(item.value, "id", None) == "self":
                    (own if isinstance(item.ctx, ast.Store) else read).add(item.attr)
    return read, own


def test_every_scheduler_attribute_the_plugin_reads_is_registered():
    read, own = _self_reads(ROOT / "vllm_prepack" / "scheduler.py",
                            {"PrepackScheduler", "PrepackAsyncScheduler"})
    registered = {tp.attribute for tp in TOUCH_POINTS if tp.owner == "Scheduler"}
    assert read - own - registered == set()
    assert set(touchpoints.REQUIRED_ATTRIBUTES) <= registered


def test_registered_imports_resolve_on_the_installed_vllm():
    installed = touchpoints.vllm_version()
    imports = [tp for tp in TOUCH_POINTS if ":" in tp.what]
    for tp in imports:
        if tp.read_in(installed) or not tp.what.startswith("vllm"):
            assert getattr(internal, tp.name) is not None, tp.what
    assert len({tp.name for tp in imports}) == len(imports)  # one name under internal each
    with pytest.raises(AttributeError, match="not a registered touch point"):
        internal.Unlisted  # noqa: B018


def test_the_scheduler_has_every_required_attribute(tiny_model):
    from vllm_prepack.bench.harness import standalone_scheduler

    scheduler = standalone_scheduler(tiny_model)
    assert [a for a in touchpoints.REQUIRED_ATTRIBUTES if not hasattr(scheduler, a)] == []


@pytest.mark.parametrize("version, supported", [("0.31.0", True), ("0.32.0+cpu", True),
                                                ("0.33.1", True), ("0.34.0", True),
                                                ("0.30.2", False), ("0.35.0", False),
                                                ("1.0.0", False)])
def test_version_gate(version, supported, monkeypatch):
    monkeypatch.delenv(touchpoints.ALLOW_ENV, raising=False)
    if supported:
        assert touchpoints.check_vllm_version(version) is True
        return
    with pytest.raises(touchpoints.UnsupportedVLLM) as err:
        touchpoints.check_vllm_version(version)
    message = str(err.value)
    assert "\n" not in message and ">=0.31,<0.35" in message and touchpoints.ALLOW_ENV in message
    assert version in message


def test_an_untested_vllm_runs_only_when_allowed_and_then_checks_every_step(tiny_model, monkeypatch,
                                                                            caplog):
    """The engine-start path: refused in one line; with the variable set, a warning, and the
    budget mirror checked on every step."""
    import vllm

    from vllm_prepack.bench.harness import fake_step, make_request, standalone_scheduler

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    monkeypatch.delenv(touchpoints.ALLOW_ENV, raising=False)
    with pytest.raises(touchpoints.UnsupportedVLLM, match="not 0.99.0"):
        standalone_scheduler(tiny_model, verify=False)
    monkeypatch.setenv(touchpoints.ALLOW_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="vllm_prepack"):
        scheduler = standalone_scheduler(tiny_model, verify=None)  # the plugin's own choice
    assert touchpoints.ALLOW_ENV in caplog.text and "0.99.0" in caplog.text
    assert scheduler.verify_budget is True
    scheduler.add_request(make_request("r", 40, max_tokens=3))
    while scheduler.has_requests():
        fake_step(scheduler, scheduler.schedule())
    assert scheduler.prepack_stats.budget_checks == scheduler.prepack_stats.steps > 0


def test_registry_entries_are_complete():
    for tp in TOUCH_POINTS:
        assert tp.where and tp.checked, tp
        assert ":" in tp.what or "." in tp.what, tp
    assert touchpoints.TESTED_VLLM == ("0.31.0", "0.32.0", "0.33.0", "0.34.0")


@example(16, 0, 1, [(15, 2)] * 64)  # each request straddles a block boundary: 2 blocks for 2 tokens
@given(st.integers(1, 64), st.integers(0, 8), st.integers(1, 4096),
       st.lists(st.tuples(st.integers(0, 4096), st.integers(1, 4096)), min_size=1, max_size=64))
def test_no_admission_needs_more_blocks_than_the_step_bound(block_size, lookahead, max_len, requests):
    """The bound under which the plan checks no request's blocks: requests whose uncached
    tokens fit the step, and one chunked prompt of any length up to max_len, never need more."""
    kv = touchpoints.KVBlocks(block_size, lookahead)
    (cached, uncached), *whole = requests
    length = min(cached + uncached, max_len)  # the chunked one: a token this step, at least
    need = kv.to_admit(length, min(uncached, length))
    need += sum(kv.to_admit(cached + uncached, uncached) for cached, uncached in whole)
    tokens = sum(uncached for _, uncached in whole) + 1
    assert need <= kv.most_to_admit(tokens, len(requests), max_len)


def test_running_load_counts_as_decoding_only_requests_with_tokens_still_to_come():
    """Right after schedule(): a prompt not yet through counts its tokens left; a request whose
    step yields its last token (a pooling request's max_tokens is 1) finishes, and does not."""
    from types import SimpleNamespace as R

    running = [R(num_prompt_tokens=100, num_computed_tokens=60, max_tokens=8, num_output_tokens=0),
               R(num_prompt_tokens=10, num_computed_tokens=10, max_tokens=1, num_output_tokens=0),
               R(num_prompt_tokens=10, num_computed_tokens=12, max_tokens=8, num_output_tokens=7),
               R(num_prompt_tokens=10, num_computed_tokens=15, max_tokens=8, num_output_tokens=5)]
    assert touchpoints.running_load(R(running=running)) == (40, 1)


@pytest.mark.parametrize("cadence", [False, True], ids=["before-0.33", "0.33-on"])
def test_prefills_are_deferred_only_when_throttled_or_within_the_local_interval(monkeypatch, cadence):
    """The mirror of vLLM's deferral of new prefills (DP throttling; from 0.33 the local
    prefill cadence): a step of prefill chunks only, or one bound by prefill capacity, is
    never deferred; where nothing can defer, the running requests are not scanned."""
    from types import SimpleNamespace

    monkeypatch.setattr(touchpoints, "_at_least", lambda minor: cadence)
    chunk, decode = SimpleNamespace(is_prefill_chunk=True), SimpleNamespace(is_prefill_chunk=False)

    class Unscanned:
        def __iter__(self):
            raise AssertionError("the running requests were scanned")

    def scheduler(running=(decode,), bound=False, interval=1, last_prefill=10):
        return SimpleNamespace(running=running if isinstance(running, Unscanned) else list(running),
                               prefill_capacity_bound=bound, local_prefill_interval=interval,
                               num_executed_steps=10, last_prefill_step=last_prefill)

    assert not touchpoints.prefills_deferred(scheduler(running=Unscanned()), False)
    assert touchpoints.prefills_deferred(scheduler(), True)
    assert not touchpoints.prefills_deferred(scheduler(running=(chunk,)), True)
    assert not touchpoints.prefills_deferred(scheduler(bound=True), True)
    # the step after a prefill, with a prefill every 4 steps: deferred from 0.33 on
    assert touchpoints.prefills_deferred(scheduler(interval=4), False) == cadence
    assert not touchpoints.prefills_deferred(scheduler(interval=4, last_prefill=7), False)
    assert not touchpoints.prefills_deferred(scheduler(running=(chunk,), interval=4), False)


def test_check_waiting_order_refuses_what_reorders_waiting_past_the_plugin():
    from types import SimpleNamespace as S

    config = S(max_num_inflight_kv_loads=None)
    touchpoints.check_waiting_order(S(scheduler_config=config))  # before 0.34: neither exists
    touchpoints.check_waiting_order(S(scheduler_config=config, cache_aware_window=0))
    with pytest.raises(ValueError, match="set cache_aware_admission_window to 0"):
        touchpoints.check_waiting_order(S(scheduler_config=config, cache_aware_window=8))
    loads = S(max_num_inflight_kv_loads=4)
    touchpoints.check_waiting_order(S(scheduler_config=loads, connector=None))  # no async loads
    with pytest.raises(ValueError, match="max_num_inflight_kv_loads"):
        touchpoints.check_waiting_order(S(scheduler_config=loads, connector=object()))


@pytest.mark.skipif(touchpoints.vllm_version() < (0, 34),
                    reason="cache-aware admission is new in vLLM 0.34")
def test_the_plugin_refuses_cache_aware_admission_at_engine_start(tiny_model):
    from vllm_prepack.bench.harness import standalone_scheduler

    with pytest.raises(ValueError, match="set cache_aware_admission_window to 0"):
        standalone_scheduler(tiny_model, scheduler="prepack", prefix_caching=True,
                             cache_aware_admission_window=8)
    standalone_scheduler(tiny_model, scheduler="prepack", prefix_caching=True)  # 0: the default


@pytest.mark.parametrize("chunked", [True, False])
def test_long_prefill_threshold_applies_only_with_chunked_prefill_from_0_34(chunked, monkeypatch):
    from types import SimpleNamespace as S

    scheduler = S(scheduler_config=S(enable_chunked_prefill=chunked, long_prefill_token_threshold=64))
    for newer in (False, True):
        monkeypatch.setattr(touchpoints, "_at_least", lambda minor, newer=newer: newer)
        assert touchpoints.long_prefill_threshold(scheduler) == (64 if chunked or not newer else 0)


def test_the_budget_cap_lowers_one_schedule_and_restores_it_if_that_raises():
    from types import SimpleNamespace

    scheduler = SimpleNamespace(max_num_scheduled_tokens=1024)
    with touchpoints.token_budget_cap(scheduler, 512):
        assert scheduler.max_num_scheduled_tokens == 512
    with pytest.raises(RuntimeError), touchpoints.token_budget_cap(scheduler, 256):
        assert scheduler.max_num_scheduled_tokens == 256
        raise RuntimeError("schedule() failed")
    assert scheduler.max_num_scheduled_tokens == 1024
    with touchpoints.token_budget_cap(scheduler, None):  # no probe: untouched
        assert scheduler.max_num_scheduled_tokens == 1024
