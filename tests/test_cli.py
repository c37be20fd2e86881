"""The ``vllm-prepack`` command: bad input fails before anything starts; demo and batch run."""

import json

import pytest

from vllm_prepack import cli


def test_batch_refuses_a_missing_model_before_ray_starts(tmp_path, capsys):
    import ray

    lines = tmp_path / "in.jsonl"
    lines.write_text('{"prompt": "hi"}\n')
    assert cli.main(["batch", "--model", str(tmp_path / "no-such-model"), "--input", str(lines)]) == 2
    assert f"{tmp_path / 'no-such-model'} does not exist" in capsys.readouterr().err
    assert cli.main(["batch", "--input", str(lines)]) == 2
    assert "--model is required with --input" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    assert cli.main(["batch", "--model", str(tmp_path / "bare"), "--input", str(lines)]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
    assert cli.main(["batch", "--model", str(tmp_path / "bare"), "--input", str(lines),
                     "--engine-args", "{max_model_len: 5}"]) == 2
    assert "--engine-args is not JSON" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.engine
def test_demo_prints_the_side_by_side_table(capfd):
    assert cli.main(["demo", "--prompts", "8", "--max-tokens", "2", "--repeats", "1",
                     "--budget", "256"]) == 0
    out = capfd.readouterr().out
    assert "| plain vLLM |" in out and "| vllm-prepack |" in out
    assert "greedy outputs identical to plain vLLM: yes" in out


@pytest.mark.engine
def test_batch_runs_a_job_from_the_command_line(tiny_model, tmp_path, capsys):
    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"id": i, "prompt_token_ids": [5 + i] * 20}) + "\n"
                             for i in range(6)))
    engine = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
              "num_gpu_blocks_override": 32}
    out = tmp_path / "out.jsonl"
    assert cli.main(["batch", "--model", tiny_model, "--input", str(lines), "--output", str(out),
                     "--replicas", "1", "--max-tokens", "3", "--num-cpus", "2",
                     "--engine-args", json.dumps(engine)]) == 0
    import ray

    ray.shutdown()
    summary = json.loads(capsys.readouterr().out)
    assert (summary["written"], summary["errors"]) == (6, 0)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(6))
    assert all(len(r["token_ids"]) == 3 for r in records)
