"""vLLM's real Scheduler / AsyncScheduler with the plugin, driven without an engine."""

import pytest

from vllm_prepack.bench.harness import fake_step, make_request, standalone_scheduler
from vllm_prepack.config import StarvationWarning
from vllm_prepack.scheduler import PackingRequestQueue, PrepackAsyncScheduler, PrepackScheduler


def planned_admissions(history):
    """Requests admitted in a step that planned them, counted from the step records."""
    return sum(len({p.key for p in r.planned} & set(r.scheduled_new)) for r in history)


def drain(scheduler, max_steps=500):
    steps = []
    while scheduler.has_requests() and len(steps) < max_steps:
        out = scheduler.schedule()
        steps.append(dict(out.num_scheduled_tokens))
        fake_step(scheduler, out)
    return steps


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_picks_the_right_base_and_packs(tiny_model, async_scheduling):
    s = standalone_scheduler(tiny_model, async_scheduling=async_scheduling)
    assert isinstance(s, PrepackScheduler)
    assert isinstance(s, PrepackAsyncScheduler) == async_scheduling
    assert isinstance(s.waiting, PackingRequestQueue)
    s.prepack_stats.keep_history = True
    for i, n in enumerate([200, 30, 100, 250, 20]):
        s.add_request(make_request(f"r{i}", n))
    steps = [step for step in drain(s) if step]
    stats = s.prepack_stats
    assert stats.admitted_as_planned == planned_admissions(stats.history) == stats.admitted == 5
    # step 1 packs 20+30+200 (FCFS: 200+30, then stops at 100). Step 2: the deadlines, from
    # the 600 tokens queued at arrival (2.3 steps), have not passed; best fit swaps 100 for
    # 250, which fills the step better; step 3 takes 100
    assert steps == [{"r4": 20, "r1": 30, "r0": 200}, {"r3": 250}, {"r2": 100}]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_plain_vllm_head_of_line_blocks_on_the_same_input(tiny_model, async_scheduling):
    s = standalone_scheduler(tiny_model, scheduler="fcfs", async_scheduling=async_scheduling)
    for i, n in enumerate([200, 30, 100, 250, 20]):
        s.add_request(make_request(f"r{i}", n))
    assert len([step for step in drain(s) if step]) == 4


def test_preempted_requests_keep_their_place(tiny_model):
    # 12 blocks of 16 tokens; long generations force preemption.
    s = standalone_scheduler(tiny_model, budget=256, chunked_prefill=True, num_blocks=12)
    s.prepack_stats.keep_history = True
    for i in range(6):
        s.add_request(make_request(f"r{i}", 40 + 5 * i, max_tokens=60))
    drain(s, max_steps=2000)
    assert not s.has_requests()
    history = s.prepack_stats.history
    assert s.prepack_stats.preempted > 0
    resumed = [
        (record, pick)
        for record in history
        for pick in record.planned
        if pick.reason == "pinned"
    ]
    assert resumed, "a preempted request was re-planned"
    for record, _ in resumed:
        assert record.planned[0].reason == "pinned"  # ahead of everything else
    # steps that put requests back (preempted) count the plan's admissions from its keys
    assert s.prepack_stats.admitted_as_planned == planned_admissions(history) > 0


