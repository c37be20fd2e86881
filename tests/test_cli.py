"""The ``vllm-prepack`` command: bad input fails before anything starts; demo and batch run."""

import pytest

from vllm_prepack import cli
from vllm_prepack.batch import JobError, run_batch


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
    for bad, says in [(dict(replicas=0), "replicas must be at least 1, got 0"),
                      (dict(unit_tokens=-1), "unit_tokens must be at least 1, got -1"),
                      (dict(max_tokens=0), "max_tokens must be at least 1, got 0")]:
        with pytest.raises(JobError, match=says):
            run_batch(str(tmp_path / "bare"), [], tmp_path / "out.jsonl", **bad)
    assert not ray.is_initialized()


@pytest.mark.parametrize("argv, says", [
    (["bench", "scheduler", "--parts", "scale", "--scale-steps", "0"], "must be at least 1, got 0"),
    (["serve", "--replicas", "0"], "must be at least 1, got 0"),
    (["batch", "--replicas", "0"], "must be at least 1, got 0"),
    (["batch", "--unit-tokens", "-5"], "must be at least 1, got -5"),
    (["serve", "--ingress-replicas", "two"], "must be an integer, got 'two'"),
])
def test_a_count_below_one_or_not_a_number_is_refused_naming_the_argument(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert f"argument {argv[-2]}: {says}" in capsys.readouterr().err


@pytest.mark.engine
def test_demo_prints_the_side_by_side_table(capfd):
    assert cli.main(["demo", "--prompts", "8", "--max-tokens", "2", "--repeats", "1",
                     "--budget", "256"]) == 0
    out = capfd.readouterr().out
    assert "| plain vLLM |" in out and "| vllm-prepack |" in out
    assert "greedy outputs identical to plain vLLM: yes" in out
