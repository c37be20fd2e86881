"""What a forward step costs, learned online from the engine's own step times: pure Python.

A step of T tokens over n sequences takes about a + b x T + c x n seconds: a is the fixed
cost (kernel launches, CUDA-graph replay, reading the weights once, the scheduler and the
engine loop), b the cost of a token of work, c that of a sequence (sampling, pooling,
attention metadata). The policy compares schedules in seconds with it (``policy.py``): where a
is small next to b x the budget (a CPU, a small model) fewer steps buy nothing and
shortest-first wins; where a is the time of hundreds of tokens (a GPU) every step saved is time
for every request still waiting.

``StepCostModel`` fits a, b, c by exponentially weighted least squares over the steps it is
shown, drawn towards a prior *shape* (a and c in tokens of work, ``StepCost.fixed_tokens``) at
the data's scale, as a Bayesian would: the prior's pull grows with the scatter of the steps
around the fit. Exact step times (the engine-free bench) recover a, b, c from any spread of
step sizes; noisy ones with little spread (a backlog of full steps) stay near the prior, and
so do collinear ones (decode-only steps, where tokens == sequences): c is only learnt where
the steps vary it apart from tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HALF_LIFE_STEPS = 512  # a step's weight halves after this many newer steps (drift)
PRIOR_SPREAD = 0.5  # the prior's line is known to +-this x a full step's time
SEQ_SPREAD = 0.05  # share of the steps' variance in sequences apart from tokens before c is fitted
PRIOR_FLOOR = 1e-6  # the prior's least weight, in steps: it settles what the steps cannot tell apart
MIN_STEPS = 16  # steps seen before the fit replaces the prior (and before outliers are clipped)
REFIT_EVERY = 16  # steps between refits: two 3x3 solves, microseconds, kept off most steps
OUTLIER_FACTOR = 4.0  # a step over this x the prediction (a GC pause, a stall) counts as this
PRIOR_TOKEN_SECONDS = 1e-5  # the scale reported before any step is seen (the policy needs none)


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds one forward step takes: fixed + per_token x tokens + per_seq x sequences."""

    fixed: float
    per_token: float
    per_seq: float = 0.0

    def seconds(self, tokens: int, seqs: int = 0) -> float:
        return self.fixed + self.per_token * tokens + self.per_seq * seqs

    @property
    def fixed_tokens(self) -> float:
        """The fixed cost in tokens of work (a / b): what the policy's choices depend on."""
        return self.fixed / self.per_token if self.per_token > 0 else math.inf

    @property
    def seq_tokens(self) -> float:
        return self.per_seq / self.per_token if self.per_token > 0 else 0.0

    @classmethod
    def in_tokens(cls, fixed_tokens: float, seq_tokens: float = 0.0, per_token: float = 1.0) -> StepCost:
        return cls(fixed_tokens * per_token, per_token, seq_tokens * per_token)


