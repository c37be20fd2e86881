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
the steps vary it apart from tokens. A backlog's full steps do, as their prompts per step fall
while the prompts lengthen, but whatever else changes along the backlog (first kernels for new
shapes, warming caches) then reads as a per-sequence cost too and takes part of a: only steps
of other sizes (a probe) tell a apart. An engine's first steps (first kernels, lazy allocations)
are left out, and so are far slower ones before the first fit: a backlog's first steps carry
its many short prompts, and a slow one there reads as a per-sequence cost and hides a.

The policy's choice turns on where a's share of a full step (its tokens' and its sequences'
cost counted) crosses a threshold (``pack_fixed_share``): it packs from ``policy.PACK_Z`` of
the share's standard deviations (``fitted_share_sd``) above it until as many below. Where the
fit cannot yet tell which side of it the share lies (a backlog of full steps: a + b x budget +
c x its sequences is known, its split is the prior's and the drift's), the model asks for one
smaller step, a probe (``probe_tokens``): its time sets a apart from the work. Packing always
(no threshold), the bins' gaps still follow the share's value (``policy.py``, the gap credit):
there it probes until the steps spread. On a CPU a half
step costs nothing (steps cost their tokens); on a GPU at most one a each, and probes are few
(PROBE_LIMIT), spaced out, and only on a deep backlog (PROBE_BACKLOG_STEPS).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

HALF_LIFE_STEPS = 512  # a step's weight halves after this many newer steps (drift)
PRIOR_SPREAD = 0.5  # the prior's line is known to +-this x a full step's time
SEQ_SPREAD = 0.05  # share of the steps' variance in sequences apart from tokens before c is fitted
PRIOR_FLOOR = 1e-6  # the prior's least weight, in steps: it settles what the steps cannot tell apart
MIN_STEPS = 16  # steps seen before the fit replaces the prior (and before outliers are clipped)
WARMUP_STEPS = 4  # an engine's first measured steps, left out: first kernels, lazy allocations
REFIT_EVERY = 16  # steps between refits: two 3x3 solves, microseconds, kept off most steps
OUTLIER_FACTOR = 4.0  # a step over this x the prediction (a GC pause, a stall) counts as this
PRIOR_TOKEN_SECONDS = 1e-5  # the scale reported before any step is seen (the policy needs none)
LEAST_TOKEN_COST = 1e-6  # b where the steps read b <= 0, x the prior-shaped token cost
PROBE_SHARE = 0.5  # a probe step's tokens, x the step budget
PROBE_Z = 2.0  # decided: the threshold lies this many standard deviations from the fitted share
TOKEN_SPREAD = 0.02  # and the steps' tokens spread by this x the budget (weighted standard
# deviation): without it the fit's a / b split is the prior's and whatever drifts along a
# backlog, however narrow its standard deviation reads. A half-budget probe keeps it for about
# 450 full steps (of the ~740 the weights span), so a long backlog of full steps probes again
# about that often: a probe's half step is about 0.1% of the steps'
PROBE_EVERY = REFIT_EVERY  # steps at least between two probes
PROBE_LIMIT = 4.0  # probes in a burst (a count decayed as the steps' weights are): a share that
# sits on the threshold, where either choice costs about the same, then gets one per ~212 steps
PROBE_BACKLOG_STEPS = 32  # full steps' worth of prompts waiting before a probe: packing saves
# 2-8% of a backlog's steps (BENCHMARKS.md), 0.6-2.6 of 32; a probe's half step adds at most one
# step's fixed cost to the backlog, half of one on average


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds one forward step takes: fixed + per_token x tokens + per_seq x sequences.
    `seqs_per_token`: the sequences a token of work brings, on the steps the cost was fitted
    on (a full step of T tokens holds about T x that many), for ``fixed_share``."""

    fixed: float
    per_token: float
    per_seq: float = 0.0
    seqs_per_token: float = 0.0

    def seconds(self, tokens: int, seqs: int = 0) -> float:
        return self.fixed + self.per_token * tokens + self.per_seq * seqs

    def fixed_share(self, tokens: int) -> float:
        """a's share of the cost of a step of `tokens` and its sequences, a / (a + (b + c x
        seqs_per_token) x tokens): 1 where work costs nothing. With the sequences counted, the
        share does not hang on how the fit splits a step's work between b and c: a backlog's
        steps, each as full as the last, with prompts per step falling as they lengthen, do
        not tell the two apart (a probe halves both)."""
        whole = self.fixed + (self.per_token + self.per_seq * self.seqs_per_token) * tokens
        return self.fixed / whole if whole > 0 else 1.0

    @property
    def fixed_tokens(self) -> float:
        """The fixed cost in tokens of work (a / b): what the policy's choices depend on."""
        return self.fixed / self.per_token if self.per_token > 0 else math.inf

    @property
    def seq_tokens(self) -> float:
        return self.per_seq / self.per_token if self.per_token > 0 else 0.0

    @classmethod
    def in_tokens(cls, fixed_tokens: float, seq_tokens: float = 0.0, per_token: float = 1.0,
                  seqs_per_token: float = 0.0) -> StepCost:
        return cls(fixed_tokens * per_token, per_token, seq_tokens * per_token, seqs_per_token)