def compiling(request_id, prompt_len):
    """A request whose structured-output grammar is still compiling, as vLLM receives it, and
    the future that ends its compilation."""
    from concurrent.futures import Future

    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.request import RequestStatus
    from vllm.v1.structured_output.request import StructuredOutputRequest

    request, grammar = make_request(request_id, prompt_len), Future()
    request.structured_output_request = StructuredOutputRequest(
        params=StructuredOutputsParams(regex="[ab]+"), _grammar=grammar)
    request.status = RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    return request, grammar


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_request_is_planned_once_its_grammar_is_compiled(tiny_model, policy):
    """vLLM passes over a request whose grammar still compiles; planned, it would hold budget
    that vLLM then fills past the plan. Out of the plan until compiled, then planned as an
    arrival of that step: not at the front, where vLLM keeps it and where a long one would
    stop a step of whole prompts."""
    from vllm.v1.request import RequestStatus

    s = standalone_scheduler(tiny_model, policy=policy)
    s.prepack_stats.keep_history = True
    request, grammar = compiling("grammar", 240)
    s.add_request(request)
    for i, n in enumerate([120, 136, 160]):
        s.add_request(make_request(f"r{i}", n))
    assert len(s.waiting) == 4 and "grammar" in {r.request_id for r in s.waiting}
    assert s.load_report().waiting_tokens == 240 + 120 + 136 + 160  # the router counts it too
    out = s.schedule()
    assert [p.key for p in s.prepack_stats.last.planned] == ["r0", "r1"]  # 120 + 136: the budget
    assert sorted(out.num_scheduled_tokens) == ["r0", "r1"]
    fake_step(s, out)
    out = s.schedule()
    assert [p.key for p in s.prepack_stats.last.planned] == ["r2"]
    assert list(out.num_scheduled_tokens) == ["r2"]
    fake_step(s, out)
    out = s.schedule()  # only the compiling request waits: vLLM's loop sees an empty queue
    assert not out.num_scheduled_tokens and len(s.waiting) == 1 and s.has_requests()
    grammar.set_result(object())
    for i, n in enumerate([100, 120]):
        s.add_request(make_request(f"late{i}", n))
    out = s.schedule()  # at the front, the 240 tokens would have taken the step alone
    assert [p.key for p in s.prepack_stats.last.planned] == ["late0", "late1"]
    assert list(out.num_scheduled_tokens) == ["late0", "late1"]
    assert request.status == RequestStatus.WAITING  # promoted by vLLM's check, not yet taken
    fake_step(s, out)
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["grammar"]
    assert request.status == RequestStatus.RUNNING and len(s.waiting) == 0
    stats = s.prepack_stats
    assert stats.admitted == stats.admitted_as_planned == planned_admissions(stats.history) == 6


def test_a_planned_request_vllm_puts_back_is_not_counted_as_admitted(tiny_model):
    s = standalone_scheduler(tiny_model)
    s.prepack_stats.keep_history = True
    stale = make_request("stale", 20)
    stale.num_stale_output_tokens = 1  # output of an earlier turn still in flight: vLLM skips it
    s.add_request(stale)
    s.add_request(make_request("ready", 30))
    out = s.schedule()
    stats = s.prepack_stats
    assert {p.key for p in stats.last.planned} == {"stale", "ready"}
    assert [r.req_id for r in out.scheduled_new_reqs] == ["ready"]  # vLLM skipped the other
    assert "stale" in {r.request_id for r in s.waiting}
    assert stats.admitted_as_planned == planned_admissions(stats.history) == 1


def test_a_request_whose_grammar_fails_is_ended_by_vllm_and_leaves_the_queue(tiny_model):
    s = standalone_scheduler(tiny_model)
    request, grammar = compiling("bad", 20)
    s.add_request(request)
    s.add_request(make_request("ok", 30))
    grammar.set_exception(ValueError("not a grammar"))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["ok"]
    fake_step(s, out)
    assert request.is_finished() and len(s.waiting) == 0


def test_queue_prepend_order_matches_vllm_fcfs():
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue, SchedulingPolicy

    from vllm_prepack.config import PrepackConfig

    ours, fcfs = PackingRequestQueue(PrepackConfig(), SchedulingPolicy.FCFS), FCFSRequestQueue()
    reqs = [make_request(f"r{i}", 10 + i) for i in range(5)]
    for q in (ours, fcfs):
        q.add_request(reqs[4])
        q.prepend_requests(reqs[:3])
        q.prepend_request(reqs[3])
    assert [r.request_id for r in ours][:4] == [r.request_id for r in fcfs][:4]
    ours.remove_requests([reqs[0], make_request("never-added", 3)])  # absent ids are fine
    assert len(ours) == 4 and reqs[0] not in list(ours)
    assert ours.pop_request() is reqs[3]
    with pytest.raises(IndexError):
        PackingRequestQueue(PrepackConfig(), SchedulingPolicy.FCFS).peek_request()


