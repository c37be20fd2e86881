"""Ray Data interop on real engines: Ray Data LLM with the plugin and the token-batching stage,
and map_dataset (this project's replicas as a Ray Data actor pool)."""

import ray
import pytest
from ray_cluster import ENGINE, cluster  # noqa: F401  (a fixture)

from vllm_prepack.workloads import prompt_lengths, token_ids

pytestmark = pytest.mark.engine


def prompts(n, seed):
    return token_ids(prompt_lengths("bimodal", n, seed=seed, max_len=300), vocab_size=512, seed=seed)


def test_ray_data_llm_with_the_plugin_behind_token_batches(cluster, tiny_model, engine):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from vllm_prepack.ray_data import plugin_engine_kwargs, token_batches

    config = vLLMEngineProcessorConfig(
        model_source=tiny_model, engine_kwargs=plugin_engine_kwargs(ENGINE), concurrency=1,
        batch_size=4, log_engine_metrics=False, placement_group_config={"bundles": [{"CPU": 1}]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(key=row["key"], tokenized_prompt=row["ids"],
                                    sampling_params=dict(max_tokens=3, temperature=0, ignore_eos=True)),
        postprocess=lambda row: dict(key=row["key"], tokens=list(row["generated_tokens"])))
    ids = prompts(14, seed=4)
    ds = ray.data.from_items([{"key": i, "ids": p} for i, p in enumerate(ids)])
    balanced = token_batches(ds, 4, tokens=lambda row: len(row["ids"]) + 3)
    keys = [r["key"] for r in balanced.take_all()]
    assert sorted(keys) == list(range(14))
    weights = [len(ids[k]) for k in keys]
    sums = [sum(weights[i:i + 4]) for i in range(0, 12, 4)]
    assert max(sums) - min(sums) <= max(weights)  # each full batch of 4 rows: about equal tokens
    rows = processor(balanced).take_all()
    assert sorted(r["key"] for r in rows) == list(range(14))
    # greedy outputs are plain vLLM's (the plugin changes the schedule, not the tokens)
    from vllm import SamplingParams

    plain = engine(tiny_model, False, **ENGINE).generate(
        [{"prompt_token_ids": p} for p in ids], SamplingParams(max_tokens=3, temperature=0,
                                                               ignore_eos=True))
    assert {r["key"]: r["tokens"] for r in rows} == {
        i: list(o.outputs[0].token_ids) for i, o in enumerate(plain)}


def test_map_dataset_adds_generations(cluster, tiny_model):
    from vllm_prepack.ray_data import map_dataset

    from vllm_prepack.config import PrepackConfigError

    ids = token_ids(prompt_lengths("mmlu", 12, seed=4, max_len=200), vocab_size=512, seed=4)
    # max_tokens set on some rows only: Ray makes the column floats, its nulls NaN
    items = [{"key": i, "prompt_token_ids": p, "max_tokens": 2 if i % 2 else None}
             for i, p in enumerate(ids)] + [{"key": 12, "prompt_token_ids": [], "max_tokens": None}]
    ds = ray.data.from_items(items)
    rows = map_dataset(ds, tiny_model, replicas=1, max_tokens=3, engine_kwargs=ENGINE,
                       batch_size=5, num_cpus=0.5).take_all()
    assert sorted(r["key"] for r in rows) == list(range(13))
    by_key = {r["key"]: r for r in rows}
    assert all(by_key[i]["error"] is None and len(by_key[i]["token_ids"]) == (2 if i % 2 else 3)
               for i in range(12))
    assert by_key[12]["error"].startswith("'prompt_token_ids' must be")  # not "line N:" of a batch
    with pytest.raises(PrepackConfigError, match="max_swaps"):  # before any actor starts
        map_dataset(ds, tiny_model, prepack={"max_swaps": -1})


def test_token_batches_refuses_rows_it_cannot_weigh():
    import pyarrow as pa

    from vllm_prepack.ray_data import _reorder, row_tokens

    with pytest.raises(ValueError, match="cannot weigh these rows .*messages.*pass tokens="):
        _reorder(pa.table({"messages": ["hi", "there"]}), 1, row_tokens)
    table = pa.table({"prompt": ["a" * 40, "b", "c" * 40, "d"]})
    order = _reorder(table, 2, row_tokens).column("prompt").to_pylist()
    assert sorted(order) == sorted(table.column("prompt").to_pylist())
    assert [len(order[0]) + len(order[1]), len(order[2]) + len(order[3])] == [41, 41]  # balanced
