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
    assert cli.main(["batch", "--model", str(tmp_path / "bare"), "--input", str(tmp_path / "nope.jsonl"),
                     "--engine-args", '{"skip_tokenizer_init": true}']) == 2
    assert f"input {tmp_path / 'nope.jsonl'} does not exist" in capsys.readouterr().err
    assert cli.main(["batch", "--model", str(tmp_path / "bare"), "--input", str(lines),
                     "--output", str(tmp_path / "out.csv"), "--engine-args", '{"skip_tokenizer_init": true}']) == 2
    assert "out.csv must end in .jsonl" in capsys.readouterr().err
    assert cli.main(["batch", "--model", str(tmp_path / "bare"), "--input", str(lines),
                     "--engine-args", '{"skip_tokenizer_init": true}',
                     "--prepack-options", '{"max_swaps": -1}']) == 2
    assert "['max_swaps'] must be >= 0, got -1" in capsys.readouterr().err
    assert cli.main(["batch", "--model", str(tmp_path / "bare")]) == 2  # not the demo job on the demo model
    assert "--model needs --input" in capsys.readouterr().err
    for bad, says in [(dict(replicas=0), "replicas must be at least 1, got 0"),
                      (dict(unit_tokens=-1), "unit_tokens must be at least 1, got -1"),
                      (dict(max_tokens=0), "max_tokens must be at least 1, got 0")]:
        with pytest.raises(JobError, match=says):
            run_batch(str(tmp_path / "bare"), [], tmp_path / "out.jsonl", **bad)
    with pytest.raises(JobError, match="input .*nope.jsonl does not exist"):
        run_batch(str(tmp_path / "bare"), str(tmp_path / "nope.jsonl"), tmp_path / "out.jsonl",
                  engine_kwargs={"skip_tokenizer_init": True})
    assert not ray.is_initialized()


def test_an_engine_error_is_the_exception_its_traceback_ends_with_on_one_line():
    from vllm_prepack.errors import last_exception

    traceback = ("The actor died because of an error raised in its creation task, ray::Replica\n"
                 "  File \"replica.py\", line 60, in __init__\n"
                 "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                 "  Value error, Model architectures ['Nope'] are not supported\n"
                 "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n")
    assert last_exception(traceback) == ("pydantic_core._pydantic_core.ValidationError: 1 validation error for "
                                  "ModelConfig Value error, Model architectures ['Nope'] are not supported")
    assert last_exception("Fatal Python error: Aborted\n") == "Fatal Python error: Aborted"  # no exception line
    assert last_exception("OSError: " + "x" * 500).endswith("...") and len(last_exception("OSError: " + "x" * 500)) == 400


def test_serve_refuses_a_missing_model_before_ray_starts(tmp_path, capsys):
    import ray

    assert cli.main(["serve", "--model", str(tmp_path / "no-such-model")]) == 2
    assert f"{tmp_path / 'no-such-model'} does not exist" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.parametrize("argv, says", [
    (["bench", "scheduler", "--parts", "scale", "--scale-steps", "0"], "must be at least 1, got 0"),
    (["serve", "--replicas", "0"], "must be at least 1, got 0"),
    (["batch", "--replicas", "0"], "must be at least 1, got 0"),
    (["batch", "--unit-tokens", "-5"], "must be at least 1, got -5"),
    (["serve", "--ingress-replicas", "two"], "must be an integer, got 'two'"),
    (["batch", "--num-cpus", "0"], "must be at least 1, got 0"),
    (["demo", "--prompts", "0"], "must be at least 1, got 0"),
    (["batch", "--engine-args", "{max_model_len: 5}"], "is not JSON"),
    (["serve", "--engine-args", "[1]"], "must be a JSON object, got list"),
    (["serve", "--prepack-options", "{bad"], "is not JSON"),
    (["bench", "scheduler", "--prepack-options", "3"], "must be a JSON object, got int"),
    (["bench", "scheduler", "--parts", "synthetic", "--prompts", "0"], "must be at least 1, got 0"),
    (["bench", "scheduler", "--parts", "seconds", "--step-warmup", "0.5"],
     "must be at least 1, got 0.5"),
    (["bench", "scheduler", "--parts", "seconds", "--fixed-tokens", "-64"],
     "must be at least 0, got -64"),
    (["bench", "serve", "--parts", "sim", "--sim-loads", "0"], "must be above 0, got 0"),
    (["bench", "ray", "--prompts", "-1"], "must be at least 0, got -1"),
    (["bench", "hf", "--batches", "x"], "must be an integer, got 'x'"),
    (["bench", "hf", "--device", "gpu"], "must be cuda or cpu, got 'gpu'"),
    (["bench", "ray", "--workloads", "bogus"], "invalid choice: 'bogus'"),
    (["bench", "scheduler", "--parts", "arrivals", "--loads", "-1"], "must be above 0, got -1"),
])
def test_a_bad_argument_is_refused_by_the_parser_naming_it(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert f"argument {argv[-2]}: {says}" in capsys.readouterr().err


def test_serve_starts_ray_with_the_replicas_cpus_before_building_the_app(monkeypatch, tmp_path):
    """Ray Serve LLM's app builder starts a default local Ray (the machine's cores) when none is
    up; on a 2-core machine that left the ingress no CPU and the app never came up."""
    import os
    from types import SimpleNamespace

    import ray

    from vllm_prepack import serve

    seen = {}

    def build(*configs, **options):
        seen["cpus"] = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
        raise KeyboardInterrupt  # stop before any replica: serve stops, as on Ctrl-C

    monkeypatch.setattr(serve, "build_app", build)
    monkeypatch.setattr(serve, "prepack_llm_config", lambda *a, **k: SimpleNamespace(model_id="m"))
    (tmp_path / "m").mkdir()
    try:
        assert cli.main(["serve", "--model", str(tmp_path / "m"), "--replicas", "3", "--engine-args",
                         '{"skip_tokenizer_init": true}']) == 0
    finally:
        ray.shutdown()
    assert seen["cpus"] == max(os.cpu_count() or 1, 2 * 3 + 4)


def test_verbose_before_or_after_the_command_and_ctrl_c_in_one_line(monkeypatch, capsys):
    import logging

    seen = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(args.verbose) or 0)
    for argv in (["demo"], ["-v", "demo"], ["demo", "-v"]):
        assert cli.main(argv) == 0
    assert seen == [False, True, True]
    logging.getLogger("vllm_prepack").setLevel(logging.NOTSET)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["batch"]) == 130
    assert capsys.readouterr().err.strip() == ("vllm-prepack batch: interrupted; what was written "
                                               "stays, and the same command resumes")


@pytest.mark.engine
def test_demo_prints_the_side_by_side_table(capfd):
    assert cli.main(["demo", "--prompts", "8", "--max-tokens", "2", "--repeats", "1",
                     "--budget", "256"]) == 0
    out = capfd.readouterr().out
    assert "| plain vLLM |" in out and "| vllm-prepack |" in out
    assert "greedy outputs identical to plain vLLM: yes" in out
