"""The plugin inside a real vLLM engine (CPU backend), on model folders the tests create."""

import math

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_prepack.config import PrepackConfigError
from vllm_prepack.bench.engines import run_stepwise
from vllm_prepack.touchpoints import engine_scheduler
from vllm_prepack.workloads import prompt_lengths, token_ids

pytestmark = pytest.mark.engine

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
MIXED = token_ids(prompt_lengths("bimodal", 24, seed=1, max_len=400), vocab_size=512, seed=1)


def generate(llm, prompts, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize(
    "chunked, budget", [(True, 128), (False, 512)], ids=["chunked-prefill", "whole-prompts"]
)
def test_greedy_outputs_identical_to_plain_vllm(engine, tiny_model, chunked, budget):
    kw = dict(enable_chunked_prefill=chunked, max_num_batched_tokens=budget)
    plain = generate(engine(tiny_model, False, **kw), MIXED)
    packed_llm = engine(tiny_model, True, **kw)
    packed = generate(packed_llm, MIXED)
    assert packed == plain
    assert all(len(t) == GREEDY.max_tokens for t in packed)
    stats = engine_scheduler(packed_llm).prepack_stats
    assert stats.admitted >= len(MIXED) and stats.steps > 0


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_ratio_order_outputs_identical_to_plain_vllm(engine, tiny_model, chunked):
    """order "ratio" (response-ratio order, the default deadlines) changes the order of
    admission only: outputs equal plain vLLM's, and its steps did plan by ratio."""
    from vllm_prepack.policy import Reason

    kw = dict(enable_chunked_prefill=chunked, max_num_batched_tokens=128 if chunked else 512)
    packed_llm = engine(tiny_model, {"order": "ratio"}, **kw)
    stats = engine_scheduler(packed_llm).prepack_stats
    stats.keep_history = True
    packed = generate(packed_llm, MIXED)
    assert packed == generate(engine(tiny_model, False, **kw), MIXED)
    assert any(p.reason == Reason.RATIO for record in stats.history for p in record.planned)
    if not chunked:  # vLLM starts what was planned and no more (none past a planned stop)
        assert all(set(record.scheduled_new) <= {p.key for p in record.planned}
                   for record in stats.history)


def test_greedy_identical_on_qwen2(engine, tiny_qwen2):
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=128)
    assert generate(engine(tiny_qwen2, True, **kw), MIXED) == generate(
        engine(tiny_qwen2, False, **kw), MIXED
    )


def test_structured_output_requests_match_plain_vllm(engine, tiny_model):
    """Requests with a grammar among plain ones: vLLM compiles each grammar off the step and
    passes the request over until it is ready; the plugin plans it from then (the parking
    itself is tested without an engine, where the grammar's compilation is timed). Outputs equal
    plain vLLM's, and the grammar ended the constrained ones (the byte-level test tokenizer
    leaves the model's ids past its vocabulary unconstrained); nothing is lost."""
    from vllm.sampling_params import StructuredOutputsParams

    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=512)
    plain_llm, packed_llm = engine(tiny_model, False, **kw), engine(tiny_model, True, **kw)
    regex = "(ab|ba)+c"
    constrained = SamplingParams(max_tokens=12, temperature=0,
                                 structured_outputs=StructuredOutputsParams(regex=regex))
    params = [constrained if i % 3 == 0 else GREEDY for i in range(len(MIXED))]

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in MIXED], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason)
                for o in outs]

    packed = run(packed_llm)
    assert packed == run(plain_llm)
    ended = [text for (_, text, why), p in zip(packed, params) if p is constrained and why == "stop"]
    assert ended and all(text.endswith("ac") or text.endswith("bc") for text in ended)
    assert len(engine_scheduler(packed_llm).waiting) == 0  # none left parked


def test_probe_steps_stay_within_their_cap_and_outputs_match_plain_vllm(engine, tiny_model,
                                                                        monkeypatch):
    """The step-cost model's probe (cost.py), asked for on the first steps a backlog of whole
    prompts fills (the model spaces its own out): vLLM's own loop schedules each such step
    within the cap, its budget mirror checked every step, and the tokens equal plain vLLM's."""
    budget = 512
    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=budget)
    plain = generate(engine(tiny_model, False, **kw), MIXED)
    packed_llm = engine(tiny_model, True, **kw)
    scheduler = engine_scheduler(packed_llm)
    stats, cap, probed = scheduler.prepack_stats, budget // 2, []
    monkeypatch.setattr(stats, "keep_history", True)
    monkeypatch.setattr(stats, "history", [])

    def probe_tokens(waiting_tokens):
        if len(probed) == 3 or not waiting_tokens:
            return None
        probed.append(len(stats.history))  # the index of the step this cap is for
        return cap

    monkeypatch.setattr(scheduler.step_cost_model, "probe_tokens", probe_tokens)
    assert generate(packed_llm, MIXED) == plain
    assert probed and all(0 < stats.history[i].scheduled_tokens <= cap for i in probed)
    assert scheduler.max_num_scheduled_tokens == budget  # restored after each
    assert max(record.scheduled_tokens for record in stats.history) > cap  # others not capped


