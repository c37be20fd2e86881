"""Pure: the token router's policy. No Ray, no vLLM, no sockets.

A replica with the plugin reports, every step, the prompt tokens still to prefill (waiting and
running), its decoding requests, and the step it has just started with the time its step-cost
model gives it (``LoadReport``): the router counts only the part of that step still to run.
Between two reports the router adds what it has sent there itself (``LoadTable.sent``), counted
from token ids or estimated from text; a report drops the requests it already covers: the
oldest ones, as many as arrived since the last report (a request of k prompts with n samples
arrives as k x n), sent before the newest arrival. The count matters: a request still on its
way (the Ray call, the server's tokenization) was sent before the newest arrival too, and
dropping it would make the replica just sent it look free.
A new request goes where it expects the shortest wait: the prompt tokens ahead of it and its
own, plus the decode tokens that ride along each step until it is through. Counting tokens
instead of requests is the point: ten long prompts and ten short ones are not the same queue.

The router holds every replica's load and scans up to SCAN_LIMIT of them a request (all of a
small deployment, a random run of them in a large one: the cost per request stays flat; power
of two choices is an option: ``choices=2``). Alone, it takes the least expected wait. Beside
other routers (several ingress replicas), which it tells from its share of the replicas'
arrivals, it picks at random among as many of the best replicas as there are routers, so that
routers that see the same loads do not all send to the same replica before the next report.
Where the routers know their number and their own index (their ingress replicas' ranks), each
keeps to its own share of the replicas (``router_share``), whose load it knows in full, and
sends elsewhere only when that saves more than a quarter of a step's budget of wait.

``PrefixIndex`` remembers which replicas were sent which prompt prefixes, so that a replica
likely to hold a prompt's prefix in its cache is a candidate too, with the cached part taken off
its cost there: affinity where it pays, load balance where it does not. Several routers each see
a part of the traffic: each replica publishes the prefix hashes of the requests it receives
(``encode_chain``; ``PrepackLLMServer``), so every router's index holds every send. Where the
replicas publish none, a prefix's home (the same replica in every router, by rendezvous
hashing) gathers it instead.
"""

from __future__ import annotations

import heapq
import math
import random
import struct
import zlib
from collections import OrderedDict, deque
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

Replica = Hashable

