"""The batch driver's failure paths on a local Ray cluster, with stand-in replicas (no engine)."""

import json

import pytest
import ray
from ray_cluster import cluster  # noqa: F401  (a fixture)

from vllm_prepack.batch import JobError, run_job
from vllm_prepack.batch_input import Source
from vllm_prepack.batch_output import JsonlWriter
from vllm_prepack.replica import start_replicas


def stand_in():
    """A replica that answers each line at once, and raises (as a failing engine would) on a
    unit holding the line given to ``fail_on`` (defined in a function so that Ray ships the
    class itself: workers cannot import tests)."""
    from vllm_prepack.batch_record import encode

    class StandIn:
        def __init__(self, *args, **kwargs):
            self.fail_line = None

        def describe(self) -> dict:
            return {}

        def fail_on(self, line) -> None:
            self.fail_line = line

        def run(self, lines, raw, output):
            if self.fail_line in lines:
                raise ValueError("the engine failed")
            records = [{"line": line, "id": line, "error": None} for line in lines]
            return encode(records, output), {"requests": len(lines), "errors": 0, "tokens": 0}

    return StandIn


@pytest.fixture(scope="module")
def replicas(cluster):
    replicas = start_replicas("m", 2, "generate", {}, replica_cls=stand_in(), num_cpus=0.5)
    yield replicas
    replicas.stop()


def fail_on(replicas, line):
    ray.get([r.fail_on.remote(line) for r in replicas])


LINES = [json.dumps({"prompt_token_ids": [5] * 10}) for _ in range(30)]


def written(path):
    return sorted(json.loads(line)["line"] for line in open(path))


def test_an_engine_failure_stops_the_job_resumably(replicas, tmp_path):
    out = tmp_path / "out.jsonl"
    fail_on(replicas, 17)
    with pytest.raises(RuntimeError, match=r"replica \d failed on a unit of lines \d+\.\.\d+: "
                                           r".*the engine failed.*a re-run resumes"):
        run_job(Source(LINES), JsonlWriter(out), replicas, unit_tokens=60, progress=False)
    before = written(out)
    assert 17 not in before and len(before) == len(set(before))
    fail_on(replicas, None)
    report = run_job(Source(LINES), JsonlWriter(out), replicas, unit_tokens=60, progress=False)
    assert written(out) == list(range(1, 31))  # each line exactly once
    assert report.skipped == len(before) and report.written == 30 - len(before)


def test_lines_pinned_to_an_idle_replica_reach_it_through_a_full_window(replicas, tmp_path):
    """Replica 1 has nothing in flight when the one-line window fills with its first line; the
    replica that finishes must not be the only one topped up, or the job stalls."""
    out = tmp_path / "out.jsonl"
    report = run_job(Source(LINES), JsonlWriter(out), replicas, window=1,
                     owner=lambda line: int(line > 15), progress=False)
    assert written(out) == list(range(1, 31)) and report.written == 30


def test_a_window_below_one_request_is_refused_before_anything_runs(replicas, tmp_path):
    with pytest.raises(JobError, match="window must be at least 1 request, got 0"):
        run_job(Source(LINES), JsonlWriter(tmp_path / "out.jsonl"), replicas, window=0,
                progress=False)
