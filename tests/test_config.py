"""PrepackConfig parsing (pure, no vLLM)."""

import pytest

from vllm_prepack.config import PrepackConfig, PrepackConfigError
from vllm_prepack.policy import FILL_SLACK


def parse(options):
    return PrepackConfig.from_additional_config({"prepack": options})


def test_defaults_when_absent():
    assert PrepackConfig.from_additional_config(None) == PrepackConfig()
    assert PrepackConfig.from_additional_config({"other_plugin": {}}) == PrepackConfig()
    assert parse(None) == PrepackConfig()


def test_values_are_parsed_and_typed():
    c = parse({"aging_steps": None, "aging_seconds": 2, "max_swaps": 0, "debug_layout": True,
               "aging_drain_factor": None})
    assert c.aging_steps is None and c.aging_seconds == 2.0 and isinstance(c.aging_seconds, float)
    assert c.aging_drain_factor is None and PrepackConfig().aging.drain_factor == 1.0
    assert c.max_swaps == 0
    assert c.debug_layout and c.record_layout  # checking the layout needs recording it
    assert c.aging.steps is None and c.aging.seconds == 2.0
    assert parse({"order": "ratio"}).order == "ratio"
    assert parse({"chunked_order": "ratio"}).order == "ratio"  # its old name
    assert PrepackConfig().order == "shortest"


def test_only_shortest_first_without_an_aging_bound_may_starve():
    assert parse({"aging_drain_factor": None}).may_starve  # the scheduler warns (test_scheduler)
    assert not parse({"aging_drain_factor": None, "order": "ratio"}).may_starve  # a ratio grows
    assert not parse({"aging_drain_factor": None, "aging_steps": 64}).may_starve
    assert not parse({}).may_starve


@pytest.mark.parametrize(
    "options, message",
    [
        ({"aging_steps": 0}, r"\['aging_steps'\] must be >= 1, got 0"),
        ({"aging_steps": 1.5}, r"\['aging_steps'\] must be an integer"),
        ({"aging_steps": True}, r"\['aging_steps'\] must be an integer"),
        ({"aging_seconds": 0}, r"\['aging_seconds'\] must be positive"),
        ({"aging_seconds": -1.0}, r"\['aging_seconds'\] must be positive"),
        ({"aging_seconds": "1"}, r"\['aging_seconds'\] must be a number"),
        ({"aging_drain_factor": 0}, r"\['aging_drain_factor'\] must be positive"),
        ({"aging_drain_factor": "1"}, r"\['aging_drain_factor'\] must be a number"),
        ({"max_swaps": -1}, r"\['max_swaps'\] must be >= 0"),
        ({"max_swaps": None}, r"\['max_swaps'\] may not be null"),
        ({"min_chunk_tokens": -5}, r"\['min_chunk_tokens'\] must be >= 0"),
        ({"debug_layout": "yes"}, r"\['debug_layout'\] must be true or false"),
        ({"pack_fixed_share": 1.5}, r"\['pack_fixed_share'\] must be <= 1, got 1.5"),
        ({"pack_fixed_share": -0.1}, r"\['pack_fixed_share'\] must be >= 0"),
        ({"bin_fill_slack": 0.3}, r"\['bin_fill_slack'\] must be <= 0.25, got 0.3"),
        ({"bin_fill_slack": -0.5}, r"\['bin_fill_slack'\] must be >= 0"),
        ({"step_cost_fixed_tokens": -1}, r"\['step_cost_fixed_tokens'\] must be >= 0"),
        ({"step_cost_fixed_tokens": float("inf")}, r"\['step_cost_fixed_tokens'\] must be finite"),
        ({"step_cost_seq_tokens": float("nan")}, r"\['step_cost_seq_tokens'\] must be >= 0"),
        ({"learn_step_cost": 1}, r"\['learn_step_cost'\] must be true or false"),
        ({"load_endpoint": 5601}, r"\['load_endpoint'\] must be a string"),
        ({"order": "hrrn"}, r"\['order'\] must be one of 'shortest', 'ratio', got 'hrrn'"),
        ({"chunked_order": "hrrn"}, r"\['chunked_order'\] must be one of 'shortest', 'ratio'"),
        ({"chunked_order": "ratio", "order": "ratio"},
         r"names both 'order' and its old name 'chunked_order'; keep 'order'"),
        ({"nope": 1, "aging": 2}, r"unknown option\(s\) 'aging', 'nope'.*known options: aging_drain_factor, aging_seconds"),
    ],
)
def test_bad_values_name_the_key(options, message):
    with pytest.raises(PrepackConfigError, match=message):
        parse(options)


