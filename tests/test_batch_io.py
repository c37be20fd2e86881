"""Batch lines, records and output files (pure: no engine, no Ray)."""

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_prepack.batch_input import Feed, Source, estimate_tokens, weigh
from vllm_prepack.batch_output import JsonlWriter, LineSet, ParquetWriter
from vllm_prepack.batch_record import (
    InputError,
    encode,
    error_record,
    parquet_table,
    parse,
    record_line,
    result_record,
)


def test_native_lines_default_to_greedy_and_take_sampling_keys():
    r = parse('{"prompt": "hi"}', 1, 9)
    assert (r.id, r.endpoint, r.prompts, r.max_tokens, r.sampling) == (None, "native", ["hi"], 9,
                                                                     {"temperature": 0.0})
    r = parse('{"id": 7, "prompt_token_ids": [3], "temperature": 0.7, "seed": 1, "n": 2}', 3, 9)
    assert (r.id, r.prompts, r.sampling) == (7, [[3]], {"temperature": 0.7, "seed": 1, "n": 2})


def test_native_lines_of_an_embedding_job_take_dimensions_and_no_generation_keys():
    r = parse('{"id": "e", "prompt": "hi", "dimensions": 8}', 1, 0)  # max_tokens 0: embeddings
    assert (r.id, r.prompts, r.max_tokens, r.sampling, r.dimensions) == ("e", ["hi"], 0, {}, 8)
    assert parse('{"prompt": "hi"}', 1, 0).dimensions is None
    assert parse('{"prompt": "hi", "max_tokens": null}', 1, 0).max_tokens == 0  # null: absent
    assert parse('{"prompt": "hi", "dimensions": null}', 1, 16).max_tokens == 16
    for raw, says in [('{"prompt": "hi", "max_tokens": 5}', "line 2: max_tokens applies to generation"),
                      ('{"prompt": "hi", "temperature": 1, "n": 2}', "line 2: n, temperature apply to "
                                                                     "generation, not to embeddings"),
                      ('{"prompt": "hi", "dimensions": 0}', "line 2: 'dimensions' must be"),
                      ('{"prompt": "hi", "dim": 8}', "line 2: unknown field(s) dim")]:
        with pytest.raises(InputError) as e:
            parse(raw, 2, 0)
        assert str(e.value).startswith(says)
    with pytest.raises(InputError, match=r"line 3: dimensions applies to embeddings \(--task embed\)"):
        parse('{"prompt": "hi", "dimensions": 8}', 3, 16)


@pytest.mark.parametrize("raw, cause", [
    ("{not json", "line 4: Expecting property name"),
    ("[1]", "line 4: a line must be a JSON object"),
    ('{"prompt": "x", "colour": 1}', "line 4: unknown field(s) colour"),
    ('{"prompt_token_ids": [1, -2]}', "non-negative ints"),
    ('{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be a positive integer"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/audio", "body": {}}', "not supported"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions"}', "without body"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", '
     '"stream": true}}', "'stream' is not supported"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", '
     '"best_of": 2}}', "unsupported body field(s) best_of"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}',
     "'messages' must be a non-empty list"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}}',
     "'prompt' must be"),
])
def test_bad_lines_name_line_and_cause(raw, cause):
    with pytest.raises(InputError, match="^line 4: ") as e:
        parse(raw, 4, 16)
    assert cause in str(e.value)


def test_openai_lines():
    base = {"custom_id": "c1", "method": "POST", "model": "ignored"}
    r = parse(json.dumps({**base, "url": "/v1/completions",
                          "body": {"model": "m", "prompt": "hi", "seed": 3, "logprobs": 2}}), 1, 99)
    assert (r.id, r.endpoint, r.prompts, r.max_tokens) == ("c1", "/v1/completions", ["hi"], 16)
    assert r.sampling == {"seed": 3, "logprobs": 2}  # OpenAI's defaults: vLLM's, not greedy
    r = parse(json.dumps({**base, "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5,
        "logprobs": True, "top_logprobs": 3}}), 1, 99)
    assert (r.messages[0]["content"], r.max_tokens, r.sampling) == ("x", 5, {"logprobs": 3})
    r = parse(json.dumps({**base, "url": "/v1/embeddings", "body": {"input": ["a", [5, 6]]}}), 1, 99)
    assert (r.prompts, r.max_tokens) == (["a", [5, 6]], 0)
    r = parse(json.dumps({**base, "url": "/v1/embeddings", "body": {"input": "a", "dimensions": 64}}), 1, 0)
    assert r.dimensions == 64
    with pytest.raises(InputError, match="dimensions"):
        parse(json.dumps({**base, "url": "/v1/embeddings", "body": {"input": "a", "dimensions": 0}}), 1, 0)


