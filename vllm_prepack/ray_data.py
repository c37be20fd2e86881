"""Ray Data interop: run a ``ray.data.Dataset`` of prompts through vLLM engines with the plugin.

For users already on Ray Data: ``map_dataset`` adds an actor pool of engines (one ``Replica``
each, the plugin on) to the dataset's plan. Ray Data hands out rows in blocks, so balancing here
is by rows; inside each engine the plugin packs every batch it is given. For a job balanced by
tokens across replicas, use ``vllm-prepack batch`` (vllm_prepack.batch).

Rows: ``prompt`` (text) or ``prompt_token_ids``, optionally ``max_tokens``; other columns pass
through. Added: ``token_ids`` and ``text`` (or ``embedding``), and ``error``.
"""

from __future__ import annotations

import json
import os


class _EngineUDF:
    def __init__(self, model: str, task: str, engine_kwargs: dict, prepack, max_tokens: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm_prepack.replica import Replica

        self.replica = Replica(model, task, engine_kwargs, prepack, index=os.getpid(),
                               default_max_tokens=max_tokens)

    def __call__(self, batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        unit = []
        for i in range(n):
            row = {key: _plain(batch[key][i]) for key in ("prompt", "prompt_token_ids", "max_tokens")
                   if key in batch and batch[key][i] is not None}
            unit.append((i + 1, json.dumps(row)))
        by_line = {r["line"]: r for r in self.replica.records(unit)}
        out = dict(batch)
        keys = ("embedding",) if self.replica.task == "embed" else ("token_ids", "text")
        for key in (*keys, "error"):
            out[key] = [by_line[i + 1].get(key) for i in range(n)]
        return out


def _plain(value):
    """numpy scalars and arrays (Ray Data's batch format) as JSON values."""
    return value.tolist() if hasattr(value, "tolist") else value


def map_dataset(ds, model: str, *, replicas: int = 2, task: str = "generate", max_tokens: int = 16,
                engine_kwargs: dict | None = None, prepack: dict | bool = True,
                batch_size: int = 256, num_cpus: float = 1, num_gpus: float = 0):
    """The dataset with generations (or embeddings) added, computed by `replicas` engines."""
    return ds.map_batches(
        _EngineUDF,
        fn_constructor_kwargs=dict(model=str(model), task=task, engine_kwargs=engine_kwargs or {},
                                   prepack=prepack, max_tokens=max_tokens),
        concurrency=replicas,
        batch_size=batch_size,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
