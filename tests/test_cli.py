"""The ``vllm-prepack`` command: bad input fails before anything starts; demo and batch run."""

import argparse

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
    with pytest.raises(SystemExit) as exit_:  # the parser's, before the model is read
        cli.main(["batch", "--model", str(tmp_path / "bare"), "--input", str(lines),
                  "--prepack-options", '{"max_swaps": -1}'])
    assert exit_.value.code == 2
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
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log").write_text("not parquet")
    (tmp_path / "fake.parquet").write_text('{"prompt": "hi"}\n')
    (tmp_path / "mixed").mkdir()  # a good part, then a bad one: every footer is read
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"prompt": ["hi"]}), tmp_path / "mixed" / "a.parquet")
    (tmp_path / "mixed" / "b.parquet").write_text("junk")
    (tmp_path / "empty").mkdir()
    for source, says in [("logs", "is not a folder of Parquet files"),
                         ("fake.parquet", "is not a Parquet file"),
                         ("mixed", "is not a folder of Parquet files"),
                         ("empty", "is an empty folder")]:
        with pytest.raises(JobError, match=f"input .*{source} {says}"):
            run_batch(str(tmp_path / "bare"), str(tmp_path / source), tmp_path / "out.jsonl",
                      engine_kwargs={"skip_tokenizer_init": True})
    with pytest.raises(JobError, match="gpus_per_replica must be at least 0, got -1"):
        run_batch(str(tmp_path / "bare"), [], tmp_path / "out.jsonl", gpus_per_replica=-1)
    assert cli.main(["batch", "--model", str(tmp_path / "bare"), "--input", str(lines),
                     "--engine-args", '{"skip_tokenizer_init": true}', "--chat-template", "/nope.jinja"]) == 2
    assert "chat template '/nope.jinja' looks like a file path but cannot be read" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_chat_template_is_a_files_text_or_the_template_itself(tmp_path):
    from vllm_prepack.batch import read_chat_template

    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert read_chat_template(str(tmp_path / "t.jinja")) == "{{ messages }}"
    assert read_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{% for")
    assert read_chat_template("{{ x }}" * 200) == "{{ x }}" * 200  # too long a name for a path
    with pytest.raises(JobError, match=r"'t\.jinja' looks like a file path"):
        read_chat_template("t.jinja")
    assert read_chat_template("tool_use") == "tool_use"  # a tokenizer's named template


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
    (["bench", "scheduler", "--prepack-options", '{"no_such": 1}'], "unknown option(s) 'no_such'"),
    (["batch", "--gpus-per-replica", "-1"], "must be at least 0, got -1"),
    (["serve", "--gpus-per-replica", "-2"], "must be at least 0, got -2"),
    (["serve", "--port", "99999"], "must be a port number, 1 to 65535, got 99999"),
    (["serve", "--port", "0"], "must be a port number, 1 to 65535, got 0"),
    (["serve", "--prepack-options", '{"pack_fixed_share": 2}'],
     "additional_config['prepack']['pack_fixed_share'] must be <= 1"),
    (["batch", "--prepack-options", "[1]"], "must be a JSON object, got list"),
])
def test_a_bad_argument_is_refused_by_the_parser_naming_it(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert f"argument {argv[-2]}: {says}" in capsys.readouterr().err


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help():
    bare = [f"{parser.prog} {action.option_strings[-1]}" for parser in _parsers(cli.build_parser())
            for action in parser._actions if action.option_strings and not action.help]
    assert not bare


@pytest.mark.parametrize("argv, shows", [
    (["batch"], ["(default: 2)", "(default: results.jsonl)", "(default: generate)"]),
    (["serve"], ["(default: tokens)", "(default: 8000)"]),
    (["bench", "scheduler"], ["(default: 0 64 256 1024)", "step's time off by this Gaussian share "
                              "of itself, as an engine's timings are (0: exact) (default: 0.0)"]),
    (["bench", "hf"], ["(default: 16 32 64 128)", "default: bf16 on cuda"]),
    (["bench", "ray"], ["driver-alone corpus sizes, e.g. 10000 100000 1000000 --unit"]),  # []: none
    (["bench", "scheduler"], ["is for a GPU (default: synthetic arrivals seconds"]),
])
def test_help_shows_each_default_but_none_and_a_flags_false(argv, shows, capsys):
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in shows:
        assert shown in text
    for empty in ("None", "False", "", "{}"):
        assert f"(default: {empty})" not in text


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