# seq, time, waiting, prefill, decoding, budget, newest arrival, requests, arrived, step, seconds,
# cache tokens: one code a field, 8 bytes each. A new field is appended, with a default, so that
# routers and replicas of adjacent releases read each other during a rolling upgrade: an older
# report (fewer fields) leaves the new ones at their defaults, a newer one's extra fields are
# not read.
_CODES = "qdqqqqdqqqdq"
_REQUIRED_FIELDS = 9  # those without a default
_FORMATS = {8 * n: struct.Struct("<" + _CODES[:n]) for n in range(_REQUIRED_FIELDS, len(_CODES) + 1)}
_FORMAT = _FORMATS[8 * len(_CODES)]
MIN_PREFILL_SHARE = 0.25  # decode never leaves prefill less than this share of a step (estimate)
MESSAGE_TOKENS = 4  # chat template tokens around each message (estimate)
SHARE_WINDOW = 50  # arrivals over which a router measures its share of them
SCAN_LIMIT = 16  # replicas a router scans per request; a random run of them beyond
CACHE_HIT_WEIGHT = 2  # a cached token saves the request's wait and the replica's capacity
# a router with its own share of the replicas sends elsewhere only to save this share of a step's
# token budget in wait (engine-free, 64 replicas, 8 routers: 1/8, 1/4, 1/2 and 1 compared,
# BENCHMARKS.md)
OVERFLOW_STEP_SHARE = 0.25
# a prefix index sized by the replicas' KV caches keeps at least and at most this many blocks
# (172-196 bytes a block, one to four owners, BENCHMARKS.md: 11-12 MiB and 172-196 MiB)
MIN_PREFIX_BLOCKS = 65_536
MAX_PREFIX_BLOCKS = 1 << 20
SHRINK_BLOCKS = 1024  # blocks an insert drops beyond its own where the index shrank (no pause)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class LoadReport:
    """One replica's load after a scheduler step, as its plugin sees it."""

    seq: int  # the publisher's count; a restarted engine starts again
    time: float  # wall clock of the report
    waiting_tokens: int  # prompt tokens of waiting requests, less what the prefix cache holds
    prefill_tokens: int  # prompt tokens running requests have still to prefill
    decoding: int  # running requests past their prompt: one token each per step
    budget: int  # tokens a step may schedule
    newest_arrival: float  # wall-clock arrival of the newest request the scheduler has taken
    requests: int  # waiting + running
    arrived: int  # requests the scheduler has taken since it started
    step_tokens: int = 0  # tokens of the step being computed as the report leaves
    step_seconds: float = 0.0  # that step's time as the replica predicts it (0: not known yet)
    cache_tokens: int = 0  # tokens its KV cache holds: the most its prefix cache keeps (0: unknown)

    def encode(self) -> bytes:
        return _FORMAT.pack(self.seq, self.time, self.waiting_tokens, self.prefill_tokens,
                            self.decoding, self.budget, self.newest_arrival, self.requests,
                            self.arrived, self.step_tokens, self.step_seconds, self.cache_tokens)

    @classmethod
    def decode(cls, data: bytes) -> LoadReport:
        form = _FORMATS.get(len(data))
        if form is None and len(data) > _FORMAT.size and len(data) % 8 == 0:
            form, data = _FORMAT, data[:_FORMAT.size]  # a newer release's: its fields first
        if form is None:
            raise ValueError(f"a load report is 8-byte fields, {min(_FORMATS)} bytes or more; "
                             f"got {len(data)} bytes")
        return cls(*form.unpack(data))


def encode_chain(hashes: Sequence[int]) -> bytes:
    """A prompt's block hashes (``PrefixIndex.hashes``) as a replica publishes them: 8 bytes
    each, signed (text hashes are crc32s, token-id hashes Python's 64-bit ones)."""
    return struct.pack(f"<{len(hashes)}q", *hashes)


def decode_chain(data: bytes) -> list[int]:
    if len(data) % 8:
        raise ValueError(f"a prefix chain is 8-byte hashes, got {len(data)} bytes")
    return list(struct.unpack(f"<{len(data) // 8}q", data))


class _Charge:
    """A request sent to a replica and not yet covered by its reports: `count` arrivals there
    (``engine_requests``: one per prompt and sample) of `tokens` in all."""

    __slots__ = ("key", "replica", "sent_at", "tokens", "count", "live")

    def __init__(self, key: Hashable, replica: Replica, sent_at: float, tokens: int,
                 count: int = 1) -> None:
        self.key, self.replica, self.sent_at, self.tokens = key, replica, sent_at, tokens
        self.count = count
        self.live = True


class _View:
    __slots__ = ("report", "heard", "step_heard", "charges", "unreported", "arrived")

    def __init__(self) -> None:
        self.report: LoadReport | None = None
        self.heard = -math.inf  # when the last report (or heartbeat) came
        self.step_heard = -math.inf  # when the last new report came (its step's start, here)
        self.charges: deque[_Charge] = deque()  # in send order
        self.unreported = 0  # tokens of live charges
        self.arrived = -1  # the last report's count of arrivals


