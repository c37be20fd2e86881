"""Token-balanced partitioning (pure, hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_prepack.balance import (
    karmarkar_karp,
    lower_bound,
    lpt,
    makespan,
    partition,
    round_robin,
    row_shards,
)

weights_st = st.lists(st.integers(1, 5000), max_size=120)


@settings(max_examples=300, deadline=None)
@given(weights=weights_st, k=st.integers(1, 8))
def test_every_item_assigned_once_and_lpt_bound(weights, k):
    shards = partition(weights, k)
    assert len(shards) == k
    assert sorted(i for s in shards for i in s) == list(range(len(weights)))
    if weights:
        # never worse than LPT, which is within 4/3 - 1/(3k) of the optimum
        assert makespan(weights, shards) <= makespan(weights, lpt(weights, k))
        assert makespan(weights, shards) >= lower_bound(weights, k) - 1e-9
    for s in shards:  # heaviest first inside a shard
        assert [weights[i] for i in s] == sorted((weights[i] for i in s), reverse=True)


@settings(max_examples=200, deadline=None)
@given(weights=weights_st, k=st.integers(1, 6))
def test_karmarkar_karp_assigns_everything(weights, k):
    shards = karmarkar_karp(weights, k)
    assert sorted(i for s in shards for i in s) == list(range(len(weights)))


def test_many_items_balance_close_to_ideal():
    import random

    rng = random.Random(0)
    weights = [rng.lognormvariate(4, 1) for _ in range(2000)]
    shards = partition(weights, 4)
    assert makespan(weights, shards) <= 1.001 * lower_bound(weights, 4)
    assert makespan(weights, row_shards(2000, 4)) > makespan(weights, shards)


def test_row_and_round_robin_shards():
    assert row_shards(5, 2) == [[0, 1, 2], [3, 4]]
    assert round_robin(5, 2) == [[0, 2, 4], [1, 3]]
    assert row_shards(0, 3) == [[], [], []]


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one shard"):
        partition([1], 0)
    with pytest.raises(ValueError, match=">= 0"):
        partition([1, -2], 2)