def test_plan_follows_running_budget(tiny_model):
    """Running requests' tokens are subtracted before the waiting ones are planned."""
    s = standalone_scheduler(tiny_model, budget=256, chunked_prefill=False)
    s.add_request(make_request("long-running", 100, max_tokens=50))
    fake_step(s, s.schedule())  # prefilled; now decodes one token a step
    for i, n in enumerate([255, 200, 55]):
        s.add_request(make_request(f"w{i}", n))
    out = s.schedule()
    assert s.prepack_stats.last.budget == 255  # 256 minus one decode token
    assert set(out.num_scheduled_tokens) == {"long-running", "w1", "w2"}  # 200 + 55 = 255


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-prefill", "whole-prompts"])
def test_drain_aging_keeps_the_tail_near_fcfs_under_arrivals(tiny_model, chunked):
    """Poisson arrivals at 0.95 of the budget (steps, not seconds): shortest-first alone
    stretches p99 TTFT well past FCFS; the default queue-relative aging keeps it near FCFS
    while mean TTFT still drops."""
    from vllm_prepack.bench.harness import poisson_arrivals, simulate
    from vllm_prepack.bench.report import summary
    from vllm_prepack.workloads import prompt_lengths

    lengths = prompt_lengths("mmlu", 250, seed=4, max_len=1023)
    submit = poisson_arrivals(lengths, 1024, 0.95, seed=4)
    ttft = {name: summary(simulate(tiny_model, lengths, "fcfs" if name == "fcfs" else "prepack",
                                   1024, chunked, submit, options).ttft_steps)
            for name, options in [("fcfs", None), ("default", {}),
                                  ("fixed bound only", {"aging_drain_factor": None, "aging_steps": 64})]}
    assert ttft["default"]["p99"] <= 1.25 * ttft["fcfs"]["p99"]
    assert ttft["default"]["mean"] < 0.9 * ttft["fcfs"]["mean"]
    assert ttft["fixed bound only"]["p99"] > 1.25 * ttft["fcfs"]["p99"]


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_ratio_order_without_deadlines_schedules_as_hrrn_does(tiny_model, chunked):
    """order "ratio" inside vLLM's scheduler (Poisson arrivals, no deadlines) gives every
    request the TTFT the HRRN baseline (the queue re-sorted every step) gives it; with whole
    prompts where steps have no fixed cost (so packing does not pay) the step ends at the
    first prompt that does not fit, as HRRN's does, though a shorter one would fit."""
    from vllm_prepack.bench.harness import poisson_arrivals, simulate
    from vllm_prepack.workloads import prompt_lengths

    lengths = prompt_lengths("bimodal", 200, seed=5, max_len=1023)
    submit = poisson_arrivals(lengths, 1024, 1.0, seed=5)
    options = {"aging_drain_factor": None, "step_cost_fixed_tokens": 0, "learn_step_cost": False}
    hrrn = simulate(tiny_model, lengths, "hrrn", 1024, chunked, submit)
    ratio = simulate(tiny_model, lengths, "prepack", 1024, chunked, submit,
                     {**options, "order": "ratio"})
    assert ratio.ttft_steps == hrrn.ttft_steps and ratio.steps == hrrn.steps
    with pytest.warns(StarvationWarning):  # shortest-first without a deadline may starve
        shortest = simulate(tiny_model, lengths, "prepack", 1024, chunked, submit, options)
    assert shortest.ttft_steps != hrrn.ttft_steps  # the option changes the order
    if not chunked:  # where packing pays, prompts that fit go past one that does not
        packing = simulate(tiny_model, lengths, "prepack", 1024, chunked, submit,
                           {**options, "order": "ratio", "step_cost_fixed_tokens": 1e6})
        assert packing.steps < hrrn.steps


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_budget_mirror_is_checked_every_step_and_catches_a_wrong_one(tiny_model, async_scheduling,
                                                                     monkeypatch):
    """Decodes, chunked prefills and (async) output placeholders: every step's mirror of vLLM's
    running phase equals what vLLM then gave the running requests; a mirror off by one token
    fails the step naming the request."""
    from vllm_prepack.scheduler import BudgetMismatch

    s = standalone_scheduler(tiny_model, budget=128, chunked_prefill=True, max_num_seqs=16,
                             async_scheduling=async_scheduling)
    for i, n in enumerate([250, 40, 90, 10, 200, 60]):
        s.add_request(make_request(f"r{i}", n, max_tokens=20))
    steps = drain(s, max_steps=2000)
    assert not s.has_requests()
    assert s.prepack_stats.budget_checks == len(steps) > 20

    s = standalone_scheduler(tiny_model, budget=128, chunked_prefill=True, max_num_seqs=16)
    for i, n in enumerate([250, 40]):
        s.add_request(make_request(f"r{i}", n, max_tokens=20))
    fake_step(s, s.schedule())
    original = PrepackScheduler._running_phase

    def off_by_one(self, *args):
        phase = original(self, *args)
        phase.tokens = {k: v + 1 for k, v in phase.tokens.items()}
        return phase

    monkeypatch.setattr(PrepackScheduler, "_running_phase", off_by_one)
    with pytest.raises(BudgetMismatch, match="running requests got other tokens"):
        s.schedule()


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_budget_mirror_holds_with_a_long_prefill_threshold(tiny_model, adaptive):
    """vLLM's long-prefill threshold caps a prefill's tokens a step (adaptive: at least the
    input budget's share of the requests) wherever more than one request is queued or running;
    the mirror, which counts the requests only where a threshold is set, matches vLLM every
    step."""
    s = standalone_scheduler(tiny_model, budget=256, max_model_len=1024, chunked_prefill=True,
                             max_num_seqs=16, long_prefill_token_threshold=48)
    s.adaptive_long_prefill_threshold = adaptive
    s.add_request(make_request("alone", 600, max_tokens=2))
    alone = drain(s)
    assert alone[0] == {"alone": 256}  # one request: no threshold
    for i in range(4):
        s.add_request(make_request(f"r{i}", 300, max_tokens=2))
    steps = drain(s)
    assert not s.has_requests()
    assert s.prepack_stats.budget_checks == s.prepack_stats.steps
    cap = 256 // 4 if adaptive else 48  # the budget's share of 4 requests, else the threshold
    assert steps[0] == {f"r{i}": cap for i in range(4)}


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prompts", "chunked-prefill"])
def test_requests_holding_kv_blocks_come_off_the_budget(tiny_model, chunked):
    """vLLM drains kv_holding_waiting before the waiting queue, passing over blocked requests;
    one that does not fit takes the rest (chunked) or stops the step (whole prompts)."""
    from vllm.v1.request import RequestStatus

    s = standalone_scheduler(tiny_model, budget=256, chunked_prefill=chunked)
    holder = make_request("holder", 100)
    holder.num_computed_tokens = 32  # holds blocks (e.g. an async KV load landed)
    s.kv_holding_waiting.add_request(holder)
    blocked = make_request("blocked", 200)
    blocked.status = RequestStatus.WAITING_FOR_REMOTE_KVS
    s.kv_holding_waiting.add_request(blocked)
    assert s._step_limits(s._running_phase(), s.max_num_scheduled_tokens).budget == 256 - 68
    s.kv_holding_waiting.add_request(make_request("big", 250))
    assert s._step_limits(s._running_phase(), s.max_num_scheduled_tokens).budget == 0