class LoadTable:
    """The router's view of every replica: its last report plus the tokens sent since.

    `stale_after`: seconds without a report (publishers repeat theirs while idle) after which a
    replica that did report once is passed over: it died, or its engine did.
    `default_budget`: the step budget assumed for a replica that has not reported yet.
    `overflow_share`: the share of a step's budget of wait a router with its own share of the
    replicas saves before it sends elsewhere (``choose``).
    """

    def __init__(self, stale_after: float = 0.5, default_budget: int = 2048,
                 rng: random.Random | None = None,
                 overflow_share: float = OVERFLOW_STEP_SHARE) -> None:
        self.stale_after = stale_after
        self.default_budget = default_budget
        self.overflow_share = overflow_share
        self.rng = rng or random.Random()
        self._views: dict[Replica, _View] = {}
        # forgotten replicas (Ray never reuses an id): a candidate list that still names one
        # (a lagging update) gets it passed over, not counted idle for want of a view
        self._gone: set[Replica] = set()
        self._charges: dict[Hashable, _Charge] = {}  # request key -> its live charge
        self.spread = 1  # routers this one shares the replicas with, as far as it can tell
        self.cache_tokens = 0  # what the known replicas' KV caches hold, by their last reports
        self._window = [0, 0]  # [own sends, arrivals at the replicas] since the last estimate

    def _view(self, replica: Replica) -> _View:
        view = self._views.get(replica)
        if view is None:
            view = self._views[replica] = _View()
        return view

    # ---- bookkeeping --------------------------------------------------------------------

    def report(self, replica: Replica, report: LoadReport, now: float) -> None:
        """A replica's report (a repeated one, a heartbeat, only says it is alive). Sends reach
        a replica in order, so it covers the oldest live charges: as many of their arrivals
        as arrived since the last report (exact for a router alone; beside others, some of
        those arrivals are theirs), a charge of several arrivals in part where only some of
        them are counted, and none sent after its newest arrival. Spent charges (a request that
        finished, failed, or went to another replica when this one turned it away) take no
        arrival: most never arrived here, and one that did (it finished before a report
        counted it) only makes as many later requests as its arrivals look arrived early,
        until an arrival that finds no charge sent before it to drop. The first report, or one
        from a restarted engine, covers every request sent before its newest arrival. A
        forgotten replica's late report is dropped."""
        if replica in self._gone:
            return
        view = self._view(replica)
        view.heard = now
        last = view.report
        if last is None or (report.seq, report.time) != (last.seq, last.time):
            view.step_heard = now  # not a repeat: its step started about now
        self.cache_tokens += report.cache_tokens - (last.cache_tokens if last is not None else 0)
        view.report = report
        # a restarted engine counts its reports and arrivals from 0 again: either went down
        restarted = last is not None and report.seq < last.seq
        arrivals = math.inf
        if 0 <= view.arrived <= report.arrived and not restarted:  # nor the first report
            arrivals = report.arrived - view.arrived
            self._count_arrivals(arrivals)
        view.arrived = report.arrived
        charges = view.charges
        while charges and charges[0].sent_at <= report.newest_arrival:
            charge = charges[0]
            if charge.live:
                if arrivals <= 0:
                    break
                if arrivals < charge.count:  # some of its n requests arrived: their share
                    part = charge.tokens * arrivals // charge.count
                    charge.tokens -= part
                    charge.count -= arrivals
                    view.unreported -= part
                    break
                arrivals -= charge.count
            self._drop(charges.popleft())

    def sent(self, replica: Replica, key: Hashable, tokens: int, now: float,
             count: int = 1) -> None:
        """Count `tokens` at `replica` until reports cover its `count` arrivals there (the
        engine takes a request for each prompt and sample of it: ``engine_requests``), a
        share of the tokens with each; a request routed again (a retry) moves its charge. A
        forgotten replica is charged nothing (it is never picked again)."""
        self.done(key)
        if replica in self._gone:
            return
        charge = _Charge(key, replica, now, tokens, count)
        view = self._view(replica)
        if view.charges and now < view.charges[-1].sent_at:
            charge.sent_at = view.charges[-1].sent_at  # keep send order under a clock step back
        view.charges.append(charge)
        view.unreported += tokens
        self._charges[key] = charge
        self._window[0] += count

    def _count_arrivals(self, n: int) -> None:
        """Every SHARE_WINDOW arrivals, the share of them this router sent: alone, about all;
        one of k routers, about 1/k."""
        window = self._window
        window[1] += n
        if window[1] >= SHARE_WINDOW:
            share = min(1.0, max(window[0], 1) / window[1])
            self.spread = max(1, round(1 / share))
            window[0] = window[1] = 0

    def done(self, key: Hashable, replica: Replica | None = None) -> None:
        """The request finished (or failed) before a report covered it; with `replica`, only
        if it was charged there (a late completion of an attempt Ray retried elsewhere leaves
        the retry's charge alone)."""
        charge = self._charges.get(key)
        if charge is not None and (replica is None or charge.replica == replica):
            self._drop(charge)

    def _drop(self, charge: _Charge) -> None:
        if charge.live:
            charge.live = False
            self._views[charge.replica].unreported -= charge.tokens
        if self._charges.get(charge.key) is charge:
            del self._charges[charge.key]

    def forget(self, replica: Replica) -> None:
        """A replica left (died, or was scaled down), for good."""
        self._gone.add(replica)
        view = self._views.pop(replica, None)
        if view is not None:
            if view.report is not None:
                self.cache_tokens -= view.report.cache_tokens
            for charge in view.charges:
                charge.live = False
                if self._charges.get(charge.key) is charge:
                    del self._charges[charge.key]

    def unreported(self, replica: Replica) -> int:
        view = self._views.get(replica)
        return view.unreported if view is not None else 0

    def stale(self, replica: Replica, now: float) -> bool:
        return not self._live((replica,), now)

    # ---- the policy ---------------------------------------------------------------------

    def expected_wait(self, replica: Replica, tokens: int, now: float | None = None) -> float:
        """Compute (in tokens) a replica does before a new request of `tokens` prompt tokens is
        through prefill: the rest of the step under way at `now` (all of it without `now`), the
        prompt tokens ahead of it and its own, plus its decoding requests' tokens in every step
        until then."""
        return _wait(self._views.get(replica), tokens, now)

    def choose(self, candidates: Sequence[Replica], tokens: int, now: float, choices: int = 0,
               hits: Mapping[Replica, int] | None = None,
               own: Collection[Replica] | None = None) -> list[Replica]:
        """The replica to send a request of `tokens` prompt tokens to, then a runner-up.

        Candidates are the live ones (all when none is): `choices` of them at random, or with
        `choices` 0 all of them up to SCAN_LIMIT and a random run of SCAN_LIMIT beyond (a fixed
        cost per request; at 64 replicas the run holds the least loaded one a quarter of the
        time and one of the six least loaded 84% of the time; the engine-free runs measure
        what that costs); plus those in `hits` (replica -> prompt tokens it likely has
        cached, which its cost there leaves out, weighed CACHE_HIT_WEIGHT times). The pick is
        the least expected wait; while other routers share the replicas, a random one of the
        `spread` best, among those whose wait is within the request's own tokens of the best
        (an idle replica is not traded for a loaded one to spread load).

        `own`: this router's share where the routers split the replicas (``router_share``): the
        best of its live share, whose load it knows in full, with the better of the share's
        second and the best over all as runner-up; unless the best over all waits less by
        more than ``_overflow``: then the spread pick over all where it saves as much too, else
        that best, with the share's best as runner-up."""
        ranked = self._ranked(candidates, tokens, now, choices, hits, self.spread)
        if own:
            mine = self._live([r for r in candidates if r in own], now)
            if mine:
                own_hits = {r: h for r, h in hits.items() if r in own} if hits else None
                kept = self._ranked(mine, tokens, now, choices, own_hits, 1)
                stay = kept[0][0] - self._overflow(kept[0][2])  # what leaving must beat
                best = min(ranked, key=itemgetter(0))
                if best[0] >= stay:
                    pick = kept[0][2]
                    others = [b for b in kept[1:] + ranked if b[2] != pick]
                    return [pick] + [min(others, key=itemgetter(0))[2]] if others else [pick]
                pick = ranked[0] if ranked[0][0] < stay else best
                return [pick[2], kept[0][2]]
        return [b[2] for b in ranked]

    def _overflow(self, replica: Replica) -> float:
        """Tokens of wait worth leaving the router's share for: a fraction of a step, since
        what the router does not see of another replica's load (other routers' sends since its
        last report) is up to a step's worth."""
        view = self._views.get(replica)
        budget = view.report.budget if view is not None and view.report is not None else None
        return self.overflow_share * (budget or self.default_budget)

    def _ranked(self, candidates: Sequence[Replica], tokens: int, now: float, choices: int,
                hits: Mapping[Replica, int] | None, spread: int) -> list[tuple]:
        """``choose``'s pick and runner-up over `candidates`, as (score, order, replica)."""
        n = len(candidates)
        if 0 < choices < n:
            live = self._live(candidates, now) or list(candidates)
            pool = self.rng.sample(live, min(choices, len(live)))
            spread = 1  # the sample is the randomness
        else:
            start = self.rng.randrange(n) if n else 0
            pool = list(candidates[start:start + SCAN_LIMIT])  # equal waits: a random one
            if len(pool) < SCAN_LIMIT:
                pool += candidates[:min(start, SCAN_LIMIT - len(pool))]
            pool = self._live(pool, now)
        if not pool:
            pool = self._live(candidates, now) or list(candidates)
        if hits:
            offered = set(candidates)
            allowed = set(pool) | set(self._live((r for r in hits if r in offered), now))
            hits = {r: min(hit, tokens) for r, hit in hits.items() if r in allowed}
        views = self._views
        scored = [(_wait(views.get(r), max(1, tokens - hit), now) - (CACHE_HIT_WEIGHT - 1) * hit,
                   -1 - i, r) for i, (r, hit) in enumerate(hits.items())] if hits else []
        scored += [(_wait(views.get(r), tokens, now), i, r) for i, r in enumerate(pool)
                   if not hits or r not in hits]
        best = heapq.nsmallest(max(2, spread), scored)
        if spread > 1:
            spread = sum(1 for b in best[:spread] if b[0] <= best[0][0] + tokens)
        first = self.rng.randrange(spread) if spread > 1 else 0
        return [best[first]] + [b for i, b in enumerate(best[:2]) if i != first][:1]

    def _live(self, replicas: Iterable[Replica], now: float) -> list[Replica]:
        views, cutoff, gone = self._views, now - self.stale_after, self._gone
        return [r for r in replicas
                if (v := views.get(r)) is not None and (v.report is None or v.heard >= cutoff)
                or v is None and r not in gone]