def test_weights_come_from_the_raw_text():
    def weight(obj, default):
        return estimate_tokens(json.dumps(obj).encode(), default)

    assert weight({"prompt_token_ids": [1] * 100}, 16) == 116
    assert weight({"prompt_token_ids": [1] * 100, "max_tokens": 4}, 16) == 104
    assert weight({"prompt_token_ids": [1] * 100}, 0) == 100
    body = {"prompt": "x" * 400, "max_tokens": 10, "n": 3}
    assert 130 < weight({"custom_id": "a", "body": body}, 16) < 150


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({"prompt": st.text(min_size=1)}, optional={
    "max_tokens": st.integers(1, 99), "n": st.integers(1, 4),
    "prompt_token_ids": st.lists(st.integers(0, 9), min_size=1)}), max_size=20))
def test_a_block_weighs_as_its_lines(objs):
    """The whole-block shortcut agrees with weighing line by line."""
    raws = [json.dumps(obj).encode() for obj in objs]
    assert weigh(raws, 16) == [estimate_tokens(raw, 16) for raw in raws]
    assert weigh(raws, 0) == [estimate_tokens(raw, 0) for raw in raws]


def test_sources_are_lazy_and_number_lines_from_one(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n \n{"prompt": "c"}')
    source = Source(path, block_bytes=18)
    blocks = source.blocks()
    assert next(blocks) == ([1], [b'{"prompt": "a"}']) and 0 < source.fraction < 1
    assert list(blocks) == [([3], [b'{"prompt": "b"}']), ([5], [b'{"prompt": "c"}'])]
    assert source.fraction == 1
    assert list(Source(path).blocks()) == [([1, 3], [b'{"prompt": "a"}', b'{"prompt": "b"}']),
                                           ([5], [b'{"prompt": "c"}'])]  # the unterminated last line
    assert list(Source(['{"a": 1}\n', " ", '{\n "b": 2}']).blocks()) == [
        ([1, 3], [b'{"a": 1}', b'{  "b": 2}'])]  # read lines keep no newline; JSON may span lines
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "id": None}, {"prompt": "b", "id": 2}]),
                   tmp_path / "in.parquet")
    assert [[json.loads(raw) for raw in raws] for _, raws in Source(tmp_path / "in.parquet").blocks()] == [
        [{"prompt": "a"}, {"prompt": "b", "id": 2}]]


def test_the_feed_hands_out_token_budgets_and_skips_committed_lines():
    lines = [json.dumps({"prompt_token_ids": [1] * k}) for k in (10, 20, 30, 40)]
    skip = LineSet()
    skip.add(2)
    feed = Feed(Source(lines), 0, skip=skip)
    assert feed.take(5, 10) == ([1], [10.0], [lines[0].encode()])  # at least one line
    assert feed.take(75, 10) == ([3, 4], [30.0, 40.0], [lines[2].encode(), lines[3].encode()])
    assert feed.take(100, 10) is None


@pytest.mark.parametrize("raw, openai, rid", [
    ('{"id": 7, "prompt": "x"}', False, 7),
    ('{"custom_id": "c", "method": "GET"}', True, "c"),
    ('{"body": {"prompt": "x"}}', True, None),  # OpenAI by the same rule as parse; no id
    ('{"custom_id": "c", oops', True, None),  # not JSON: judged from its text
    ('{"prompt": "x"}', False, None),  # no id: null, not the line number (a column of one type)
    ("[1]", False, None),
])
def test_error_records_keep_the_lines_format_and_start_with_its_number(raw, openai, rid):
    record = error_record(4, raw, "line 4: bad", replica=1)
    assert ("custom_id" in record, record.get("custom_id", record["id"]), record["error"]) == (
        openai, rid, "line 4: bad")
    if openai:
        assert record["response"]["status_code"] == 400 and record["id"] == "vllm-batch-4"
    assert record_line(encode([record], "jsonl")) == 4
    assert record_line(b'{"something": 4}') is None


def _outputs(token_ids, prompt=(1, 2, 3)):
    choice = SimpleNamespace(index=0, token_ids=token_ids, text="ab", logprobs=None,
                             finish_reason="length")
    return [SimpleNamespace(prompt_token_ids=list(prompt), outputs=[choice])]