def test_priority_policy_requeues_by_deadline_like_vllms_priority_queue():
    """vLLM's priority queue has no front: a preempted request goes back by (priority,
    arrival). Here it becomes overdue within its level, not pinned ahead of a higher level."""
    from vllm.v1.core.sched.request_queue import PriorityRequestQueue, SchedulingPolicy

    from vllm_prepack.config import PrepackConfig
    from vllm_prepack.policy import Reason, StepLimits

    ours, theirs = PackingRequestQueue(PrepackConfig(), SchedulingPolicy.PRIORITY), PriorityRequestQueue()
    high = [make_request(f"h{i}", 30 + i, priority=0, arrival_time=10.0 + i) for i in range(2)]
    low = [make_request(f"l{i}", 5 + i, priority=1, arrival_time=20.0 + i) for i in range(2)]
    preempted = make_request("p", 80, priority=1, arrival_time=1.0)
    for q in (ours, theirs):
        for r in high + low:
            q.add_request(r)
        q.prepend_request(preempted)
    picks = ours.begin_step(StepLimits(budget=1000, seats=10, chunked_prefill=False), step=5)
    assert [p.key for p in picks][:2] == ["h0", "h1"]  # the higher level first, as in vLLM
    assert (picks[2].key, picks[2].reason) == ("p", Reason.AGED)  # then it, ahead of l0, l1
    assert [r.request_id for r in theirs][2] == "p"