class StepCostModel:
    """The step cost in force. The prior gives its shape (a and c in tokens of work); once
    MIN_STEPS steps are seen, the weighted least-squares fit of the steps replaces it, drawn
    towards the prior. Not learning (``learn=False``), the shape stays the prior's and only
    the scale (seconds per token) follows the steps, for the figures reported.

    `capacity`: the step's token budget; the prior's pseudo-steps sit at 0 and at capacity
    tokens, so it pins the line where the engine works. `threshold`: the share of a full step's
    cost in a about which the policy's choice turns (strictly between 0 and 1). `share_used`: the
    policy acts on the share's value, not only on its side (the bins' gap credit): where no
    choice is open (packing always), it is probed until the steps spread. Else never probed.
    `warmup`: the first steps left out."""

    def __init__(self, fixed_tokens: float, seq_tokens: float, capacity: int, learn: bool = True,
                 half_life: float = HALF_LIFE_STEPS, threshold: float | None = None,
                 share_used: bool = False, warmup: int = WARMUP_STEPS) -> None:
        if not (0 <= fixed_tokens < math.inf and 0 <= seq_tokens < math.inf):
            raise ValueError(f"a step-cost prior needs finite fixed and per-sequence tokens >= 0, "
                             f"got {fixed_tokens}, {seq_tokens}")
        self.capacity = max(1, capacity)
        self._prior_seqs = max(1.0, self.capacity / 64)  # a full step's, in the prior's line
        self.prior = StepCost.in_tokens(fixed_tokens, seq_tokens, PRIOR_TOKEN_SECONDS,
                                        self._prior_seqs / self.capacity)
        self.learn = learn
        self.decay = 0.5 ** (1.0 / half_life)
        self.steps = 0  # steps observed
        self._xx = [[0.0] * 3 for _ in range(3)]  # weighted sums of x x^T, x = (1, tokens, seqs)
        self._xy = [0.0] * 3
        self._yy = 0.0
        self._full = [0.0, 0.0]  # weighted tokens and sequences of steps of half the budget or more
        self._since_fit = 0
        self.current = self.prior
        self.share_sd = math.inf  # standard deviation of the fitted share (a's of a full step)
        open_choice = learn and threshold is not None and 0 < threshold < 1
        self.threshold = threshold if open_choice else None
        self.share_used = learn and share_used
        self._probed = self.threshold is not None or self.share_used  # else always decided
        self.probes = 0  # probe steps asked for
        self._recent_probes = 0.0  # decayed as the steps' weights are
        self._since_probe = PROBE_EVERY
        self._probe_cap: int | None = None  # a probe asked for and not yet fitted: its cap
        self._warmup = warmup  # an engine's first steps still to leave out
        self._first: list[tuple[int, int, float]] | None = []  # held until MIN_STEPS

    def observe(self, tokens: int, seqs: int, seconds: float) -> None:
        """One measured step (every token and sequence of the forward, its whole time). The
        first WARMUP_STEPS are left out; the next MIN_STEPS are held and counted together, less
        any far slower than the rest (``_typical``); later ones are clipped at OUTLIER_FACTOR x
        the fit's prediction."""
        if tokens <= 0 or not seconds > 0:
            return
        if self._warmup > 0:
            self._warmup -= 1
            return
        self.steps += 1
        self._since_probe += 1
        self._recent_probes *= self.decay
        if self._first is not None:
            self._first.append((tokens, seqs, seconds))
            if len(self._first) < MIN_STEPS:
                return
            first, self._first = self._first, None
            for step in _typical(first):
                self._add(*step)
        else:
            clipped = min(seconds, OUTLIER_FACTOR * self.current.seconds(tokens, seqs))
            self._add(tokens, seqs, clipped)
            self._since_fit += 1
            # a probe's step is fitted at once; with async scheduling steps are observed a step
            # after the next is scheduled, so it is known by its size, not by its turn
            probe = self._probe_cap is not None and tokens <= self._probe_cap
            if self._since_fit < REFIT_EVERY and not probe:
                return
            if probe:
                self._probe_cap = None
        self.current, self.share_sd = self.fit()
        self._since_fit = 0

    def _add(self, tokens: int, seqs: int, seconds: float) -> None:
        """A step into the weighted sums, the older ones decayed by a step."""
        x = (1.0, float(tokens), float(seqs))
        d = self.decay
        for i in range(3):
            row = self._xx[i]
            for j in range(3):
                row[j] = d * row[j] + x[i] * x[j]
            self._xy[i] = d * self._xy[i] + x[i] * seconds
        self._yy = d * self._yy + seconds * seconds
        if tokens >= PROBE_SHARE * self.capacity:  # a full step's sequences, not a decode step's
            self._full = [d * self._full[0] + tokens, d * self._full[1] + seqs]
        else:
            self._full = [d * self._full[0], d * self._full[1]]

    @property
    def learning(self) -> bool:
        """Whether the cost in force is still the prior's guess: learning, before MIN_STEPS."""
        return self.learn and self._first is not None

    def share(self) -> float:
        """a's share of a full step's cost under the fit in force."""
        return self.current.fixed_share(self.capacity)

    def fitted_share_sd(self) -> float:
        """The share's standard deviation where the fit gives one and the policy's choice is
        open, else 0: the prior's share (until the fit has its steps), a fixed cost, packing
        always or never are acted on as given."""
        return self.share_sd if self.threshold is not None and self.share_sd < math.inf else 0.0

    def decided(self) -> bool:
        """Whether the fit tells which side of the threshold the share lies: PROBE_Z sd away,
        from steps of different sizes (TOKEN_SPREAD). Steps all about as full are not: a
        backlog's prompts per step fall as its prompts lengthen, and anything else that changes
        along it (first kernels for new shapes, warming caches) reads as a per-sequence cost and
        moves a, with a standard deviation that only counts the noise. (Steps of whole prompts
        whose fills vary by a long prompt's length can spread enough without a probe.) With no
        threshold, the steps' spread alone where the share's value is used (``share_used``)."""
        if not self._probed:
            return True
        spread = self._token_spread() >= TOKEN_SPREAD * self.capacity
        if self.threshold is None:
            return spread
        return spread and abs(self.share() - self.threshold) >= PROBE_Z * self.share_sd

    def probe_tokens(self, waiting_tokens: int) -> int | None:
        """The token cap of a probe step to run next, or None: only once the fit has its steps
        (MIN_STEPS) and still cannot decide, and only while PROBE_BACKLOG_STEPS full steps of
        prompts wait (`waiting_tokens`), where what packing saves pays for the probe; never
        before the last probe is fitted. At most one per PROBE_EVERY steps, PROBE_LIMIT in a
        burst, then about one per 212 steps while still undecided."""
        if (not self._probed or self.steps < MIN_STEPS or self._since_probe < PROBE_EVERY
                or self._probe_cap is not None or self.capacity < 2
                or waiting_tokens < PROBE_BACKLOG_STEPS * self.capacity
                or self._recent_probes > PROBE_LIMIT - 1 or self.decided()):
            return None
        self._since_probe = 0
        self._recent_probes += 1
        self.probes += 1
        self._probe_cap = int(self.capacity * PROBE_SHARE)
        return self._probe_cap

    def fit(self) -> tuple[StepCost, float]:
        """The weighted steps plus the prior's line at four pseudo-steps (0 and capacity tokens,
        one and capacity/64 sequences), each weighted noise variance / prior variance (at least
        PRIOR_FLOOR): the noise variance from the residuals of a fit with a negligible prior.
        c is fitted only where the steps vary their sequences apart from their tokens
        (SEQ_SPREAD); elsewhere it keeps the prior's ratio to b. With it, the standard
        deviation of a's share of a full step, from the same least squares' posterior (inf
        where there is none)."""
        shape, scale = self.prior, self._scale()
        if scale is None:
            return self.prior, math.inf
        seqs_per_token = self._seqs_per_token()
        prior_shaped = StepCost.in_tokens(shape.fixed_tokens, shape.seq_tokens, scale,
                                          seqs_per_token)
        if not self.learn:
            return prior_shaped, math.inf
        seqs = self._prior_seqs
        pseudo = [((1.0, t, n), scale * (shape.fixed_tokens + t + shape.seq_tokens * n))
                  for t, n in ((0.0, 1.0), (self.capacity, 1.0), (self.capacity, seqs), (0.0, seqs))]
        basis = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
        if not self._seqs_vary_apart():
            basis = ((1.0, 0.0, 0.0), (0.0, 1.0, shape.seq_tokens))  # c = prior ratio x b
        spread = PRIOR_SPREAD * scale * (shape.fixed_tokens + self.capacity)
        first = self._solve(basis, pseudo, 1e-9 * self._xx[0][0])
        noise = 0.0 if first is None else self._noise(first[0])
        weight = max(PRIOR_FLOOR, noise / spread ** 2)
        solved = first and self._solve(basis, pseudo, weight)
        if solved is None:  # the steps cannot be solved for: the prior's shape
            return prior_shaped, math.inf
        # b <= 0 even with the prior's pull (which alone keeps b > 0): a token costs next to
        # nothing beside a step and its sequences, as where a dominates on a GPU (a share of
        # about 1 where c is small, not the prior's); a least b keeps a / b finite
        (a, b, c), normal = solved
        cost = StepCost(max(0.0, a), b if b > 0 else LEAST_TOKEN_COST * scale, max(0.0, c),
                        seqs_per_token)
        return cost, self._share_sd(cost, basis, normal, weight * spread ** 2)

    def _share_sd(self, cost: StepCost, basis, normal, noise: float) -> float:
        """The share's standard deviation (delta method): the posterior covariance of the
        solution is noise x normal^-1 (noise: the steps' variance, or the prior's floor)."""
        a, s, cap = cost.fixed, cost.seqs_per_token, self.capacity
        work = (cost.per_token + cost.per_seq * s) * cap
        squared = (a + work) ** 2
        if not (0 < squared < math.inf):
            return math.inf
        grad = (work / squared, -a * cap / squared, -a * s * cap / squared)  # d share / d (a, b, c)
        g = [sum(row[i] * grad[i] for i in range(3)) for row in basis]
        z = _solve(normal, g)
        if z is None:
            return math.inf
        return math.sqrt(max(0.0, noise * sum(u * v for u, v in zip(g, z))))

    def _seqs_per_token(self) -> float:
        """The sequences a token of a full step brings: over the steps of half the budget or
        more (a decode step's sequences are one a token, and would make a full step's sequences
        many times what they are), else the prior's."""
        tokens, seqs = self._full
        return seqs / tokens if tokens > 0 else self._prior_seqs / self.capacity

    def _covariance(self, i: int, j: int) -> float:
        """The steps' weighted covariance of x_i and x_j (x = (1, tokens, seqs)); steps seen."""
        xx = self._xx
        w = xx[0][0]
        return xx[i][j] / w - xx[0][i] * xx[0][j] / w ** 2

    def _token_spread(self) -> float:
        """The weighted standard deviation of the steps' tokens."""
        return math.sqrt(max(0.0, self._covariance(1, 1))) if self._xx[0][0] > 0 else 0.0

    def _seqs_vary_apart(self) -> bool:
        """Whether at least SEQ_SPREAD of the steps' variance in sequences is not explained by
        their tokens (1 - the weighted R^2 of sequences on tokens)."""
        var_t, var_n, cov = self._covariance(1, 1), self._covariance(2, 2), self._covariance(1, 2)
        if var_n <= 1e-12 * max(1.0, self._xx[2][2] / self._xx[0][0]) or var_t <= 0:
            return False
        return 1 - cov * cov / (var_t * var_n) >= SEQ_SPREAD

    def _solve(self, basis, pseudo, weight: float
               ) -> tuple[tuple[float, float, float], list[list[float]]] | None:
        """Weighted least squares over the steps and the pseudo-steps, in the coordinates of
        `basis` (rows: combinations of a, b, c): the solution back in (a, b, c), and the normal
        matrix in the basis's coordinates; None where singular."""
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
        return tuple(sum(basis[r][i] * theta[r] for r in range(k)) for i in range(3)), xx

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
                "fixed_tokens": cost.fixed_tokens, "fixed_share": self.share(),
                "share_sd": self.fitted_share_sd(),
                "steps": self.steps, "probes": self.probes,
                "source": "fixed" if not self.learn else "prior" if self.learning else "fit"}


def _typical(steps: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """The steps less those slower than OUTLIER_FACTOR x the median both per step and per
    token: a stall before any fit can clip it (a GC pause, a late allocation), which, fitted
    with the rest, can read as a per-sequence cost and hide a large a (a backlog's first steps
    are the ones with many short prompts). A step slow in one shape only (a decode step on a
    GPU, per token; a full step on a CPU, per step) is what steps cost, and stays."""
    shapes = (lambda t, n: 1.0, lambda t, n: float(t))
    medians = [statistics.median(s / x(t, n) for t, n, s in steps) for x in shapes]
    return [(t, n, s) for t, n, s in steps
            if not all(s / x(t, n) > OUTLIER_FACTOR * m for x, m in zip(shapes, medians))]


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