def test_the_step_cost_model_times_no_step_across_the_pause_between_two_jobs(engine, tiny_model,
                                                                            monkeypatch):
    """``LLM.generate`` steps the engine in this process until its requests finish, leaving
    their ids for the next job's first step: that step is not timed from the last job's end
    (a pause of 1000 s here, on the scheduler's clock)."""
    import time

    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=512)
    llm = engine(tiny_model, True, **kw)
    scheduler = engine_scheduler(llm)
    model = scheduler.step_cost_model
    seen, paused = [], [0.0]
    observe = model.observe
    monkeypatch.setattr(model, "observe", lambda t, n, s: (seen.append(s), observe(t, n, s)))
    monkeypatch.setattr(scheduler, "prepack_clock", lambda: time.perf_counter() + paused[0])
    generate(llm, MIXED[:6], FIRST_TOKEN)
    paused[0] += 1000.0
    generate(llm, MIXED[:6], FIRST_TOKEN)
    assert seen and max(seen) < 100.0


def test_plugin_is_observably_active(engine, tiny_model):
    """The doc's example: FCFS takes 200+30 and stops at 100; prepack fills the step."""
    prompts = token_ids([200, 30, 100, 250, 20], vocab_size=512, seed=2)
    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=256, max_model_len=256)
    plain = run_stepwise(engine(tiny_model, False, **kw), prompts, FIRST_TOKEN)
    packed_llm = engine(tiny_model, True, **kw)
    packed = run_stepwise(packed_llm, prompts, FIRST_TOKEN)
    assert [r.first_step for r in plain.results] == [1, 1, 2, 3, 4]  # FCFS, head-of-line
    # 20+30+200 | 250 (best fit for 100) | 100
    assert [r.first_step for r in packed.results] == [1, 1, 3, 2, 1]
    assert packed.steps == math.ceil(sum(map(len, prompts)) / 256) == 3
    stats = engine_scheduler(packed_llm).prepack_stats
    assert stats.admitted_as_planned == stats.admitted  # vLLM admitted exactly the plan


def test_backlog_mean_ttft_drops_and_nothing_is_lost(engine, tiny_model):
    lengths = prompt_lengths("mmlu", 120, seed=3, max_len=256)
    prompts = token_ids(lengths, vocab_size=512, seed=3)
    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=512)
    plain = run_stepwise(engine(tiny_model, False, **kw), prompts, FIRST_TOKEN)
    packed = run_stepwise(engine(tiny_model, True, **kw), prompts, FIRST_TOKEN)
    assert all(r.finished for r in packed.results)
    mean = lambda run: sum(r.first_step for r in run.results) / len(run.results)  # noqa: E731
    assert mean(packed) < 0.8 * mean(plain)
    assert packed.steps <= plain.steps  # no probe: 15 steps wait, short of PROBE_BACKLOG_STEPS
    assert [r.token_ids for r in packed.results] == [r.token_ids for r in plain.results]


def test_tiny_kv_cache_preempts_and_still_completes(engine, tiny_model):
    prompts = token_ids([90, 120, 60, 150, 100, 80, 110, 70], vocab_size=512, seed=4)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    llm = engine(tiny_model, True, enable_chunked_prefill=True, max_num_batched_tokens=128,
                 num_gpu_blocks_override=6)  # CPU blocks hold 128 tokens: ~640 usable, ~1200 needed
    outs = generate(llm, prompts, params)
    assert all(len(t) == 48 for t in outs)
    assert engine_scheduler(llm).prepack_stats.preempted > 0


def test_aborted_request_leaves_the_rest_intact(engine, tiny_model):
    llm = engine(tiny_model, True, enable_chunked_prefill=True, max_num_batched_tokens=128)
    prompts = token_ids([40, 300, 25, 180, 60], vocab_size=512, seed=5)
    expected = generate(llm, prompts)
    aborted = {"1", "3"}
    run = run_stepwise(llm, prompts, GREEDY,
                       on_step=lambda step: step == 1 and llm.llm_engine.abort_request(list(aborted)))
    for r in run.results:
        if str(r.index) in aborted:
            assert not r.finished  # aborted after one step: 12 tokens cannot be done
        else:
            assert r.finished and r.token_ids == expected[r.index]
    scheduler = engine_scheduler(llm)
    assert not scheduler.waiting and not scheduler.running and not scheduler.requests