def test_a_requeued_request_keeps_its_deadline_under_the_priority_policy():
    """Taken by vLLM, then put back (preempted or skipped): it returns with the deadline it had,
    ahead of a request that arrived later and went overdue meanwhile."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    from vllm_prepack.config import PrepackConfig
    from vllm_prepack.policy import StepLimits

    queue = PackingRequestQueue(PrepackConfig(aging_steps=2, aging_drain_factor=None),
                                SchedulingPolicy.PRIORITY)
    old = make_request("old", 50)
    queue.add_request(old)
    limits = StepLimits(budget=1000, seats=10, chunked_prefill=False)
    queue.begin_step(limits, 1)  # old: due at step 0 + 2
    assert queue.pop_request() is old  # admitted ...
    queue.end_step()
    queue.begin_step(limits, 2)
    queue.add_request(make_request("later", 10))  # due at step 2 + 2
    queue.begin_step(limits, 5)
    queue.end_step()
    queue.prepend_request(old)  # ... and preempted, after later went overdue
    picks = queue.begin_step(limits, 6)  # both overdue: old (due 2) before later (due 4)
    assert [p.key for p in picks] == ["old", "later"]


def test_the_queue_lets_go_of_a_request_once_it_leaves():
    """Removed entries may stay referenced a while (stale rows of the admission orders): the
    requests they carried must not, or finished requests would pile up in the engine."""
    import gc
    import weakref

    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    from vllm_prepack.config import PrepackConfig
    from vllm_prepack.policy import StepLimits

    queue = PackingRequestQueue(PrepackConfig(), SchedulingPolicy.FCFS)
    for i in range(4):
        queue.add_request(make_request(f"r{i}", 10 + i))
    queue.begin_step(StepLimits(budget=100, seats=10, chunked_prefill=False), 1)
    popped = weakref.ref(queue.pop_request())
    removed = [r for r in queue if r.request_id == "r2"]
    queue.remove_requests(removed)
    removed = weakref.ref(removed.pop())
    gc.collect()
    assert popped() is None and removed() is None
    assert [r.request_id for r in queue] == ["r1", "r3"]


def test_siblings_of_an_admitted_request_are_looked_up_again():
    """Prefix caching: requests sharing a first block with one vLLM just admitted get their
    uncached length again at the next plan, and shortest-first moves them ahead."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy
    from vllm.v1.request import Request
    from vllm.sampling_params import SamplingParams

    from vllm_prepack.config import PrepackConfig
    from vllm_prepack.policy import StepLimits

    def request(rid, tokens):
        def hasher(r):  # one "hash" per full 16-token block not hashed yet
            done = len(r.block_hashes)
            return [bytes(str(r.all_token_ids[:16 * (b + 1)]), "ascii")
                    for b in range(done, len(r.all_token_ids) // 16)]
        return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=1),
                       pooling_params=None, block_hasher=hasher)

    system = list(range(3, 403))  # 400 tokens: 25 blocks
    cached: set[str] = set()  # the system prompt is cached once "first" has run
    queue = PackingRequestQueue(PrepackConfig(aging_drain_factor=None), SchedulingPolicy.FCFS,
                                cached_tokens=lambda r: 400 if cached and r.all_token_ids[:400] == system else 0)
    siblings = [request(f"s{i}", system + [8] * (60 + i)) for i in range(3)]  # 460-462 tokens
    others = [request(f"o{i}", [9] * 450) for i in range(3)]
    for r in [request("first", system + [7])] + siblings + others:
        queue.add_request(r)
    plan = queue.begin_step(StepLimits(budget=401, seats=100, chunked_prefill=True), 1)
    assert [p.key for p in plan] == ["first"]
    assert queue.pop_request().request_id == "first"  # vLLM admits it; its blocks get cached
    queue.end_step()
    cached.add("system")
    plan = queue.begin_step(StepLimits(budget=10_000, seats=100, chunked_prefill=True), 2)
    assert [p.key for p in plan] == ["s0", "s1", "s2", "o0", "o1", "o2"]  # 60-62 uncached first


@pytest.mark.parametrize("draft_slots", [0, 2], ids=["ngram", "2-draft-slots"])
def test_budget_mirror_holds_with_speculative_decoding(tiny_model, draft_slots, monkeypatch):
    """n-gram speculative decoding: running requests carry draft tokens (num_tokens_with_spec);
    every step's mirror still equals what vLLM scheduled (all drafts rejected here). With draft
    slots (EAGLE/MTP reserve them per request against the input budget; forced here) too."""
    from vllm.config import SpeculativeConfig

    if draft_slots:
        monkeypatch.setattr(SpeculativeConfig, "max_num_new_slots_for_drafting",
                            property(lambda self: draft_slots))
    s = standalone_scheduler(tiny_model, budget=128, chunked_prefill=True, max_num_seqs=16,
                             speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                 "prompt_lookup_max": 3, "prompt_lookup_min": 2})
    for i, n in enumerate([120, 40, 90, 10, 60]):
        s.add_request(make_request(f"r{i}", n, max_tokens=12))
    steps = drafted = 0
    while s.has_requests() and steps < 500:
        out = s.schedule()
        drafted += sum(map(len, out.scheduled_spec_decode_tokens.values()))
        fake_step(s, out)
        for request in s.running:  # what the drafter would propose for the next step
            if request.num_computed_tokens >= request.num_prompt_tokens:
                request.spec_token_ids = [7, 7, 7]
        steps += 1
    assert not s.has_requests()
    assert s.prepack_stats.budget_checks == steps
    assert drafted > 20  # draft tokens did take budget
    assert s._draft_slots == draft_slots


