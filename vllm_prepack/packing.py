"""Row packing for the HF path: first-fit decreasing rows and the packed layout attention reads.

Pure Python, no vLLM, no torch; tested with hypothesis. (The per-step policy inside vLLM is
``policy.py``; the benchmarks' step bounds build on ``pack_rows`` in ``bench/harness.py``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sortedcontainers import SortedList


def pack_rows(lengths: Sequence[int], capacity: int | None = None) -> list[list[int]]:
    """First-fit decreasing: indices of `lengths` packed into rows of at most `capacity` tokens.

    With no capacity the longest length is used (the paper's choice: no row grows past the
    padded batch). Rows come out in decreasing fill; each row lists its indices longest first.
    O(n log n) with a sorted index of row gaps (best fit among rows that fit).
    """
    if not lengths:
        return []
    if any(n <= 0 for n in lengths):
        raise ValueError("every prompt needs at least one token")
    capacity = max(lengths) if capacity is None else capacity
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(
            f"prompt {too_long[0]} has {lengths[too_long[0]]} tokens, over the row capacity {capacity}"
        )
    rows: list[list[int]] = []
    gaps = SortedList()  # (gap, row index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = gaps.bisect_left((lengths[i], -1))
        if at < len(gaps):
            gap, row = gaps.pop(at)
        else:
            gap, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        gaps.add((gap - lengths[i], row))
    return rows


@dataclass(frozen=True)
class PackedLayout:
    """Where each prompt sits in the packed rows: the contract between packing and attention.

    rows[r] lists the prompt indices in row r, in placement order; place[i] = (row, start) of
    prompt i. Every row is `width` tokens; the tail after a row's prompts is padding, which
    forms its own sequence so that no real token ever attends to it.
    """

    lengths: tuple[int, ...]
    rows: tuple[tuple[int, ...], ...]
    place: tuple[tuple[int, int], ...]
    width: int

    @classmethod
    def build(cls, lengths: Sequence[int], capacity: int | None = None) -> PackedLayout:
        rows = pack_rows(lengths, capacity)
        place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
        width = 0
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                place[i] = (r, start)
                start += lengths[i]
            width = max(width, start)
        return cls(tuple(lengths), tuple(map(tuple, rows)), tuple(place), width)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padded_tokens(self) -> int:
        """Tokens computed by the packed forward (rows x width)."""
        return len(self.rows) * self.width

    def positions(self) -> list[list[int]]:
        """Position ids per row: restarting at 0 for each prompt and for the padding tail."""
        out = []
        for row in self.rows:
            pos = [p for i in row for p in range(self.lengths[i])]
            out.append(pos + list(range(self.width - len(pos))))
        return out

    def sequence_ids(self) -> list[list[int]]:
        """Sequence id per token (the prompt index; -1 for padding)."""
        return [
            [i for i in row for _ in range(self.lengths[i])]
            + [-1] * (self.width - sum(self.lengths[i] for i in row))
            for row in self.rows
        ]

    def cu_seqlens(self) -> list[int]:
        """Cumulative sequence boundaries of the rows laid end to end (varlen attention)."""
        bounds = [0]
        for row in self.rows:
            for i in row:
                bounds.append(bounds[-1] + self.lengths[i])
            pad = self.width - sum(self.lengths[i] for i in row)
            if pad:
                bounds.append(bounds[-1] + pad)
        return bounds
