"""The Ray batch job over real vLLM replicas on a local Ray cluster."""

import json
import re
import shutil

import pytest
import ray
from ray_cluster import CHAT_TEMPLATE, ENGINE, cluster  # noqa: F401  (a fixture)

from vllm_prepack.batch import JobError, run_job
from vllm_prepack.batch_input import Source
from vllm_prepack.batch_output import JsonlWriter
from vllm_prepack.replica import start_replicas
from vllm_prepack.workloads import prompt_lengths, token_ids

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def replicas(cluster, tiny_model):
    return start_replicas(tiny_model, 2, "generate", ENGINE, num_cpus=0.5, default_max_tokens=4,
                          chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def embedder(cluster, minilm):
    return start_replicas(minilm, 1, "embed", {"max_model_len": 256, "dtype": "float32",
                                             "enforce_eager": True},
                          num_cpus=0.5, default_max_tokens=0)


def job_lines(n=40, seed=0):
    lengths = prompt_lengths("bimodal", n, seed=seed, max_len=400)
    prompts = token_ids(lengths, vocab_size=512, seed=seed)
    return [json.dumps({"id": f"q{i}", "prompt_token_ids": p, "max_tokens": 4})
            for i, p in enumerate(prompts)]


def openai(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def read(path):
    return [json.loads(line) for line in open(path)]


def run(lines, path, replicas, **kw):
    kw = {"max_tokens": 4, "unit_tokens": 600, "progress": False, **kw}
    return run_job(Source(lines), JsonlWriter(path), replicas, **kw)


class Interrupt(Exception):
    pass


def interrupt_after(writes):
    seen = []

    def hook(stats):
        seen.append(stats)
        if len(seen) >= writes:
            raise Interrupt

    return hook


def assert_exactly_once(path, lines):
    ids = [r["id"] for r in read(path)]
    assert len(ids) == len(set(ids))  # nothing duplicated
    assert sorted(ids) == sorted(json.loads(line)["id"] for line in lines)  # nothing lost


def test_every_input_exactly_once_and_plugin_active_in_each_replica(replicas, tmp_path):
    lines = job_lines()
    report = run(lines, tmp_path / "out.jsonl", replicas)
    records = read(tmp_path / "out.jsonl")
    assert_exactly_once(tmp_path / "out.jsonl", lines)
    assert all(r["error"] is None and len(r["token_ids"]) == 4 for r in records)
    assert {r["replica"] for r in records} == {0, 1}  # both replicas worked
    assert report.written == len(lines) and report.errors == 0
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
        json.dumps({"id": "hot", "prompt_token_ids": [5], "temperature": -1}),
        json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}}),
        json.dumps({"id": "stop", "prompt_token_ids": [5], "stop": 5}),
    ]
    report = run(lines, tmp_path / "out.jsonl", replicas)
    by_line = {r.get("line") or int(r["id"].rsplit("-", 1)[1]): r for r in read(tmp_path / "out.jsonl")}
    assert sorted(by_line) == list(range(1, len(lines) + 1))  # one record per line
    assert all(by_line[n]["error"] is None for n in range(1, 11))
    assert by_line[11]["error"].startswith("line 11:")
    assert "non-empty list" in by_line[12]["error"]
    assert "exactly one of" in by_line[13]["error"]
    assert "line 14:" in by_line[14]["error"] and "512" in by_line[14]["error"]  # too long
    assert "line 15:" in by_line[15]["error"]  # out-of-vocabulary token
    assert "line 16:" in by_line[16]["error"] and "temperature" in by_line[16]["error"]
    assert by_line[17]["custom_id"] == "x" and "POST" in by_line[17]["error"]
    assert by_line[17]["response"]["status_code"] == 400
    assert "line 18: bad sampling parameters (temperature=0.0, stop=5)" in by_line[18]["error"]
    assert report.errors == 8


def test_interrupted_twice_and_resumed_loses_and_duplicates_nothing(replicas, tmp_path):
    lines, out = job_lines(30, seed=2), tmp_path / "out.jsonl"
    with pytest.raises(Interrupt):
        run(lines, out, replicas, on_write=interrupt_after(1))
    first = len(read(out))
    with open(out, "a") as f:
        f.write('{"line": 999, "id": "q-torn", "li')  # a write torn by the interruption
    with pytest.raises(Interrupt):
        run(lines, out, replicas, on_write=interrupt_after(2))
    second = len(read(out))
    assert 0 < first < second < len(lines)
    report = run(lines, out, replicas)
    assert report.skipped == second and report.written == len(lines) - second
    assert_exactly_once(out, lines)