# ---- the step cost and the KV fit ---------------------------------------------------------------


def test_the_plugin_learns_the_step_cost_from_the_steps_it_times(tiny_model):
    """Engine-free, in seconds: every step takes a + b x tokens on the harness's clock; the
    plugin times whole steps (update_from_output to update_from_output) and fits a and b.
    With a = the time of a full step it packs (fewer steps than shortest-first); with a = 0
    it orders like shortest-first."""
    from vllm_prepack.bench.harness import simulate
    from vllm_prepack.bench.report import summary
    from vllm_prepack.cost import StepCost
    from vllm_prepack.workloads import prompt_lengths

    lengths = prompt_lengths("heavytail", 400, seed=2, max_len=1023)
    for fixed_tokens in (0, 1024):
        truth = StepCost(fixed_tokens * 1e-5, 1e-5)
        runs = {s: simulate(tiny_model, lengths, s, 1024, False, cost=truth) for s in ("spf", "prepack")}
        fit = runs["prepack"].cost
        fitted = StepCost(fit["fixed_s"], fit["per_token_s"], fit["per_seq_s"])
        assert fitted.seconds(1000) == pytest.approx(truth.seconds(1000), rel=1e-3)
        assert fitted.fixed_tokens == pytest.approx(fixed_tokens, abs=1)
        spf, pack = (summary(runs[s].ttft_s)["mean"] for s in ("spf", "prepack"))
        if fixed_tokens:
            assert runs["prepack"].steps < runs["spf"].steps and runs["prepack"].wall < runs["spf"].wall
        else:
            # the deadlines of the backlog's tail may reorder its last steps
            assert runs["prepack"].steps == runs["spf"].steps and pack <= 1.01 * spf


# a CPU's a / b; an H200's (BENCHMARKS.md) without c, and with its per-prompt cost: a prompt
# costs 173 tokens of work there, a full mmlu step's prompts 2.6x its tokens. The first steps
# slowed by an engine's warm-up
@pytest.mark.parametrize(("mix", "fixed_tokens", "seq_tokens"),
                         [("mmlu", 8, 0), ("trimodal", 17_500, 0), ("mmlu", 16_240, 173)])
def test_a_deep_backlog_on_noisy_steps_is_scheduled_for_its_cost(tiny_model, mix, fixed_tokens,
                                                                 seq_tokens):
    """Engine timings are noisy, an engine's first steps slow, and a backlog's steps all about
    as full: where a dominates (an H200's share, 0.81-0.945) the plugin still learns it and
    packs, fewer steps and less time than SPF; where it does not (a CPU's), it keeps SPF's time
    and mean TTFT. Probes (a half step each) at most PROBE_LIMIT."""
    from vllm_prepack.bench.harness import NoisyStepCost, simulate
    from vllm_prepack.bench.report import summary
    from vllm_prepack.cost import PROBE_LIMIT, StepCost
    from vllm_prepack.workloads import prompt_lengths

    lengths = prompt_lengths(mix, 3000, seed=0, max_len=256)
    truth = StepCost.in_tokens(fixed_tokens, seq_tokens, per_token=1e-5)
    runs = {s: simulate(tiny_model, lengths, s, 1024, False,
                        cost=NoisyStepCost(truth, 0.03, warmup=20, budget=1024))
            for s in ("spf", "prepack")}
    plugin, spf = runs["prepack"], runs["spf"]
    assert plugin.cost["probes"] <= PROBE_LIMIT
    mean = {s: summary(o.ttft_s)["mean"] for s, o in runs.items()}
    if fixed_tokens > 1024:
        assert plugin.steps < spf.steps and plugin.wall < spf.wall and mean["prepack"] < mean["spf"]
    else:
        assert plugin.wall <= 1.001 * spf.wall and mean["prepack"] <= 1.01 * mean["spf"]


