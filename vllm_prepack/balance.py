"""Token-balanced partitioning of a batch job across replicas: pure Python, no Ray, no vLLM.

Rows are a poor unit of work when prompt lengths vary: the replica that draws the long prompts
becomes the straggler. Here each request weighs its expected tokens (prompt + expected output),
and shards are balanced on that weight:
1. LPT (longest processing time first: each item to the least-loaded shard), a 4/3-approximation;
2. Karmarkar-Karp k-way differencing (often much closer to the optimum on many small items);
3. keep the better, then move/swap items between the heaviest and lightest shard while that
   lowers the makespan (bounded passes).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def makespan(weights: Sequence[float], shards: list[list[int]]) -> float:
    return max((sum(weights[i] for i in shard) for shard in shards), default=0.0)


def lower_bound(weights: Sequence[float], k: int) -> float:
    """No partition into k shards has a smaller makespan."""
    return max(sum(weights) / k, max(weights, default=0.0))


def lpt(weights: Sequence[float], k: int) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(k)]
    heap = [(0.0, s) for s in range(k)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, s = heapq.heappop(heap)
        shards[s].append(i)
        heapq.heappush(heap, (load + weights[i], s))
    return shards


def karmarkar_karp(weights: Sequence[float], k: int) -> list[list[int]]:
    """k-way largest differencing: merge the two partial partitions with the largest spread,
    pairing the heaviest shard of one with the lightest of the other."""
    if not weights:
        return [[] for _ in range(k)]
    heap = []
    for i, w in enumerate(weights):
        parts = [(w, [i])] + [(0.0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-w, i, parts))
    counter = len(weights)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda p: -p[0])
        b = sorted(b, key=lambda p: p[0])
        merged = [(wa + wb, ia + ib) for (wa, ia), (wb, ib) in zip(a, b)]
        spread = max(w for w, _ in merged) - min(w for w, _ in merged)
        heapq.heappush(heap, (-spread, counter, merged))
        counter += 1
    return [items for _, items in heap[0][2]]


def refine(weights: Sequence[float], shards: list[list[int]], passes: int = 200) -> list[list[int]]:
    """Move or swap single items between the heaviest and the lightest shard while it helps."""
    shards = [list(s) for s in shards]
    loads = [sum(weights[i] for i in s) for s in shards]
    for _ in range(passes):
        hi = max(range(len(shards)), key=loads.__getitem__)
        lo = min(range(len(shards)), key=loads.__getitem__)
        gap = loads[hi] - loads[lo]
        best, best_delta = None, 0.0
        for a in shards[hi]:  # move a, or swap a with b: the pair's spread shrinks by 2*delta
            for b in [None, *shards[lo]]:
                delta = weights[a] - (weights[b] if b is not None else 0.0)
                if 0 < delta < gap and delta * (gap - delta) > best_delta * (gap - best_delta):
                    best, best_delta = (a, b), delta
        if best is None:
            break
        a, b = best
        shards[hi].remove(a)
        shards[lo].append(a)
        if b is not None:
            shards[lo].remove(b)
            shards[hi].append(b)
        loads[hi] -= best_delta
        loads[lo] += best_delta
    return shards


def partition(weights: Sequence[float], k: int) -> list[list[int]]:
    """Indices of `weights` in k shards with a small makespan; each shard sorted heaviest first."""
    if k < 1:
        raise ValueError("need at least one shard")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    candidates = [lpt(weights, k), karmarkar_karp(weights, k)]
    best = min(candidates, key=lambda s: makespan(weights, s))
    best = refine(weights, best)
    return [sorted(s, key=lambda i: (-weights[i], i)) for s in best]


def row_shards(n: int, k: int) -> list[list[int]]:
    """Contiguous row shards (what Ray Data / vLLM's data-parallel example do)."""
    size = -(-n // k) if n else 0
    return [list(range(s * size, min(n, (s + 1) * size))) for s in range(k)]


def round_robin(n: int, k: int) -> list[list[int]]:
    return [list(range(s, n, k)) for s in range(k)]
