"""Property-based tests of HF row packing (no vLLM, no torch)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_prepack.packing import pack_rows


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), max_size=80), capacity=st.integers(200, 600))
def test_pack_rows_first_fit_decreasing(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    if lengths:
        # any first fit leaves at most one row half empty (FFD's 11/9 OPT bound needs OPT,
        # which the volume bound underestimates: [85, 116 x 6] in rows of 200 needs 7)
        assert len(rows) <= 2 * sum(lengths) / capacity + 1
        # two rows whose sums together fit one row are never both left open
        sums = sorted(sum(lengths[i] for i in row) for row in rows)
        assert len(sums) < 2 or sums[0] + sums[1] > capacity


def test_pack_rows_errors():
    with pytest.raises(ValueError, match="at least one token"):
        pack_rows([3, 0])
    with pytest.raises(ValueError, match="over the row capacity 10"):
        pack_rows([3, 11], capacity=10)
    assert pack_rows([]) == []