def test_result_records_count_prompt_and_generated_tokens():
    native = parse('{"id": "n", "prompt": "hi"}', 3, 4)
    record, tokens = result_record(native, _outputs([7, 8]), embed=False, replica=0,
                                   model_name="m", latency=0.5)
    assert (record["line"], record["id"], record["token_ids"], tokens) == (3, "n", [7, 8], 5)
    body = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    record, tokens = result_record(parse(json.dumps(body), 5, 4), _outputs([7]), embed=False,
                                   replica=0, model_name="m", latency=0.5)
    usage = record["response"]["body"]["usage"]
    assert (record["custom_id"], usage["total_tokens"], tokens) == ("c", 4, 4)
    assert record_line(encode([record], "jsonl")) == 5


def test_line_set():
    s = LineSet()
    for line in (5, 1_000_000, 5, 0):
        s.add(line)
    assert len(s) == 3 and 5 in s and 1_000_000 in s and 6 not in s and 10**9 not in s
    assert len(s.bits) < 200_000  # a bitmap: 1M lines in 125 KB (+ growth slack)


def test_jsonl_resume_cuts_only_a_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(path)
    writer.write(encode([{"line": 1, "id": "a"}, {"id": "vllm-batch-2", "custom_id": "b", "line": 2}],
                        "jsonl"))
    writer.close()
    complete = path.read_bytes()
    assert b'"line": 2' not in complete  # OpenAI lines carry their line in their id only
    with path.open("ab") as f:
        f.write(b'{"line": 3, "id": "c", "te')
    done = JsonlWriter(path).committed()
    assert (sorted(n for n in range(5) if n in done), path.read_bytes()) == ([1, 2], complete)
    assert JsonlWriter(path).committed().count == 2  # nothing to repair: nothing changes
    assert path.read_bytes() == complete
    with path.open("ab") as f:
        f.write(b'{"something": "else"}\n')
    with pytest.raises(ValueError, match="out.jsonl:3: not a record"):
        JsonlWriter(path).committed()


def test_parquet_parts_commit_by_rename(tmp_path):
    pytest.importorskip("pyarrow")
    writer = ParquetWriter(tmp_path / "out.parquet", rows_per_part=2)
    writer.write(parquet_table([{"line": 1, "id": "a", "error": None}]))
    assert writer.committed().count == 0  # buffered, not committed
    writer.write(parquet_table([{"line": 2, "id": "vllm-batch-2", "custom_id": "b", "error": None,
                                 "response": {"status_code": 200}}]))
    (tmp_path / "out.parquet" / ".part-000009.tmp").write_text("torn")
    resumed = ParquetWriter(tmp_path / "out.parquet")
    done = resumed.committed()
    assert (1 in done, 2 in done, len(done)) == (True, True, 2)
    assert not list((tmp_path / "out.parquet").glob(".part-*"))
    assert resumed._part == 1


def test_a_parquet_row_keeps_every_field_of_a_jsonl_record():
    pytest.importorskip("pyarrow")
    record = {"line": 3, "id": None, "error": None, "replica": 1, "latency_s": 0.5,
              "token_ids": [4, 5], "text": "ab", "logprobs": [-0.1, -0.2],
              "choices": [{"token_ids": [4, 5], "text": "ab"}, {"token_ids": [6], "text": "c"}]}
    row = parquet_table([dict(record)]).to_pylist()[0]
    assert {k: row[k] for k in record} == record  # an id that is null stays null, not "null"
    assert parquet_table([{"line": 4, "id": 7}]).to_pylist()[0]["id"] == "7"  # JSON text


def test_progress_line_shows_rates_errors_and_eta(capsys):
    from vllm_prepack.batch import _Progress

    class Half:
        fraction = 0.5

    bar = _Progress(True, Half())
    bar.shown -= 2  # a second has passed since the last line
    bar.update({"requests": 10, "errors": 2, "tokens": 500})
    bar.close()
    line = capsys.readouterr().err.strip().split("\r")[-1]
    assert line.startswith("batch: 10 done, ") and "req/s" in line and "tok/s" in line
    assert "2 errors" in line and "ETA " in line and "ETA -" not in line


def test_ray_data_rows_weigh_like_batch_lines():
    from vllm_prepack.ray_data import row_tokens

    assert row_tokens({"tokenized_prompt": [1] * 10, "sampling_params": {"max_tokens": 5, "n": 2}}) == 20
    assert row_tokens({"prompt_token_ids": [1, 2], "sampling_params": None}) == 2
    assert row_tokens({"prompt": "x" * 400, "sampling_params": {"max_tokens": 10, "n": 3}}) == 130