def test_near_the_threshold_the_bins_are_reserved_while_the_fit_decides(tiny_model):
    """At a share just over the threshold (PACK_SHARE + 0.02 of a step at a budget of 1024) the
    noisy fit takes probes to be sure; the bins, reserved from the fitted share meanwhile, still
    find their fillers: fewer steps than SPF (they were more while no bin was built before the
    fit was sure), at SPF's mean TTFT within 1%."""
    from vllm_prepack.bench.harness import NoisyStepCost, simulate
    from vllm_prepack.bench.report import summary
    from vllm_prepack.cost import StepCost
    from vllm_prepack.policy import PACK_SHARE
    from vllm_prepack.workloads import prompt_lengths

    lengths = prompt_lengths("bimodal", 1000, seed=0, max_len=1023)
    share = PACK_SHARE + 0.02
    truth = StepCost.in_tokens(share / (1 - share) * 1024, per_token=1e-5)
    runs = {s: simulate(tiny_model, lengths, s, 1024, False,
                        cost=NoisyStepCost(truth, 0.03, warmup=20, budget=1024))
            for s in ("spf", "prepack")}
    plugin, spf = runs["prepack"], runs["spf"]
    assert plugin.cost["probes"] >= 1  # the fit was not sure at once
    assert plugin.steps < spf.steps and plugin.wall < spf.wall
    assert summary(plugin.ttft_s)["mean"] <= 1.01 * summary(spf.ttft_s)["mean"]


def test_packing_always_probes_the_share_its_bins_gaps_follow(tiny_model, monkeypatch):
    """Packing always (``pack_fixed_share`` 0) where a step is mostly its fixed cost (an
    H200's share, 0.945): the plan is told the cost is the prior's guess until the fit has its
    steps; the model probes, since the bins' gaps follow the share's value, and the backlog
    takes within 1.02x offline FFD's makespan (never probed, the fit stayed near the prior's
    share for hundreds of steps and the bins left their gaps open for 1.05x)."""
    from vllm_prepack.bench.harness import NoisyStepCost, simulate
    from vllm_prepack.cost import MIN_STEPS, WARMUP_STEPS, StepCost
    from vllm_prepack.policy import WaitingSet
    from vllm_prepack.workloads import prompt_lengths

    lengths = prompt_lengths("bimodal", 3000, seed=0, max_len=1023)
    truth = StepCost.in_tokens(17_500, per_token=1e-5)

    def clock():
        return NoisyStepCost(truth, 0.03, warmup=20, budget=1024)

    ffd = simulate(tiny_model, lengths, "ffd", 1024, False, cost=clock())
    learning, plan = [], WaitingSet.plan
    monkeypatch.setattr(WaitingSet, "plan", lambda self, limits, *args: (
        learning.append(limits.cost_learning), plan(self, limits, *args))[1])
    plugin = simulate(tiny_model, lengths, "prepack", 1024, False,
                      options={"pack_fixed_share": 0}, cost=clock())
    fitted = learning.index(False)
    assert WARMUP_STEPS + MIN_STEPS <= fitted <= WARMUP_STEPS + MIN_STEPS + 2
    assert all(learning[:fitted]) and not any(learning[fitted:])
    assert plugin.cost["probes"] >= 1
    assert plugin.wall <= 1.02 * ffd.wall


def timed_scheduler(tiny_model):
    """A scheduler on a clock the test sets (seconds in a one-item list), and the step times
    its step-cost model is shown."""
    s = standalone_scheduler(tiny_model, budget=256, chunked_prefill=False)
    clock, seen = [0.0], []
    s.prepack_clock = lambda: clock[0]
    observe = s.step_cost_model.observe
    s.step_cost_model.observe = lambda t, n, sec: (seen.append(sec), observe(t, n, sec))
    return s, clock, seen


def test_the_time_between_two_jobs_is_not_a_step(tiny_model):
    """An engine its caller steps (``LLM.generate`` in-process) stops at its last request's
    step, with the finished ids still to clear; the next job, a minute later, must not time
    its first step from the last job's end (a minute read as a step's cost)."""
    s, clock, seen = timed_scheduler(tiny_model)
    for job in range(2):
        for i in range(6):
            s.add_request(make_request(f"j{job}r{i}", 200))
        while s.has_unfinished_requests():  # as LLMEngine.step's caller loops
            out = s.schedule()
            clock[0] += 0.01 * out.total_num_scheduled_tokens / 256
            fake_step(s, out)
        assert s.has_requests()  # the finished ids ride the next job's first step
        clock[0] += 60.0
    assert len(seen) == 12 - 2 and max(seen) < 1.0