def test_a_crash_during_resume_loses_nothing(replicas, tmp_path, monkeypatch):
    """Fault injection: the process dies (1) in the tail repair, (2) half-way through appending
    a unit's records; every complete record survives each, and the next run completes."""
    import vllm_prepack.batch_output as output

    lines, out = job_lines(30, seed=5), tmp_path / "out.jsonl"
    with pytest.raises(Interrupt):
        run(lines, out, replicas, on_write=interrupt_after(1))
    with open(out, "a") as f:
        f.write('{"line": 7, "id": "q6", "tok')
    committed = out.read_bytes().rsplit(b"\n", 1)[0] + b"\n"

    def die(*args):
        raise Interrupt

    monkeypatch.setattr(output.os, "truncate", die)
    with pytest.raises(Interrupt):
        run(lines, out, replicas)
    monkeypatch.undo()
    assert out.read_bytes().startswith(committed)

    def torn_write(self, payload):  # half a unit reaches the disk, then the process dies
        with open(self.path, "ab") as f:
            f.write(payload[: len(payload) // 2])
        raise Interrupt

    monkeypatch.setattr(JsonlWriter, "write", torn_write)
    with pytest.raises(Interrupt):
        run(lines, out, replicas)
    monkeypatch.undo()
    assert out.read_bytes().startswith(committed)
    run(lines, out, replicas)
    assert_exactly_once(out, lines)


def test_a_replica_killed_mid_job_has_its_work_redone_on_the_survivor(cluster, tiny_model, tmp_path):
    doomed = start_replicas(tiny_model, 2, "generate", ENGINE, num_cpus=0.5)
    lines = job_lines(40, seed=3)
    killed = []

    def kill_one(stats):
        if not killed:
            ray.kill(doomed[1], no_restart=True)
            killed.append(True)

    report = run(lines, tmp_path / "out.jsonl", doomed, unit_tokens=500, on_write=kill_one)
    assert_exactly_once(tmp_path / "out.jsonl", lines)
    assert report.retried_units >= 1 and len(report.replicas) == 1
    ray.kill(doomed[0])


def test_embedding_job_to_parquet_resumes(embedder, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from vllm_prepack.batch_output import open_writer

    prompts = token_ids(prompt_lengths("mmlu", 10, seed=6, max_len=200), vocab_size=30000,
                        seed=6, first_id=1000)
    lines = [json.dumps({"id": i, "prompt_token_ids": p}) for i, p in enumerate(prompts)]
    lines.append(json.dumps({"id": "long", "prompt_token_ids": [1000] * 300}))  # over 256
    out = tmp_path / "emb.parquet"
    kw = dict(max_tokens=0, progress=False)
    report = run_job(Source(lines[:6]), open_writer(out), embedder, **kw)
    assert (report.written, report.errors) == (6, 0)
    report = run_job(Source(lines), open_writer(out), embedder, **kw)  # the rest only
    assert (report.skipped, report.written, report.errors) == (6, 5, 1)
    table = pq.read_table(out).to_pylist()
    assert sorted(r["line"] for r in table) == list(range(1, 12))
    by_id = {json.loads(r["id"]): r for r in table}
    assert all(len(by_id[i]["embedding"]) == 384 for i in range(10))
    assert "line 11:" in by_id["long"]["error"]


def test_openai_batch_file_embeddings(embedder, tmp_path):
    lines = [
        openai("e1", "/v1/embeddings", {"model": "m", "input": ["a first text", [1000, 1001, 1002]]}),
        openai("e2", "/v1/embeddings", {"input": "another"}),
        openai("c", "/v1/completions", {"prompt": "x"}),  # this job embeds
        openai("d", "/v1/embeddings", {"input": "x", "dimensions": 8}),  # vLLM checks it
        json.dumps({"id": "n", "prompt": "x", "dimensions": 8}),  # this project's line: the same
    ]
    run_job(Source(lines), JsonlWriter(tmp_path / "out.jsonl"), embedder, max_tokens=0,
            progress=False)
    records = read(tmp_path / "out.jsonl")
    by = {r.get("custom_id", r["id"]): r for r in records}
    body = by["e1"]["response"]["body"]
    assert by["e1"]["error"] is None and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 384 for d in body["data"])
    assert body["usage"]["prompt_tokens"] >= 3 + 3
    assert len(by["e2"]["response"]["body"]["data"]) == 1
    assert by["c"]["response"]["status_code"] == 400 and "--task generate" in by["c"]["error"]
    assert "line 4:" in by["d"]["error"] and "Matryoshka" in by["d"]["error"]
    assert "line 5:" in by["n"]["error"] and "Matryoshka" in by["n"]["error"]


def test_openai_batch_file_completions_and_chat(replicas, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    lines = [
        openai("c1", "/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 5,
                                         "temperature": 0, "logprobs": 2, "ignore_eos": True}),
        openai("c2", "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "n": 2, "seed": 3,
                                         "ignore_eos": True}),
        openai("chat", "/v1/chat/completions", {"messages": messages, "max_completion_tokens": 4,
                                                "temperature": 0, "logprobs": True,
                                                "top_logprobs": 2, "ignore_eos": True}),
        openai("emb", "/v1/embeddings", {"input": "x"}),  # this job generates
        json.dumps({"id": "native", "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}),
    ]
    run(lines, tmp_path / "out.jsonl", replicas)
    records = read(tmp_path / "out.jsonl")
    by = {r.get("custom_id", r["id"]): r for r in records}
    assert len(records) == 5
    c1 = by["c1"]["response"]
    assert (c1["status_code"], c1["body"]["object"], by["c1"]["id"]) == (200, "text_completion",
                                                                        "vllm-batch-1")
    choice = c1["body"]["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == 5 and len(choice["logprobs"]["top_logprobs"][0]) >= 1
    assert c1["body"]["usage"]["completion_tokens"] == 5
    assert choice["text"] == by["native"]["text"]  # greedy, same prompt: same text as native
    assert [c["index"] for c in by["c2"]["response"]["body"]["choices"]] == [0, 1]
    chat = by["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert len(chat["choices"][0]["logprobs"]["content"]) == 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
        chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|user|>hi there\n<|assistant|>")
    assert chat["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert by["emb"]["response"]["status_code"] == 400 and "--task embed" in by["emb"]["error"]


def test_seeded_sampling_is_reproducible(replicas, tmp_path):
    """Whatever the batching. Prompts stay whole in one step: on vLLM's CPU backend a seeded
    request whose prefill is chunked fails ("CPU Generator does not use offset", vLLM 0.32)."""
    prompts = token_ids(prompt_lengths("mmlu", 8, seed=8, max_len=24), vocab_size=512, seed=8)
    lines = [json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": 6, "temperature": 1.0,
                         "seed": 100 + i, "ignore_eos": True}) for i, p in enumerate(prompts)]
    greedy = [json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": 6, "ignore_eos": True})
              for i, p in enumerate(prompts)]
    outputs = []
    for name, job, unit in (("a", lines, 40), ("b", lines, 5000), ("greedy", greedy, 5000)):
        run(job, tmp_path / f"{name}.jsonl", replicas, unit_tokens=unit)  # other batches
        outputs.append({r["id"]: r["token_ids"] for r in read(tmp_path / f"{name}.jsonl")})
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]  # it did sample


def test_a_model_without_tokenizer_files(cluster, tiny_model, tmp_path):
    """It fails before any replica starts, in one line naming the fix; with
    skip_tokenizer_init it runs token-id prompts, and text lines become error records."""
    from vllm_prepack.batch import run_batch
    from vllm_prepack.batch import TOKENIZER_FILES

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    for name in (*TOKENIZER_FILES, "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    lines = job_lines(6, seed=7) + [json.dumps({"id": "text", "prompt": "hello"})]
    with pytest.raises(JobError, match="skip_tokenizer_init"):
        run_batch(str(bare), lines, tmp_path / "out.jsonl", replicas=1, engine_kwargs=ENGINE)
    report = run_batch(str(bare), lines, tmp_path / "out.jsonl", replicas=1, progress=False,
                       engine_kwargs={**ENGINE, "skip_tokenizer_init": True}, max_tokens=4)
    records = {r["id"]: r for r in read(tmp_path / "out.jsonl")}
    assert report.written == 7 and report.errors == 1
    assert all(len(records[f"q{i}"]["token_ids"]) == 4 for i in range(6))
    assert "no tokenizer" in records["text"]["error"]


def test_an_engine_that_cannot_start_stops_the_job_in_one_line(cluster, tiny_model, tmp_path):
    """A model folder vLLM cannot load (here: an architecture it does not know) fails in the
    replicas: the job stops with one line naming the model and the engine's error."""
    from vllm_prepack.batch import run_batch

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(JobError, match=f"a replica could not start its engine on {re.escape(str(bad))}: "
                                       r".*NoSuchForCausalLM"):
        run_batch(str(bad), job_lines(2), tmp_path / "out.jsonl", replicas=2, engine_kwargs=ENGINE)


def test_batch_runs_a_job_from_the_command_line(cluster, tiny_model, tmp_path, capsys):
    """`vllm-prepack batch` on the module's cluster (the CLI joins a running one)."""
    from vllm_prepack import cli

    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"id": i, "prompt_token_ids": [5 + i] * 20}) + "\n"
                             for i in range(6)))
    engine = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
              "num_gpu_blocks_override": 32}
    out = tmp_path / "out.jsonl"
    assert cli.main(["batch", "--model", tiny_model, "--input", str(lines), "--output", str(out),
                     "--replicas", "1", "--max-tokens", "3", "--num-cpus", "2",
                     "--engine-args", json.dumps(engine)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["written"], summary["errors"]) == (6, 0)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(6))
    assert all(len(r["token_ids"]) == 3 for r in records)
