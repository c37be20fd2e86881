"""``bench serve``: the live part's workloads and options (pure; the live runs need a cluster
and take minutes, so they are benchmarks, not tests), and a small run of the route part."""

import argparse

import pytest

from vllm_prepack.bench.serve import (
    PREFIX_CHARS,
    PREFIX_GROUPS,
    add_arguments,
    app_costs,
    check_pairs,
    config_pair,
    index_cost,
    metric_sum,
    model_name,
    route_cost,
    shared_prefix_workload,
)


def test_each_run_of_the_shared_prefix_workload_draws_on_prefixes_of_its_own():
    start, block = 10, 100
    w = shared_prefix_workload("model", start + 3 * block, seed=0, start=start, block=block)
    assert w.kind == "prefix" and w.lengths == [len(p) for p in w.prompts]
    runs = [{p[:PREFIX_CHARS] for p in w.prompts[start + k * block:start + (k + 1) * block]}
            for k in range(3)]
    for prefixes in runs:  # shared within a run: the groups recur
        assert 1 < len(prefixes) <= PREFIX_GROUPS
    assert not runs[0] & runs[1] and not runs[1] & runs[2] and not runs[0] & runs[2]
    # (no run warms another's caches)
    assert not {p[:PREFIX_CHARS] for p in w.prompts[:start]} & runs[0]
    assert all(len(p) > PREFIX_CHARS for p in w.prompts)  # a suffix of its own each
    again = shared_prefix_workload("model", start + 3 * block, seed=0, start=start, block=block)
    assert again.prompts == w.prompts  # seeded: both configurations of a pair get the same


def test_a_pair_of_configurations_is_named_base_colon_other_and_a_bad_one_says_so():
    assert config_pair("plain+prefix:prepack+tokens") == ("plain+prefix", "prepack+tokens")
    for bad in ("plain+prefix", "plain+prefix:nope", "prepack+tokens:prepack+tokens", "a:b:c"):
        with pytest.raises(argparse.ArgumentTypeError, match="base:other"):
            config_pair(bad)


def test_pairs_run_on_every_model_once_and_never_put_the_prefix_router_before_embeddings():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--pairs", "plain+prefix:prepack+tokens", "--models", "prefix"])
    assert args.pairs == [("plain+prefix", "prepack+tokens")]
    check_pairs(args.pairs, args.models)
    with pytest.raises(ValueError, match="embeddings"):
        check_pairs(args.pairs, ["embed", "prefix"])
    with pytest.raises(ValueError, match="twice"):
        check_pairs(args.pairs * 2, ["prefix"])
    assert parser.parse_args([]).pairs is None  # each model's own pairs


def test_each_configurations_share_of_cached_prompt_tokens_is_read_off_its_own_engines():
    """Ray's exposition of vLLM's counters, as the live part reads it: each configuration's
    engines by the model id it serves under."""
    ours, theirs = model_name("prefix", "prepack+tokens"), model_name("prefix", "plain+prefix")
    assert ours != theirs

    def exposition(hits, queries):
        return "\n".join(
            f'ray_vllm_prefix_cache_{name}_total{{ReplicaId="r{i}",engine="0",'
            f'model_name="{model}"}} {value}'
            for name, values in (("hits", hits), ("queries", queries))
            for model, per_replica in zip((ours, theirs), values)
            for i, value in enumerate(per_replica))

    before = exposition(hits=((10, 10), (0, 0)), queries=((50, 50), (10, 10)))
    after = exposition(hits=((410, 310), (50, 50)), queries=((550, 550), (110, 110)))

    def totals(text, model):
        return {"count": 0, "ms": 0, "routes": 0, "wall": 0, "cpu": 0, "cpu samples": 0,
                "prefix queries": metric_sum(text, "ray_vllm_prefix_cache_queries_total",
                                             model_name=model),
                "prefix hits": metric_sum(text, "ray_vllm_prefix_cache_hits_total",
                                          model_name=model)}

    assert app_costs(totals(before, ours), totals(after, ours))["prefix cache hits"] == 0.7
    assert app_costs(totals(before, theirs), totals(after, theirs))["prefix cache hits"] == 0.5


def test_the_route_bench_times_every_prompt_kind_and_its_feed_reaches_the_index():
    """Every row of a small run has its times (warm and cold), and the affinity rows a feed
    time: the feed's messages are inserted under the router's own replica keys (the bench
    raises otherwise)."""
    text = route_cost([2], requests=25, cold_requests=5)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 8  # prefix affinity off and on, four prompt kinds
    for row in rows:
        assert all(float(row[i]) > 0 for i in (4, 5, 6))  # warm CPU and wall, cold CPU
        assert (row[7].strip(" |") != "") == (row[2] == "on")


def test_the_index_bench_fills_the_index_to_each_size_and_times_its_work():
    text = index_cost([320, 640], inserts=50)
    rows = [line.strip("| ").split(" | ") for line in text.splitlines() if line[2:3].isdigit()]
    assert [int(row[0]) for row in rows] == [320, 640]  # filled, and kept at its size
    for row in rows:
        assert all(float(value) > 0 for value in row[1:])
