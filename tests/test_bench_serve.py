"""The live part of ``bench serve``: its workloads and options (pure; the live runs need a
cluster and take minutes, so they are benchmarks, not tests)."""

import argparse

import pytest

from vllm_prepack.bench.serve import (
    PREFIX_CHARS,
    PREFIX_GROUPS,
    config_pair,
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
    assert not runs[0] & runs[1] and not runs[1] & runs[2]  # no run warms another's caches
    assert not {p[:PREFIX_CHARS] for p in w.prompts[:start]} & runs[0]
    assert all(len(p) > PREFIX_CHARS for p in w.prompts)  # a suffix of its own each
    again = shared_prefix_workload("model", start + 3 * block, seed=0, start=start, block=block)
    assert again.prompts == w.prompts  # seeded: both configurations of a pair get the same


def test_a_pair_of_configurations_is_named_base_colon_other_and_a_bad_one_says_so():
    assert config_pair("plain+prefix:prepack+tokens") == ("plain+prefix", "prepack+tokens")
    for bad in ("plain+prefix", "plain+prefix:nope", "prepack+tokens:prepack+tokens", "a:b:c"):
        with pytest.raises(argparse.ArgumentTypeError, match="base:other"):
            config_pair(bad)