class StepCostModel:
    """The step cost in force. The prior gives its shape (a and c in tokens of work); once
    MIN_STEPS steps are seen, the weighted least-squares fit of the steps replaces it, drawn
    towards the prior. Not learning (``learn=False``), the shape stays the prior's and only
    the scale (seconds per token) follows the steps, for the figures reported.

    `capacity`: the step's token budget; the prior's pseudo-steps sit at 0 and at capacity
    tokens, so it pins the line where the engine works."""

    def __init__(self, fixed_tokens: float, seq_tokens: float, capacity: int, learn: bool = True,
                 half_life: float = HALF_LIFE_STEPS) -> None:
        if not (fixed_tokens >= 0 and seq_tokens >= 0):
            raise ValueError(f"a step-cost prior needs fixed and per-sequence tokens >= 0, got "
                             f"{fixed_tokens}, {seq_tokens}")
        self.prior = StepCost.in_tokens(fixed_tokens, seq_tokens, PRIOR_TOKEN_SECONDS)
        self.capacity = max(1, capacity)
        self.learn = learn
        self.decay = 0.5 ** (1.0 / half_life)
        self.steps = 0  # steps observed
        self._xx = [[0.0] * 3 for _ in range(3)]  # weighted sums of x x^T, x = (1, tokens, seqs)
        self._xy = [0.0] * 3
        self._yy = 0.0
        self._since_fit = 0
        self.current = self.prior

    def observe(self, tokens: int, seqs: int, seconds: float) -> None:
        """One measured step (every token and sequence of the forward, its whole time)."""
        if tokens <= 0 or not seconds > 0:
            return
        if self.steps >= MIN_STEPS:
            seconds = min(seconds, OUTLIER_FACTOR * self.current.seconds(tokens, seqs))
        x = (1.0, float(tokens), float(seqs))
        d = self.decay
        for i in range(3):
            row = self._xx[i]
            for j in range(3):
                row[j] = d * row[j] + x[i] * x[j]
            self._xy[i] = d * self._xy[i] + x[i] * seconds
        self._yy = d * self._yy + seconds * seconds
        self.steps += 1
        self._since_fit += 1
        if self.steps >= MIN_STEPS and (self._since_fit >= REFIT_EVERY or self.steps == MIN_STEPS):
            self.current = self.fit()
            self._since_fit = 0

    def fit(self) -> StepCost:
        """The weighted steps plus the prior's line at four pseudo-steps (0 and capacity tokens,
        one and capacity/64 sequences), each weighted noise variance / prior variance (at least
        PRIOR_FLOOR): the noise variance from the residuals of a fit with a negligible prior.
        c is fitted only where the steps vary their sequences apart from their tokens
        (SEQ_SPREAD); elsewhere it keeps the prior's ratio to b."""
        shape, scale = self.prior, self._scale()
        if scale is None:
            return self.prior
        if not self.learn:
            return StepCost.in_tokens(shape.fixed_tokens, shape.seq_tokens, scale)
        seqs = max(1.0, self.capacity / 64)
        pseudo = [((1.0, t, n), scale * (shape.fixed_tokens + t + shape.seq_tokens * n))
                  for t, n in ((0.0, 1.0), (self.capacity, 1.0), (self.capacity, seqs), (0.0, seqs))]
        basis = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
        if not self._seqs_vary_apart():
            basis = ((1.0, 0.0, 0.0), (0.0, 1.0, shape.seq_tokens))  # c = prior ratio x b
        spread = PRIOR_SPREAD * scale * (shape.fixed_tokens + self.capacity)
        first = self._solve(basis, pseudo, 1e-9 * self._xx[0][0])
        solved = first and self._solve(basis, pseudo, max(PRIOR_FLOOR, self._noise(first) / spread ** 2))
        if solved is None or solved[1] <= 0:  # no spread in tokens: the prior's shape
            return StepCost.in_tokens(shape.fixed_tokens, shape.seq_tokens, scale)
        a, b, c = solved
        return StepCost(max(0.0, a), b, max(0.0, c))

    def _seqs_vary_apart(self) -> bool:
        """Whether at least SEQ_SPREAD of the steps' variance in sequences is not explained by
        their tokens (1 - the weighted R^2 of sequences on tokens)."""
        xx = self._xx
        w = xx[0][0]
        var_t = xx[1][1] / w - (xx[0][1] / w) ** 2
        var_n = xx[2][2] / w - (xx[0][2] / w) ** 2
        cov = xx[1][2] / w - xx[0][1] * xx[0][2] / w ** 2
        if var_n <= 1e-12 * max(1.0, xx[2][2] / w) or var_t <= 0:
            return False
        return 1 - cov * cov / (var_t * var_n) >= SEQ_SPREAD

    def _solve(self, basis, pseudo, weight: float) -> tuple[float, float, float] | None:
        """Weighted least squares over the steps and the pseudo-steps, in the coordinates of
        `basis` (rows: combinations of a, b, c); the solution back in (a, b, c)."""
        k = len(basis)

        def project(x):
            return [sum(row[i] * x[i] for i in range(3)) for row in basis]

        xx = [[sum(basis[r][i] * self._xx[i][j] * basis[q][j] for i in range(3) for j in range(3))
               for q in range(k)] for r in range(k)]
        xy = project(self._xy)
        for x, y in pseudo:
            px = project(x)
            for r in range(k):
                for q in range(k):
                    xx[r][q] += weight * px[r] * px[q]
                xy[r] += weight * px[r] * y
        theta = _solve(xx, xy)
        if theta is None:
            return None
        return tuple(sum(basis[r][i] * theta[r] for r in range(k)) for i in range(3))

    def _noise(self, theta) -> float:
        """Weighted residual variance of the steps around `theta` (from the running sums)."""
        xx, xy = self._xx, self._xy
        rss = (self._yy - 2 * sum(t * v for t, v in zip(theta, xy))
               + sum(theta[i] * xx[i][j] * theta[j] for i in range(3) for j in range(3)))
        return max(0.0, rss) / max(1.0, xx[0][0] - 3)

    def _scale(self) -> float | None:
        """Seconds per token of prior-shaped work, from the weighted sums (a ratio of means)."""
        p = self.prior
        work = (p.fixed * self._xx[0][0] + p.per_token * self._xx[0][1]
                + p.per_seq * self._xx[0][2]) / p.per_token
        return self._xy[0] / work if work > 0 and self._xy[0] > 0 else None

    def report(self) -> dict:
        """The figures the plugin reports (log, Prometheus, layout_report)."""
        cost = self.current
        return {"fixed_s": cost.fixed, "per_token_s": cost.per_token, "per_seq_s": cost.per_seq,
                "fixed_tokens": cost.fixed_tokens, "steps": self.steps,
                "source": "fixed" if not self.learn else "fit" if self.steps >= MIN_STEPS else "prior"}


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-300:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for k in range(col, n + 1):
                a[r][k] -= f * a[col][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][k] * x[k] for k in range(r + 1, n))) / a[r][r]
    return x
