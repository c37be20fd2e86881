"""Seeded synthetic prompt lengths shaped like the paper's datasets (no dataset or network needed).

Each shape is a lognormal tuned so that its in-batch max/mean length ratio matches the one
PREPACKING.md gives for the real dataset (the quantity prepacking's gain tracks); ``bimodal`` is a
chat + long-document mix. Every figure computed from these says "synthetic" where reported.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    mu: float
    sigma: float
    cap: int
    target_ratio: float  # the dataset's in-batch max/mean ratio (PREPACKING.md)
    at_batch: int

    def sample(self, rng: random.Random) -> int:
        return max(1, min(self.cap, round(rng.lognormvariate(self.mu, self.sigma))))


SHAPES: dict[str, Shape] = {
    "mmlu": Shape(3.9, 0.8, 1024, 6.0, 64),  # the anchor's lognormal(3.9, 0.8) capped at 1024
    "wikitext512": Shape(4.7, 0.7, 512, 3.5, 64),
    "alpaca": Shape(4.0, 0.5, 1024, 2.9, 64),
    "wikitext256": Shape(4.5, 0.35, 256, 2.2, 64),
    "samsum": Shape(4.8, 0.55, 1024, 2.8, 32),
    "hh-rlhf": Shape(4.3, 0.6, 1024, 2.9, 32),
    "heavytail": Shape(3.5, 1.3, 2048, math.nan, 64),  # a log-normal heavy tail nobody tuned for
}
# Mixtures of uniform length ranges: (share, shortest, longest)
MIXES: dict[str, tuple[tuple[float, int, int], ...]] = {
    # a MiniLM embedding job: short queries, passages, long passages
    "trimodal": ((0.5, 6, 30), (0.3, 90, 130), (0.2, 200, 252)),
    # every prompt a large part of a 1024 budget: no schedule reaches ceil(tokens / budget)
    "narrow": ((1.0, 300, 340),),
}
BIMODAL_LONG_SHARE = 0.15
WORKLOADS = (*SHAPES, "bimodal", *MIXES)


def prompt_lengths(name: str, n: int, seed: int = 0, max_len: int | None = None) -> list[int]:
    """`n` seeded prompt lengths of workload `name`, each at most `max_len`."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(f"{name}:{seed}")
    if name == "bimodal":
        out = [
            rng.randint(600, 1500) if rng.random() < BIMODAL_LONG_SHARE
            else max(1, round(rng.lognormvariate(3.4, 0.5)))
            for _ in range(n)
        ]
    elif name in SHAPES:
        out = [SHAPES[name].sample(rng) for _ in range(n)]
    elif name in MIXES:
        out = [_mix_sample(MIXES[name], rng) for _ in range(n)]
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if max_len is not None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        out = [min(x, max_len) for x in out]
    return out


def _mix_sample(mix: tuple[tuple[float, int, int], ...], rng: random.Random) -> int:
    u = rng.random()
    for share, lo, hi in mix:
        if u < share:
            break
        u -= share
    return rng.randint(lo, hi)


def batch_ratio(lengths: list[int], batch: int) -> float:
    """Mean over consecutive batches of max/mean length: the padding ratio of padded batching."""
    ratios = []
    for i in range(0, len(lengths) - batch + 1, batch):
        chunk = lengths[i : i + batch]
        ratios.append(max(chunk) * len(chunk) / sum(chunk))
    return sum(ratios) / len(ratios) if ratios else math.nan


def token_ids(lengths: list[int], vocab_size: int, seed: int = 0, first_id: int = 3) -> list[list[int]]:
    """Seeded random token-id prompts of the given lengths (ids >= first_id skip specials)."""
    rng = random.Random(seed)
    return [[rng.randrange(first_id, vocab_size) for _ in range(n)] for n in lengths]