def test_step_cost_options_reach_the_model():
    config = parse({"step_cost_fixed_tokens": 0, "step_cost_seq_tokens": 8, "learn_step_cost": False,
                    "pack_fixed_share": 0})
    model = config.step_cost_model(2048)
    assert model.prior.fixed_tokens == 0 and model.prior.seq_tokens == pytest.approx(8)
    assert not model.learn and model.capacity == 2048 and config.pack_fixed_share == 0.0
    assert model.threshold is None  # not learning: nothing to probe
    assert parse({"pack_fixed_share": 0.3}).step_cost_model(1024).threshold == 0.3
    # packing always: the share is still probed where it sets the bins' gaps
    for options, used in (({}, True), ({"bin_fill_slack": 0}, False), ({"order": "ratio"}, False),
                          ({"learn_step_cost": False}, False)):
        model = parse({"pack_fixed_share": 0, **options}).step_cost_model(1024)
        assert model.threshold is None and model.share_used == used, options
    assert not parse({"pack_fixed_share": 1}).step_cost_model(1024).share_used


def test_the_packing_options_reach_the_waiting_set():
    waiting = parse({"pack_fixed_share": 0.1, "bin_fill_slack": 0.06, "max_swaps": 2,
                     "order": "ratio", "aging_steps": 9}).waiting_set()
    assert (waiting.pack_share, waiting.fill_slack, waiting.max_swaps) == (0.1, 0.06, 2)
    assert waiting.by_ratio and waiting.aging.steps == 9
    assert parse({}).waiting_set().fill_slack == FILL_SLACK


def test_bin_fill_slack_takes_its_bounds_as_floats():
    assert parse({"bin_fill_slack": 0}).bin_fill_slack == 0.0
    assert isinstance(parse({"bin_fill_slack": 0}).bin_fill_slack, float)
    assert parse({"bin_fill_slack": 0.25}).waiting_set().fill_slack == 0.25


def test_non_object_is_refused():
    with pytest.raises(PrepackConfigError, match=r"additional_config\['prepack'\] must be a JSON object"):
        PrepackConfig.from_additional_config({"prepack": [1, 2]})


def test_plugin_engine_kwargs_switch_the_plugin_on_and_check_the_options_first():
    from vllm_prepack.config import SCHEDULER_CLS, plugin_engine_kwargs

    base = {"max_model_len": 256, "additional_config": {"other": 1, "prepack": {"aging_steps": 3}}}
    for defaults in (True, None):  # the options already given stay
        kwargs = plugin_engine_kwargs(base, defaults)
        assert kwargs["scheduler_cls"] == SCHEDULER_CLS and kwargs["max_model_len"] == 256
        assert kwargs["additional_config"] == base["additional_config"]
    assert plugin_engine_kwargs(base, False) == base  # plain vLLM
    mine = plugin_engine_kwargs(base, {"max_swaps": 0})["additional_config"]
    assert mine == {"other": 1, "prepack": {"max_swaps": 0}}  # given options replace them
    as_cli = plugin_engine_kwargs({"additional_config": '{"prepack": {"order": "ratio"}}'})
    assert as_cli["additional_config"] == {"prepack": {"order": "ratio"}}
    with pytest.raises(PrepackConfigError, match="additional_config is not JSON"):
        plugin_engine_kwargs({"additional_config": "{prepack"})
    with pytest.raises(PrepackConfigError, match=r"\['max_swaps'\] must be >= 0"):
        plugin_engine_kwargs(None, {"max_swaps": -1})
    # another scheduler in the engine arguments is refused, not silently replaced; the
    # plugin's own (its async variant, or as a class) is kept
    with pytest.raises(PrepackConfigError, match="scheduler_cls 'my.Scheduler'.*leave scheduler_cls out"):
        plugin_engine_kwargs({"scheduler_cls": "my.Scheduler"})
    with pytest.raises(PrepackConfigError, match=r"scheduler_cls 'builtins\.dict'"):
        plugin_engine_kwargs({"scheduler_cls": dict})
    assert plugin_engine_kwargs({"scheduler_cls": "vllm_prepack.PrepackAsyncScheduler"})[
        "scheduler_cls"] == "vllm_prepack.PrepackAsyncScheduler"
    assert plugin_engine_kwargs({"scheduler_cls": "my.Scheduler"}, False)["scheduler_cls"] == "my.Scheduler"


def test_the_plugins_scheduler_is_told_by_name_class_or_subclass():
    from vllm_prepack.config import is_plugin_scheduler
    from vllm_prepack.scheduler import PrepackAsyncScheduler, PrepackScheduler

    class Mine(PrepackScheduler):
        pass

    for cls in ("vllm_prepack.PrepackScheduler", "vllm_prepack.scheduler.PrepackAsyncScheduler",
                PrepackScheduler, PrepackAsyncScheduler, Mine, "tests.test_config.MyScheduler"):
        assert is_plugin_scheduler(cls), cls
    for cls in ("vllm_prepack.bench.baselines.SPFScheduler", "vllm.v1.core.sched.scheduler.Scheduler",
                "no.such.Scheduler", "Scheduler", dict):
        assert not is_plugin_scheduler(cls), cls


def __getattr__(name):  # MyScheduler: a user's subclass named by its path
    if name == "MyScheduler":
        from vllm_prepack.scheduler import PrepackScheduler

        return type("MyScheduler", (PrepackScheduler,), {})
    raise AttributeError(name)