def router_share(replicas: Iterable[Replica], index: int, count: int) -> frozenset:
    """Router `index`'s share (0 <= index < count) where `count` routers split `replicas` (all of
    them seeing the same set): every count-th of them in the order of their names, from
    position `index`; a router beyond the replicas gets one of them. A replica that hears from
    one router only is one whose load that router knows in full, sends between reports
    included."""
    ordered = sorted(replicas, key=str)
    if count <= 1 or not ordered:
        return frozenset(ordered)
    if index >= len(ordered):
        return frozenset((ordered[index % len(ordered)],))
    return frozenset(ordered[index::count])


def _wait(view: _View | None, tokens: int, now: float | None) -> float:
    """LoadTable.expected_wait on a replica's view."""
    if view is None:
        return tokens
    ahead = tokens + view.unreported
    report = view.report
    if report is None:
        return ahead
    ahead += report.waiting_tokens + report.prefill_tokens
    decoding, budget = report.decoding, report.budget
    per_step = max(budget - decoding, budget * MIN_PREFILL_SHARE, 1)
    # the step under way finishes first: the share of it left by the replica's own estimate of
    # its time, from when its report was first heard here (this router's clock; the channel's
    # delay makes that a little late, so the rest is, if anything, overcounted); all of it when
    # unknown. An async-scheduling engine reports a step as it schedules it, while the one
    # before still runs: the rest is then undercounted by up to a step.
    step = report.step_tokens
    if step and report.step_seconds > 0 and now is not None:
        step *= min(1.0, max(0.0, 1.0 - (now - view.step_heard) / report.step_seconds))
    return step + ahead + math.ceil(ahead / per_step) * decoding