def test_a_request_with_n_samples_arrives_at_the_scheduler_as_n(engine, tiny_model):
    """What the token router's charge of n arrivals for n samples rests on (routing.py): the
    load report counts the n requests the engine takes."""
    llm = engine(tiny_model, True, enable_chunked_prefill=True, max_num_batched_tokens=128)
    scheduler = engine_scheduler(llm)
    before = scheduler.load_report().arrived
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                        SamplingParams(n=3, max_tokens=2, temperature=1.0, seed=0), use_tqdm=False)
    assert len(outs[0].outputs) == 3
    assert scheduler.load_report().arrived == before + 3


def test_priority_policy_packs_inside_each_level(engine, tiny_model):
    lengths = [200, 30, 100, 250, 20, 40, 220, 10]
    priorities = [1, 1, 0, 0, 1, 0, 1, 0]
    prompts = token_ids(lengths, vocab_size=512, seed=6)
    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=256, max_model_len=256,
              scheduling_policy="priority")
    run = run_stepwise(engine(tiny_model, True, **kw), prompts, FIRST_TOKEN, priorities=priorities)
    first = {r.index: r.first_step for r in run.results}
    last_high = max(first[i] for i, p in enumerate(priorities) if p == 0)
    first_low = min(first[i] for i, p in enumerate(priorities) if p == 1)
    assert first_low >= last_high  # level 1 only gets what level 0 leaves
    assert first[7] == first[5] == 1  # inside level 0: shortest first (10, 40 ...)
    plain = run_stepwise(engine(tiny_model, False, **kw), prompts, FIRST_TOKEN, priorities=priorities)
    assert [r.token_ids for r in run.results] == [r.token_ids for r in plain.results]


def test_embeddings_equal_plain_vllm(engine, minilm):
    lengths = prompt_lengths("mmlu", 48, seed=7, max_len=250)
    prompts = token_ids(lengths, vocab_size=30000, seed=7, first_id=1000)
    kw = dict(runner="pooling", dtype="float32", max_model_len=256,
              max_num_batched_tokens=512)
    from vllm import PoolingParams

    params = PoolingParams(task="embed")
    plain = run_stepwise(engine(minilm, False, **kw), prompts, params)
    packed = run_stepwise(engine(minilm, True, **kw), prompts, params)
    assert packed.steps <= plain.steps
    for a, b in zip(plain.results, packed.results):
        assert a.finished and b.finished
        assert len(a.embedding) == len(b.embedding) == 384
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"aging_steps": -1}, r"\['aging_steps'\] must be >= 1"),
        ({"agin_steps": 3}, r"unknown option\(s\) 'agin_steps'"),
        ({"max_swaps": "4"}, r"\['max_swaps'\] must be an integer"),
    ],
)
def test_bad_options_fail_engine_start_naming_the_key(tiny_model, options, message):
    from vllm_prepack.bench.engines import build_llm

    with pytest.raises(PrepackConfigError, match=message):
        build_llm(tiny_model, options, dtype="float32", max_model_len=256,
                  num_gpu_blocks_override=64)


@pytest.mark.parametrize("bad, message", [([5] * 600, "maximum context length is 512"),
                                          ([], "cannot be empty")], ids=["over-long", "empty"])
def test_bad_prompt_is_refused_and_accepted_ones_complete(engine, tiny_model, bad, message):
    llm = engine(tiny_model, True, enable_chunked_prefill=True, max_num_batched_tokens=128)
    prompts = token_ids([40, 90, 15], vocab_size=512, seed=8)
    expected = generate(llm, prompts)
    eng = llm.llm_engine
    ids = [f"ok{i}" for i in range(len(prompts))]
    try:
        for rid, p in zip(ids, prompts):
            eng.add_request(rid, {"prompt_token_ids": p}, GREEDY)
        eng.step()  # accepted and already running
        with pytest.raises(VLLMValidationError, match=message):
            eng.add_request("bad", {"prompt_token_ids": bad}, GREEDY)
        done = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
        assert done == dict(zip(ids, expected))
    finally:
        eng.abort_request(ids)  # a shared engine: leave nothing behind on failure