def test_a_job_ended_by_an_abort_is_not_timed_across_the_pause_either(tiny_model):
    """A stop string ends a request after the step's update (the engine aborts it then): the
    scheduler still counted it unfinished at the update, so the clock ran on; the next request,
    a minute later, starts an idle engine's first step, not timed."""
    from vllm.v1.request import RequestStatus

    s, clock, seen = timed_scheduler(tiny_model)
    for job in range(2):
        s.add_request(make_request(f"j{job}", 200, max_tokens=50))
        for _ in range(3):  # prefill, then two decode steps
            out = s.schedule()
            clock[0] += 0.01
            fake_step(s, out)
        s.finish_requests(f"j{job}", RequestStatus.FINISHED_ABORTED)  # its stop string
        clock[0] += 60.0
    assert len(seen) == 2 * 2 and max(seen) < 1.0


def test_short_prompts_are_admitted_past_a_long_one_whose_blocks_are_not_free(tiny_model):
    """A long generation holds most of a small KV pool; a long prompt that would need more
    blocks than are free waits, and the short ones behind it go (plain vLLM stops at it)."""
    def run(scheduler):
        s = standalone_scheduler(tiny_model, scheduler=scheduler, budget=512, max_model_len=512,
                                 chunked_prefill=False, num_blocks=40, block_size=16)
        s.add_request(make_request("holder", 400, max_tokens=40))  # 25+ blocks while it decodes
        fake_step(s, s.schedule())
        s.add_request(make_request("long", 300))  # 19 blocks: not free until holder ends
        for i in range(4):
            s.add_request(make_request(f"short{i}", 20))
        out = s.schedule()
        return set(out.num_scheduled_tokens) - {"holder"}

    assert run("fcfs") == set()  # head-of-line: vLLM stops at the long prompt
    assert run("prepack") == {f"short{i}" for i in range(4)}
def first_admitted(tiny_model, scheduler, rid, steps=12):
    """Step a scheduler (budget 256, whole prompts) holding a 250-token prompt while two
    100-token prompts arrive every step: the step at which `rid` is first scheduled, or None."""
    s = standalone_scheduler(tiny_model, scheduler=scheduler, budget=256, verify=False)
    s.add_request(make_request("long", 250))
    for step in range(steps):
        for k in range(2):
            s.add_request(make_request(f"s{step}.{k}", 100))
        out = s.schedule()
        if rid in out.num_scheduled_tokens:
            return step
        fake_step(s, out)
    return None


def test_baselines_order_as_sglang_does(tiny_model):
    """SPF serves the shortest prefill first, so a long prompt starves under steady short
    arrivals; HRRN's response ratio (wait + service) / service lets it through within a few
    steps; FCFS takes it first."""
    assert first_admitted(tiny_model, "spf", "long") is None
    assert 1 <= first_admitted(tiny_model, "hrrn", "long") <= 4
    assert first_admitted(tiny_model, "fcfs", "long") == 0
    spf = standalone_scheduler(tiny_model, scheduler="spf", verify=False)
    for i, n in enumerate([200, 30, 100, 250, 20]):
        spf.add_request(make_request(f"r{i}", n))
    assert [step for step in drain(spf) if step] == [{"r4": 20, "r1": 30, "r2": 100},
                                                     {"r0": 200}, {"r3": 250}]


def test_budget_mirror_holds_when_prefills_are_held_back(tiny_model):
    """Decodes running, prefills held back: by data-parallel throttling (every release, the
    engine core's throttle_prefills) and, from vLLM 0.33, by the local prefill cadence
    (prefill_schedule_interval without data parallelism). The mirror matches vLLM on every step,
    and the plan admits nothing while vLLM holds prefills back."""
    from vllm_prepack.touchpoints import vllm_version

    s = standalone_scheduler(tiny_model, budget=256, chunked_prefill=True, max_num_seqs=16,
                             prefill_schedule_interval=3)
    s.add_request(make_request("decoding", 20, max_tokens=40))
    fake_step(s, s.schedule())
    held = 0
    for step in range(12):
        s.add_request(make_request(f"new{step}", 30, max_tokens=2))
        out = s.schedule(step % 4 == 0)  # the DP engine core's throttle, every fourth step
        admitted = [r.req_id for r in out.scheduled_new_reqs]
        if s.prepack_stats.last.budget == 0:
            held += 1
            assert admitted == []
        fake_step(s, out)
    assert s.prepack_stats.budget_checks == s.prepack_stats.steps
    local_cadence = vllm_version() >= (0, 33)
    assert held == (9 if local_cadence else 3)  # 0.33: 6 more, two of every three steps