def samples(body) -> int:
    """``n`` of an OpenAI request body (parallel sampling: completions, chat), else 1."""
    n = getattr(body, "n", None)
    return n if isinstance(n, int) and n > 1 else 1


def engine_requests(body) -> int:
    """Requests vLLM's engine takes for an OpenAI request body: one per prompt (a completion
    or embedding request may carry a list of them; chat carries one), times ``samples``. Beam
    search, which runs rounds of its own requests, is not counted."""
    name, value = _prompt_field(body)
    several = (name != "messages" and isinstance(value, Sequence) and not isinstance(value, str)
               and len(value) > 0 and not isinstance(value[0], int))  # prompts, not one's ids
    return (len(value) if several else 1) * samples(body)


def _prompt_field(body) -> tuple[str | None, object]:
    """The body's prompt field and its value: completions ``prompt``, embeddings ``input``,
    chat ``messages``; (None, None) where it has none."""
    for name in ("prompt", "input", "messages"):
        value = getattr(body, name, None)
        if value is not None:
            return name, value
    return None, None


def prompt_tokens(body, chars_per_token: float) -> int:
    """Prompt tokens of an OpenAI request body (completions ``prompt``, embeddings ``input``,
    chat ``messages``): token ids counted, text estimated at `chars_per_token`."""
    _, value = _prompt_field(body)
    return 0 if value is None else _count(value, chars_per_token)