def test_lora_limit_is_planned_and_outputs_match_plain_vllm(engine, tiny_model, lora_adapters):
    """max_loras=1 with two adapters interleaved: every step's plan holds one adapter, so vLLM
    admits all of it; outputs equal plain vLLM's. (Requests without an adapter are left out:
    vLLM 0.32's CPU LoRA path gives them batch-dependent outputs, with or without the plugin.)"""
    from vllm.lora.request import LoRARequest

    prompts = token_ids(prompt_lengths("bimodal", 16, seed=9, max_len=400), vocab_size=512, seed=9)
    adapters = [LoRARequest(f"lora-{i}", i + 1, path) for i, path in enumerate(lora_adapters)]
    per_prompt = [adapters[i % 2] for i in range(len(prompts))]
    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=512, enable_lora=True,
              max_loras=1, max_lora_rank=8)

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                            lora_request=per_prompt, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    packed_llm = engine(tiny_model, True, **kw)
    stats = engine_scheduler(packed_llm).prepack_stats
    stats.keep_history, stats.history = True, []
    try:
        packed = run(packed_llm)
    finally:
        stats.keep_history = False
    assert packed == run(engine(tiny_model, False, **kw))
    base = generate(engine(tiny_model, False, enable_chunked_prefill=False, max_num_batched_tokens=512),
                    prompts)
    assert sum(a != b for a, b in zip(packed, base)) >= len(prompts) // 2  # adapters are applied
    planned = [record for record in stats.history if record.planned]
    assert len(planned) > 2
    for record in planned:  # a plan with two adapters would see vLLM skip one of them
        assert {p.key for p in record.planned} <= set(record.scheduled_new)


def test_prefix_caching_on_outputs_match_and_cached_siblings_go_early(engine, tiny_model):
    """Prefix caching on (vLLM's default). Eight prompts share a 300-token system prompt and
    arrive after six 350-token ones; once one of them has run, the others cost ~20 uncached
    tokens and follow at once. Outputs equal plain vLLM's with prefix caching on."""
    system = token_ids([300], vocab_size=512, seed=20)[0]
    tails = token_ids([1] + [10 + i for i in range(7)], vocab_size=512, seed=21)
    shared = [system + t for t in tails]
    prompts = token_ids([350] * 6, vocab_size=512, seed=22) + shared  # FCFS: the 350s first
    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=512, enable_prefix_caching=True)
    packed = run_stepwise(engine(tiny_model, True, **kw), prompts, FIRST_TOKEN)
    plain = run_stepwise(engine(tiny_model, False, **kw), prompts, FIRST_TOKEN)
    first = [r.first_step for r in packed.results]
    primer = min(first[6:])
    assert max(first[6:]) == primer + 1  # the siblings, cached once one has run, right after it
    assert max(first[6:]) < max(first[:6])
    mean = lambda run: sum(r.first_step for r in run.results) / len(run.results)  # noqa: E731
    assert mean(packed) < 0.8 * mean(plain)
    assert [r.token_ids for r in packed.results] == [r.token_ids for r in plain.results]


def _stream(llm, prompts, params, arrive_at):
    """Submit prompt i at step arrive_at[i]; step until all finish: first-token steps, outputs."""
    eng = llm.llm_engine
    first, outputs, step = {}, {}, 0
    pending = sorted(range(len(prompts)), key=lambda i: arrive_at[i])
    try:
        while pending or eng.has_unfinished_requests():
            while pending and arrive_at[pending[0]] <= step:
                i = pending.pop(0)
                eng.add_request(str(i), {"prompt_token_ids": prompts[i]}, params[i])
            step += 1
            for out in eng.step():
                if out.outputs[0].token_ids:
                    first.setdefault(int(out.request_id), step)
                if out.finished:
                    outputs[int(out.request_id)] = list(out.outputs[0].token_ids)
            assert step < 2000
    finally:
        eng.abort_request([str(i) for i in range(len(prompts))])
    return first, outputs


def test_short_prompts_flow_behind_a_long_one_whose_kv_blocks_are_not_free(engine, tiny_model):
    """A small KV pool: a long generation holds most blocks, a long prompt arrives that needs
    more than are free, then short prompts keep arriving. Plain vLLM stops at the long prompt
    until the generation ends; the plugin admits the short ones past it and the long one once
    its blocks are free (nothing starves); outputs equal plain vLLM's."""
    kw = dict(enable_chunked_prefill=False, max_num_batched_tokens=512, num_gpu_blocks_override=6)
    block = engine_scheduler(engine(tiny_model, False, **kw)).block_size
    holder, long = 2 * block + block // 2, 3 * block  # 3 blocks, growing; 4 blocks of 6
    prompts = token_ids([holder, long] + [12] * 10, vocab_size=512, seed=30)
    params = [SamplingParams(max_tokens=block // 2, temperature=0, ignore_eos=True)] + [GREEDY] * 11
    arrive = [0, 1] + [2 + 2 * i for i in range(10)]
    plain_first, plain_out = _stream(engine(tiny_model, False, **kw), prompts, params, arrive)
    packed_first, packed_out = _stream(engine(tiny_model, True, **kw), prompts, params, arrive)
    assert packed_out == plain_out and len(packed_out) == len(prompts)  # nothing starved
    wait = lambda first: sum(first[i] - arrive[i] for i in range(2, 12)) / 10  # noqa: E731
    assert wait(packed_first) <= 0.5 * wait(plain_first)
    assert packed_first[1] <= plain_first[1] + 2  # the long one is not held back for long
