"""Ray Data interop: the plugin inside Ray Data LLM, a token-batching stage in front of it, and
an actor pool of this project's replicas.

The plugin inside Ray Data LLM is one engine argument (``plugin_engine_kwargs``)::

    vLLMEngineProcessorConfig(model_source=..., engine_kwargs=plugin_engine_kwargs({...}), ...)

Ray Data LLM batches by rows (``batch_size``): a batch of long documents and a batch of short
chats weigh very differently, and the replica that draws the heavy one at the end finishes last.
``token_batches(ds, batch_size)`` reorders rows, a window of batches at a time, so that every
``batch_size`` consecutive rows carry about the same tokens; put it in front of the processor
(``processor(token_batches(ds, cfg.batch_size))``) and its row batches become token batches.

``map_dataset`` runs a dataset through actors hosting ``replica.Replica`` (the plugin on), for
users on Ray Data without Ray Data LLM. Rows: ``prompt`` (text) or ``prompt_token_ids``,
optionally ``max_tokens`` (null: the default); generation is greedy, and other columns (sampling
keys included) pass through unread. Added: ``token_ids`` and ``text`` (or ``embedding``), and
``error`` (null, or why the row has no result).
"""

from __future__ import annotations

import json
import math
import os
import re

from vllm_prepack.batch_record import CHARS_PER_TOKEN, expected_tokens
from vllm_prepack.config import plugin_engine_kwargs
from vllm_prepack.dispatch import balanced_batches

__all__ = ["plugin_engine_kwargs", "token_batches", "map_dataset", "row_tokens"]


def row_tokens(row: dict) -> float:
    """Expected tokens of a Ray Data LLM row: prompt (token ids, or text at CHARS_PER_TOKEN
    characters a token) plus ``sampling_params.max_tokens`` for each of its ``n`` choices."""
    ids = row.get("tokenized_prompt")
    if ids is None:
        ids = row.get("prompt_token_ids")
    prompt = len(ids) if ids is not None else len(row.get("prompt") or "") / CHARS_PER_TOKEN
    params = row.get("sampling_params") or {}
    return expected_tokens(prompt, params.get("max_tokens") or 0, params.get("n") or 1)


PROMPT_COLUMNS = ("prompt", "tokenized_prompt", "prompt_token_ids")  # what row_tokens weighs


def _reorder(table, batch_size: int, tokens):
    weighable = set(PROMPT_COLUMNS) & set(table.column_names)
    if tokens is row_tokens and table.num_rows and not weighable:
        # every row would weigh its max_tokens at most, and the reorder would do nothing
        raise ValueError(f"token_batches cannot weigh these rows (columns "
                         f"{', '.join(table.column_names)}): none of {', '.join(PROMPT_COLUMNS)}; "
                         "pass tokens=, a function of a row, or put token_batches after the "
                         "stage that adds the prompt")
    weights = [tokens(row) for row in table.to_pylist()]
    return table.take([i for batch in balanced_batches(weights, batch_size) for i in batch])


def token_batches(ds, batch_size: int, *, window_batches: int = 64, tokens=row_tokens):
    """`ds` with rows reordered so each run of `batch_size` rows carries about the same tokens
    (a window of `window_batches` batches at a time; blocks stay multiples of batch_size, so a
    downstream ``map_batches(batch_size=...)`` cuts exactly there)."""
    return ds.map_batches(_reorder, fn_kwargs={"batch_size": batch_size, "tokens": tokens},
                          batch_size=batch_size * window_batches, batch_format="pyarrow")


class _EngineUDF:
    def __init__(self, model: str, task: str, engine_kwargs: dict, prepack, max_tokens: int):
        from vllm_prepack.replica import Replica, in_process_env

        for key, value in in_process_env().items():
            os.environ.setdefault(key, value)

        self.replica = Replica(model, task, engine_kwargs, prepack, index=os.getpid(),
                               default_max_tokens=max_tokens)

    def __call__(self, batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        unit = []
        for i in range(n):
            row = {key: _plain(batch[key][i]) for key in ("prompt", "prompt_token_ids", "max_tokens")
                   if key in batch}
            unit.append((i + 1, json.dumps({k: v for k, v in row.items() if v is not None})))
        records, _ = self.replica.records(unit)
        by_line = {r["line"]: r for r in records}
        out = dict(batch)
        keys = ("embedding",) if self.replica.task == "embed" else ("token_ids", "text")
        for key in keys:
            out[key] = [by_line[i + 1].get(key) for i in range(n)]
        # an error names its line, here its place in Ray's batch: the row is its own place
        out["error"] = [_LINE.sub("", e) if (e := by_line[i + 1].get("error")) else e
                        for i in range(n)]
        return out


_LINE = re.compile(r"^line \d+: ")


def _plain(value):
    """numpy scalars and arrays (Ray Data's batch format) as JSON values; a nullable integer
    column arrives as floats with NaN for null: NaN is null, and a whole float an integer."""
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, float):
        return None if math.isnan(value) else int(value) if value.is_integer() else value
    return value


def map_dataset(ds, model: str, *, replicas: int = 2, task: str = "generate", max_tokens: int = 16,
                engine_kwargs: dict | None = None, prepack: dict | bool = True,
                batch_size: int = 256, num_cpus: float = 1, num_gpus: float = 0):
    """The dataset with generations (or embeddings) added, computed by `replicas` engines. A bad
    plugin option raises PrepackConfigError here, before any actor starts."""
    plugin_engine_kwargs(engine_kwargs, prepack)
    return ds.map_batches(
        _EngineUDF,
        fn_constructor_kwargs=dict(model=str(model), task=task, engine_kwargs=engine_kwargs or {},
                                   prepack=prepack, max_tokens=max_tokens),
        concurrency=replicas,
        batch_size=batch_size,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