def _count(value, chars_per_token: float) -> int:
    if isinstance(value, str):
        return math.ceil(len(value) / chars_per_token)
    if isinstance(value, Mapping):  # a chat message or a content part
        if "content" in value:
            return MESSAGE_TOKENS + _count(value["content"] or "", chars_per_token)
        text = value.get("text")
        return _count(text, chars_per_token) if isinstance(text, str) else 0
    if isinstance(value, Sequence):
        if value and isinstance(value[0], int):
            return len(value)
        return sum(_count(item, chars_per_token) for item in value)
    return 0


def prompt_key(body) -> str | tuple[int, ...] | None:
    """The first prompt of a request as text or token ids, for prefix matching."""
    _, value = _prompt_field(body)
    return None if value is None else _first(value)


def _first(value):
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value:
        if isinstance(value[0], int):
            return tuple(value)
        if isinstance(value[0], Mapping):  # chat messages: their contents in order
            return "\x00".join(_content_text(m.get("content")) for m in value)
        return _first(value[0])
    return None


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


class PrefixIndex:
    """Which replicas were recently sent which prompt prefixes, in blocks of `block` tokens
    (token ids; text in blocks of `block` x `chars_per_token` UTF-8 bytes), chained so that a
    block's hash stands for the whole prefix up to it. Each block keeps its `owners` most recent
    replicas; the `capacity` most recently used blocks are kept, or with `capacity` None as many
    as the replicas' KV caches hold (``cover``): an index smaller than the caches forgets
    prefixes they still hold, a larger one remembers prefixes they have evicted. For a router
    alone, a replica's hit for a prompt is the leading blocks it was sent, all of them: what its
    prefix cache most likely still holds (the engine may have evicted some).

    Several routers (one per ingress replica) each see only a part of the traffic. Where the
    replicas publish the prefixes they receive, every router inserts them too (the request's
    way to the replica and the feed's hop after the send), and its index holds every send, as
    a router alone does; then every router's `capacity` covers all routers' sends. Where they
    do not, each index alone would scatter a shared prefix over the replicas: every prefix
    then has a *home*, the replica that ranks first for its first block by rendezvous hashing,
    the same in every router and process (the hashes are stable, not Python's salted
    ``hash``), and a prefix a router has met before counts as cached at its home only, so the
    routers gather it there until its load outweighs the saving. The engine-free runs compare
    the two (BENCHMARKS.md)."""

    def __init__(self, block: int = 64, chars_per_token: float = 4.0, capacity: int | None = None,
                 owners: int = 4) -> None:
        self.block, self.owners = int(block), owners
        self.sized = capacity is None  # by the replicas' caches (``cover``)
        self.capacity = MIN_PREFIX_BLOCKS if capacity is None else capacity
        self.chars_per_token = float(chars_per_token)
        self._bytes = max(1, round(self.block * self.chars_per_token))
        self._blocks: OrderedDict[int, tuple[Replica, ...]] = OrderedDict()
        self._replica_keys: dict[Replica, int] = {}
        self._homes: OrderedDict[int, Replica] = OrderedDict()  # first block -> its home
        self._gone: set[Replica] = set()  # forgotten replicas, still named in some blocks

    def cover(self, cache_tokens: int) -> None:
        """Size the index to the replicas' KV caches (`cache_tokens` in all, from their load
        reports: ``LoadTable.cache_tokens``), between MIN_PREFIX_BLOCKS and MAX_PREFIX_BLOCKS
        blocks; a fixed capacity stays. Blocks over a smaller capacity leave over the next
        inserts, SHRINK_BLOCKS at a time beyond their own."""
        if self.sized:
            blocks = cache_tokens // self.block
            self.capacity = min(MAX_PREFIX_BLOCKS, max(MIN_PREFIX_BLOCKS, blocks))

    @property
    def settings(self) -> str:
        """"block:chars_per_token": what a replica must hash with for its prefix feed to match
        (``serve_replica.prefix_feed`` parses it)."""
        return f"{self.block}:{self.chars_per_token}"

    def chain(self, body) -> list[int]:
        """The block hashes of a request body's first prompt (``prompt_key``); [] without one."""
        key = prompt_key(body) if body is not None else None
        return self.hashes(key) if key is not None else []

    def hashes(self, prompt: str | tuple[int, ...]) -> list[int]:
        """The chained hash of every full block, the same in every process: crc32 of the UTF-8
        bytes for text (Python salts its str hash per process), Python's hash of int tuples
        (not salted) for token ids."""
        out, h = [], 0
        if isinstance(prompt, str):
            data, size = prompt.encode(), self._bytes
            for start in range(0, len(data) - size + 1, size):
                h = zlib.crc32(data[start:start + size], h)
                out.append(h)
            return out
        size = self.block
        try:
            for start in range(0, len(prompt) - size + 1, size):
                h = hash((h, tuple(prompt[start:start + size])))
                out.append(h)
        except TypeError:  # not token ids vLLM would take: no affinity
            return []
        return out

    def hits(self, hashes: Sequence[int], replicas: Collection[Replica],
             shared: bool = False) -> dict[Replica, int]:
        """Replica -> prompt tokens it likely holds cached. Where the index holds every send
        (a router alone, or replicas publishing their prefixes), the leading blocks each
        replica was sent. Where it holds only this router's share of them (`shared`), each
        router's would pull a prefix to different replicas: then only the prompt's home
        counts, with the leading blocks this router has met before (a prompt never met is
        not pulled anywhere)."""
        if not shared:
            return {r: n * self.block for r, n in self.match(hashes).items()}
        known = 0
        for h in hashes:
            if h not in self._blocks:
                break
            known += 1
        if not known or not replicas:
            return {}
        return {self.home(hashes[0], replicas): known * self.block}

    def home(self, first: int, replicas: Collection[Replica]) -> Replica:
        """The replica every router ranks first for a prefix starting with block `first`
        (rendezvous hashing: a replica that leaves moves only its own prefixes)."""
        home = self._homes.get(first)
        keys = self._replica_keys
        if home is not None and len(replicas) == len(keys) and home in replicas:
            self._homes.move_to_end(first)
            return home
        best, best_score = None, -1
        for replica in replicas:
            key = keys.get(replica)
            if key is None:
                key = keys[replica] = zlib.crc32(str(replica).encode())
                self._homes.clear()  # a new replica may outrank the homes found so far
            score = _mix(first ^ key)
            if score > best_score:
                best, best_score = replica, score
        if len(replicas) == len(keys):  # a subset's (LoRA requests) is not every router's home
            self._homes[first] = best
        for _ in range(min(len(self._homes) - self.capacity, SHRINK_BLOCKS + 1)):
            self._homes.popitem(last=False)
        return best

    def match(self, hashes: Sequence[int]) -> dict[Replica, int]:
        """Replica -> leading blocks of these it was sent (only replicas with at least one).
        A block whose owners are the previous block's costs one comparison: the common case
        along a prefix sent to the same replicas."""
        hits: dict[Replica, int] = {}
        holders: set | None = None
        blocks, last, n = self._blocks, None, 0
        for h in hashes:
            owners = blocks.get(h)
            if not owners:
                break
            if holders is None:
                holders = set(owners)
            elif owners != last:
                gone = holders.difference(owners)
                for replica in gone:
                    hits[replica] = n
                holders -= gone
                if not holders:
                    break
            last = owners
            n += 1
        for replica in holders or ():
            hits[replica] = n
        if self._gone:
            for replica in self._gone.intersection(hits):
                del hits[replica]
        return hits

    def insert(self, hashes: Sequence[int], replica: Replica) -> None:
        """Where `replica` was sent these blocks: last block first, so that a prompt's first
        blocks are the most recently used and the index drops a prefix tail first, as vLLM's
        prefix cache evicts a request's blocks. A block already last sent to `replica` is
        only moved up; a full block drops its oldest owner, a forgotten replica before any. A
        block's owners are a tuple: of strings (the token router's keys) the garbage
        collector stops tracking it, so the index's blocks never join the old generation a
        full collection walks (a list a block would, and their number then paces the full
        collections of the router's whole process)."""
        if replica in self._gone:  # a router's candidates may name it a while longer
            return
        blocks, keep, gone = self._blocks, self.owners, self._gone
        move = blocks.move_to_end
        for h in reversed(hashes):
            owners = blocks.get(h)
            if owners is None:
                blocks[h] = (replica,)
                continue
            move(h)
            if owners[-1] != replica:
                if replica in owners:
                    at = owners.index(replica)
                    blocks[h] = owners[:at] + owners[at + 1:] + (replica,)
                    continue
                if len(owners) >= keep and gone and not gone.isdisjoint(owners):
                    owners = tuple(o for o in owners if o not in gone)
                if len(owners) < keep:
                    blocks[h] = owners + (replica,)
                else:
                    blocks[h] = owners[len(owners) + 1 - keep:] + (replica,)
        over = len(blocks) - self.capacity
        for _ in range(min(over, len(hashes) + SHRINK_BLOCKS)):
            blocks.popitem(last=False)

    def forget(self, replica: Replica) -> None:
        """A replica left for good (Ray never reuses a replica's id): it no longer matches, at
        once, and sends to it are not recorded (a router's candidates may name it a while
        longer), while the blocks naming it change only as they are next sent: a walk over
        every block would hold the router for 0.5-0.7 s at MAX_PREFIX_BLOCKS (BENCHMARKS.md).
        The set of the gone grows by a key a replica that leaves."""
        self._gone.add(replica)
        self._replica_keys.pop(replica, None)
        self._homes.clear()


def _mix(x: int) -> int:
    """splitmix64's finalizer: every input bit moves every output bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
