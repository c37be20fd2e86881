"""vLLM's real Scheduler / AsyncScheduler with the plugin, driven without an engine."""

import pytest

from vllm_prepack.bench.harness import fake_step, make_request, standalone_scheduler
from vllm_prepack.scheduler import PackingRequestQueue, PrepackAsyncScheduler, PrepackScheduler


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
    for i, n in enumerate([200, 30, 100, 250, 20]):
        s.add_request(make_request(f"r{i}", n))
    steps = [step for step in drain(s) if step]
    # step 1 packs 20+30+200 (FCFS: 200+30, then stops at 100); by step 2 the two left have
    # waited 2 steps, longer than their 350 tokens take to drain (1.4 steps): aged, oldest first
    assert steps == [{"r4": 20, "r1": 30, "r0": 200}, {"r2": 100}, {"r3": 250}]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_plain_vllm_head_of_line_blocks_on_the_same_input(tiny_model, async_scheduling):
    s = standalone_scheduler(tiny_model, prepack=False, async_scheduling=async_scheduling)
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


def test_queue_prepend_order_matches_vllm_fcfs(tiny_model):
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
    from vllm_prepack.bench.report import summary
    from vllm_prepack.bench.scheduler import poisson_arrivals, simulate
    from vllm_prepack.workloads import prompt_lengths

    lengths = prompt_lengths("mmlu", 600, seed=4, max_len=1023)
    submit = poisson_arrivals(lengths, 1024, 0.95, seed=4)
    ttft = {name: summary(simulate(tiny_model, lengths, name != "fcfs", 1024, chunked, submit,
                                   options).ttft_steps)
            for name, options in [("fcfs", None), ("default", {}),
                                  ("fixed bound only", {"aging_drain_factor": None})]}
    assert ttft["default"]["p99"] <= 1.25 * ttft["fcfs"]["p99"]
    assert ttft["default"]["mean"] < 0.9 * ttft["fcfs"]["mean"]
    assert ttft["fixed bound only"]["p99"] > 1.25 * ttft["fcfs"]["p99"]
