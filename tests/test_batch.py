"""The Ray batch job over real vLLM replicas: a local Ray cluster, ray.init(num_cpus=2)."""

import json

import pytest
import ray

from vllm_prepack.batch import Writer, estimate_weights, parse_lines, run_job, start_replicas
from vllm_prepack.workloads import prompt_lengths, token_ids

ENGINE = dict(dtype="float32", max_model_len=512, max_num_batched_tokens=256,
              enable_prefix_caching=False, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def replicas(cluster, tiny_model):
    return start_replicas(tiny_model, 2, "generate", ENGINE, num_cpus=0.5)


def job_lines(n=40, seed=0):
    lengths = prompt_lengths("bimodal", n, seed=seed, max_len=400)
    prompts = token_ids(lengths, vocab_size=512, seed=seed)
    return [json.dumps({"id": f"q{i}", "prompt_token_ids": p, "max_tokens": 4})
            for i, p in enumerate(prompts)]


def items_for(lines, task="generate"):
    items, errors = parse_lines(lines, 4, task)
    estimate_weights(items)
    return items, errors


def read(path):
    return [json.loads(line) for line in open(path)]


def test_every_input_exactly_once_and_plugin_active_in_each_replica(replicas, tmp_path):
    lines = job_lines()
    items, errors = items_for(lines)
    report = run_job(items, Writer(tmp_path / "out.jsonl"), replicas, chunk_tokens=800,
                     prior_errors=errors, progress=False)
    records = read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(len(lines)))
    assert all(r["error"] is None and len(r["token_ids"]) == 4 for r in records)
    assert {r["replica"] for r in records} == {0, 1}  # both replicas worked
    info = report.replicas
    assert [i["scheduler"] for i in info] == ["PrepackScheduler"] * 2
    assert all(i["plugin_registered"] for i in info)  # the entry point ran in each actor
    assert len({i["pid"] for i in info}) == 2


def test_bad_lines_become_error_records_and_the_rest_completes(replicas, tmp_path):
    lines = job_lines(10, seed=1) + [
        "{not json",
        json.dumps({"id": "empty", "prompt_token_ids": []}),
        json.dumps({"id": "both", "prompt": "x", "prompt_token_ids": [5]}),
        json.dumps({"id": "too-long", "prompt_token_ids": [5] * 600}),
        json.dumps({"id": "bad-tokens", "prompt_token_ids": [5, 100000]}),
        json.dumps({"id": "q0", "prompt_token_ids": [5]}),  # duplicate id
    ]
    items, errors = items_for(lines)
    run_job(items, Writer(tmp_path / "out.jsonl"), replicas, prior_errors=errors, progress=False)
    by_line = {r["line"]: r for r in read(tmp_path / "out.jsonl")}
    assert sorted(by_line) == list(range(1, len(lines) + 1))  # one record per line
    assert all(by_line[n]["error"] is None for n in range(1, 11))
    assert "line 11:" in by_line[11]["error"]
    assert "non-empty list" in by_line[12]["error"]
    assert "exactly one of" in by_line[13]["error"]
    assert "line 14:" in by_line[14]["error"] and "512" in by_line[14]["error"]  # too long
    assert "line 15:" in by_line[15]["error"]  # out-of-vocabulary token
    assert "duplicate id" in by_line[16]["error"]


def test_interrupt_and_resume_loses_and_duplicates_nothing(replicas, tmp_path):
    lines = job_lines(30, seed=2)
    items, errors = items_for(lines)
    out = Writer(tmp_path / "out.jsonl")

    class Interrupt(Exception):
        pass

    def stop_after_first_write(records):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_job(items, out, replicas, chunk_tokens=600, on_write=stop_after_first_write,
                progress=False)
    first = read(tmp_path / "out.jsonl")
    assert 0 < len(first) < len(lines)
    with open(tmp_path / "out.jsonl", "a") as f:
        f.write('{"id": "q-torn", "li')  # a write torn by the interruption
    report = run_job(items, Writer(tmp_path / "out.jsonl"), replicas, progress=False)
    records = read(tmp_path / "out.jsonl")
    assert report.skipped == len(first)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(len(lines)))


def test_a_replica_killed_mid_job_has_its_work_retried(cluster, tiny_model, tmp_path):
    doomed = start_replicas(tiny_model, 2, "generate", ENGINE, num_cpus=0.5)
    lines = job_lines(40, seed=3)
    items, errors = items_for(lines)
    killed = []

    def kill_one(records):
        if not killed:
            ray.kill(doomed[1], no_restart=True)
            killed.append(True)

    report = run_job(items, Writer(tmp_path / "out.jsonl"), doomed, chunk_tokens=500,
                     on_write=kill_one, progress=False)
    records = read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in records) == sorted(f"q{i}" for i in range(len(lines)))
    assert len(records) == len(lines)
    assert report.retried_chunks >= 1 and len(report.replicas) == 1


def test_parse_lines_defaults():
    items, errors = parse_lines(['{"prompt": "hi"}', "", '{"id": 7, "prompt_token_ids": [3]}'], 9, "generate")
    assert [(it.id, it.line, it.max_tokens) for it in items] == [(1, 1, 9), (7, 3, 9)]
    assert errors == []
    items, _ = parse_lines(['{"prompt": "hi", "max_tokens": 5}'], 9, "embed")
    assert items[0].max_tokens == 0  # embeddings generate nothing


def test_ray_data_interop_adds_generations(cluster, tiny_model):
    from vllm_prepack.ray_data import map_dataset

    prompts = token_ids(prompt_lengths("mmlu", 12, seed=4, max_len=200), vocab_size=512, seed=4)
    ds = ray.data.from_items([{"key": i, "prompt_token_ids": p} for i, p in enumerate(prompts)])
    rows = map_dataset(ds, tiny_model, replicas=1, max_tokens=3, engine_kwargs=ENGINE,
                       batch_size=5, num_cpus=0.5).take_all()
    assert sorted(r["key"] for r in rows) == list(range(12))
    assert all(r["error"] is None and len(r["token_ids"]) == 3 for r in rows)


def test_embedding_job_to_parquet_resumes(cluster, minilm, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from vllm_prepack.batch import run_batch

    prompts = token_ids(prompt_lengths("mmlu", 10, seed=6, max_len=200), vocab_size=30000,
                        seed=6, first_id=1000)
    lines = [json.dumps({"id": i, "prompt_token_ids": p}) for i, p in enumerate(prompts)]
    lines.append(json.dumps({"id": "long", "prompt_token_ids": [1000] * 300}))  # over 256
    out = tmp_path / "emb.parquet"
    kw = dict(replicas=1, task="embed", engine_kwargs={"max_model_len": 256}, progress=False)
    report = run_batch(minilm, lines[:6], out, **kw)
    assert report.written == 6
    report = run_batch(minilm, lines, out, **kw)  # the rest only
    assert (report.skipped, report.written, report.errors) == (6, 5, 1)
    table = pq.read_table(out).to_pylist()
    assert sorted(r["line"] for r in table) == list(range(1, 12))
    by_id = {json.loads(r["id"]): r for r in table}
    assert all(len(by_id[i]["embedding"]) == 384 for i in range(10))
    assert "line 11:" in by_id["long"]["error"]
