"""A batch replica's engine loop in this process (no Ray): units in flight share one engine."""

import json
import threading
import time

import pytest
from ray_cluster import ENGINE

from vllm_prepack.replica import Replica

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def replica(tiny_model):
    return Replica(tiny_model, "generate", ENGINE, True, 0, default_max_tokens=4)


def unit(first, n=4, length=30):
    return [(line, json.dumps({"id": f"u{line}", "prompt_token_ids": [5 + line] * length}))
            for line in range(first, first + n)]


def test_units_left_in_the_inbox_enter_the_engine_together(replica):
    """Two calls leave their units in the inbox while a third holds the engine: whichever call
    steps next admits both, so the engine batches across units (no drain to a unit's last
    request while the next waits). Each call returns its own lines' records."""
    results = {}

    def call(first):
        results[first] = replica.records(unit(first))

    threads = [threading.Thread(target=call, args=(first,)) for first in (1, 10)]
    with replica._lock:  # stands in for a call that is stepping the engine
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(replica._inbox) < 2:
            assert time.monotonic() < deadline, "the calls did not reach the inbox"
            time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=120)
    assert replica.peak_units == 2
    for first, (records, tokens) in results.items():
        assert sorted(r["line"] for r in records) == list(range(first, first + 4))
        assert all(r["error"] is None and len(r["token_ids"]) == 4 for r in records)
        assert tokens == 4 * (30 + 4)
    assert not replica._units and not replica.llm.llm_engine.has_unfinished_requests()


def test_a_refused_line_becomes_its_error_record_and_the_rest_run(replica):
    lines = unit(20, n=2) + [(22, '{"prompt_token_ids": [5], "max_tokens": 0}'),
                             (23, '{"custom_id": "x", "method": "POST", "url": "/v1/completions", '
                                  '"body": {"prompt": [9999999]}}')]
    records, _ = replica.records(lines)
    by_line = {r["line"]: r for r in records}
    assert by_line[20]["error"] is None and by_line[21]["error"] is None
    assert "line 22: 'max_tokens' must be a positive integer" in by_line[22]["error"]
    assert by_line[23]["custom_id"] == "x" and by_line[23]["response"]["status_code"] == 400
    assert "line 23" in by_line[23]["error"]
