"""Where Ray places batch replicas with GPUs: one GPU each, or tensor-parallel in a placement
group. The cluster declares logical GPUs and the replicas are probes (no engine), so this runs on
CPU; the engine inside a tensor-parallel replica needs real GPUs (not run on CPU)."""

import pytest
import ray

from vllm_prepack.replica import start_replicas


def probe_class():
    """A stand-in replica that reports the engine arguments it got and where Ray placed it
    (defined in a function so that Ray ships the class itself: workers cannot import tests)."""

    class Probe:
        def __init__(self, model, task, engine_kwargs, prepack, index, **options):
            if index in options.get("fail", ()):
                raise ValueError(f"replica {index} cannot start its engine")
            self.engine_kwargs = engine_kwargs

        def describe(self) -> dict:
            from ray.util import get_current_placement_group

            group = get_current_placement_group()
            return {"engine_kwargs": self.engine_kwargs, "gpus": ray.get_gpu_ids(),
                    "group": group.id.hex() if group else None,
                    "bundles": group.bundle_specs if group else None}

    return Probe


def test_cpu_replicas_share_a_cluster_smaller_than_the_machine():
    """A local cluster given fewer CPUs than the replicas (``batch --num-cpus 1 --replicas 2``):
    each asks its share of the cluster's CPUs, so all start (each asked for a core of the
    machine's and the second waited for one forever)."""
    import threading

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        started = []
        thread = threading.Thread(target=lambda: started.append(
            describe_and_stop(start_replicas("m", 2, "generate", {}, replica_cls=probe_class()))),
            daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert len(started) == 1 and len(started[0]) == 2
    finally:
        ray.shutdown()


def test_a_replica_that_cannot_start_takes_the_others_down():
    """One replica's engine fails at start: start_replicas raises its error and stops the
    replicas that did start (their CPUs come back), rather than leaving them to the cluster."""
    import time

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ray.exceptions.RayActorError, match="replica 1 cannot start"):
            start_replicas("m", 3, "generate", {}, replica_cls=probe_class(), fail=(1,))
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 3
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def gpu_cluster():
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def describe_and_stop(actors):
    info = ray.get([a.describe.remote() for a in actors])
    actors.stop()
    return info


def test_tensor_parallel_replicas_get_a_placement_group_each(gpu_cluster):
    from ray.util import placement_group_table

    info = describe_and_stop(start_replicas("m", 2, "generate", {"max_model_len": 128},
                                            gpus_per_replica=2, replica_cls=probe_class()))
    for replica in info:
        assert replica["engine_kwargs"] == {"max_model_len": 128, "tensor_parallel_size": 2,
                                            "distributed_executor_backend": "ray"}
        assert replica["bundles"] == [{"GPU": 1.0, "CPU": 1.0}] * 2  # vLLM's workers take these
        assert replica["gpus"] == []  # the replica itself holds no GPU
    assert info[0]["group"] != info[1]["group"]
    states = {gid: g["state"] for gid, g in placement_group_table().items()}
    assert all(states[r["group"]] == "REMOVED" for r in info)  # stopping gave the GPUs back


def test_one_gpu_replicas_and_user_arguments_win(gpu_cluster):
    info = describe_and_stop(start_replicas("m", 2, "generate", {}, gpus_per_replica=1,
                                            replica_cls=probe_class()))
    assert [len(r["gpus"]) for r in info] == [1, 1] and info[0]["gpus"] != info[1]["gpus"]
    assert all(r["group"] is None and r["engine_kwargs"] == {} for r in info)
    mine = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    info = describe_and_stop(start_replicas("m", 1, "generate", mine, gpus_per_replica=2,
                                            replica_cls=probe_class()))
    assert info[0]["engine_kwargs"] == mine  # passed through unchanged
