"""Prepacked prefill for HF transformers (CPU, tiny random fp32 models)."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from vllm_prepack import hf
from vllm_prepack.packing import PackedLayout
from vllm_prepack.workloads import token_ids

PROMPTS = token_ids([5, 17, 1, 30, 9, 12, 1, 23], vocab_size=512, seed=3)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch_dir(request, tiny_model, tiny_qwen2):
    return {"llama": tiny_model, "qwen2": tiny_qwen2}[request.param]


def load(model_dir, impl):
    if impl == hf.VARLEN_ATTENTION:
        hf.register_varlen_attention()
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=impl
    ).eval()


@pytest.fixture(scope="module", params=["sdpa", "eager", hf.VARLEN_ATTENTION])
def model(request, arch_dir):
    return load(arch_dir, request.param)


def reference(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt]), use_cache=True)


def assert_equals_separate_prefills(model, prompts, same_weights=None, kv_atol=1e-5):
    """Logits and every layer's KV equal per-prompt prefills (by `same_weights`, default the
    model itself), and each prompt's cache decodes on."""
    same_weights = same_weights or model
    result = hf.prefill(model, prompts)
    assert len(result.layout.rows) < len(prompts)  # really packed
    if hf.attention_kind(model) == "varlen":
        assert len(result.layout.rows) == 1 and result.layout.padded_tokens == result.layout.real_tokens
    for i, prompt in enumerate(prompts):
        ref = reference(same_weights, prompt)
        torch.testing.assert_close(result.logits[i], ref.logits[0, -1], rtol=1e-4, atol=1e-4)
        assert len(result.caches[i].layers) == len(ref.past_key_values.layers)
        assert result.caches[i].get_seq_length() == len(prompt)
        for ours, theirs in zip(result.caches[i].layers, ref.past_key_values.layers):
            assert type(ours) is type(theirs)
            assert ours.keys.shape == theirs.keys.shape == ours.values.shape
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=kv_atol)
            torch.testing.assert_close(ours.values, theirs.values, rtol=1e-4, atol=kv_atol)
        step = torch.tensor([[prompt[0]]])
        with torch.no_grad():
            ours = same_weights(step, past_key_values=result.caches[i], use_cache=True).logits
            theirs = same_weights(step, past_key_values=ref.past_key_values, use_cache=True).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    return result


def test_logits_and_kv_equal_separate_prefills(model):
    assert_equals_separate_prefills(model, PROMPTS)


def test_prompt_caches_are_views_of_one_buffer(tiny_model):
    result = hf.prefill(load(tiny_model, "sdpa"), PROMPTS)
    storages = {tensor.untyped_storage().data_ptr() for cache in result.caches
                for layer in cache.layers for tensor in (layer.keys, layer.values)}
    assert len(storages) == 1


def test_flex_attention_prefill_on_cpu(arch_dir):
    """The BlockMask path end to end against sdpa prefills of the same weights. Only the packed
    forward runs flex: this CPU torch's inductor miscompiles flex for other shapes (decoding).
    Two kernels' fp32 sums: KV values differed by up to 2e-5 on an Intel Xeon (within 1e-5 on
    an AMD EPYC), so the KV takes the logits' tolerance here."""
    assert_equals_separate_prefills(load(arch_dir, "flex_attention"), PROMPTS,
                                    same_weights=load(arch_dir, "sdpa"), kv_atol=1e-4)


@pytest.fixture(scope="module")
def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                           sliding_window=32, initializer_range=0.2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config).eval()


def test_sliding_window_model(mistral):
    """Sliding-window caches are cut like the model's own; decoding runs past the window."""
    result = assert_equals_separate_prefills(mistral, PROMPTS)
    assert type(result.caches[0].layers[0]).__name__ == "DynamicSlidingWindowLayer"
    new = hf.generate(mistral, PROMPTS, max_new_tokens=20, eos_token_id=[])
    for prompt, tokens in zip(PROMPTS, new):
        ref = mistral.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                               eos_token_id=None)
        assert tokens == ref[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="prompt 1 has 33 tokens, over the model's sliding window of 32"):
        hf.prefill(mistral, [[5], [5] * 33])


def test_greedy_generation_identical_to_per_prompt_generate(model):
    new = hf.generate(model, PROMPTS, max_new_tokens=10)
    for prompt, tokens in zip(PROMPTS, new):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert tokens == ref[0, len(prompt):].tolist()


def test_eos_stops_each_prompt_like_generate(model):
    free = hf.generate(model, PROMPTS, max_new_tokens=10, eos_token_id=[])
    eos = free[0][3]  # a token the first prompt produces: it must stop there
    new = hf.generate(model, PROMPTS, max_new_tokens=10, eos_token_id=eos)
    assert new[0] == free[0][: free[0].index(eos) + 1]
    for prompt, tokens in zip(PROMPTS, new):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                             eos_token_id=eos, pad_token_id=2)
        ref = ref[0, len(prompt):].tolist()
        assert tokens == ref[: ref.index(eos) + 1] if eos in ref else tokens == ref


@pytest.mark.parametrize(
    "prompts",
    [[[7]], [[4], [9], [11]], [list(range(3, 40))], []],
    ids=["one-token", "all-length-1", "one-prompt", "empty-list"],
)
def test_edge_cases(tiny_model, prompts):
    model = load(tiny_model, "sdpa")
    result = hf.prefill(model, prompts)
    assert len(result.caches) == len(prompts) == result.logits.shape[0]
    new = hf.generate(model, prompts, max_new_tokens=3, eos_token_id=[])
    assert len(new) == len(prompts)
    for prompt, tokens in zip(prompts, new):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)
        assert tokens == ref[0, len(prompt):].tolist()


def test_prompt_as_long_as_the_row_capacity(tiny_model):
    model = load(tiny_model, "sdpa")
    prompts = [list(range(3, 67)), list(range(3, 35)), list(range(5, 37))]  # 64, 32, 32
    result = hf.prefill(model, prompts, capacity=64)
    assert result.layout.rows == ((0,), (1, 2))
    torch.testing.assert_close(result.logits[0], reference(model, prompts[0]).logits[0, -1],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prompt 0 has 64 tokens, over the row capacity 63"):
        hf.prefill(model, prompts, capacity=63)


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ([[5, 6], []], ValueError, "prompt 1 is empty"),
        ([[5, 600]], ValueError, r"prompt 0 has token 600, not an id in \[0, 512\)"),
        ([[5, "a"]], ValueError, "prompt 0 has token 'a'"),
        (["hello"], TypeError, "prompt 0 must be a list of token ids"),
        ("hello", TypeError, "prompts must be a list"),
        ([[5] * 4097], ValueError, "prompt 0 has 4097 tokens, over the model's maximum of 4096"),
    ],
)
def test_bad_prompts_get_clear_errors(tiny_model, prompts, error, message):
    with pytest.raises(error, match=message):
        hf.prefill(load(tiny_model, "sdpa"), prompts)


def test_bad_max_new_tokens(tiny_model):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        hf.generate(load(tiny_model, "sdpa"), [[3]], max_new_tokens=0)


def test_flex_block_mask_equals_block_diagonal_mask(tiny_model):
    """The flex BlockMask encodes the same mask as the sdpa fallback (its forward needs a GPU)."""
    model = load(tiny_model, "sdpa")
    layout = PackedLayout.build([len(p) for p in PROMPTS])
    dense = hf.packed_inputs(model, PROMPTS, layout)["attention_mask"]
    model.config._attn_implementation = "flex_attention"
    try:
        block = hf.packed_inputs(model, PROMPTS, layout)["attention_mask"]
    finally:
        model.config._attn_implementation = "sdpa"
    rows, width = len(layout.rows), layout.width
    b = torch.arange(rows)[:, None, None]
    q, kv = torch.arange(width)[None, :, None], torch.arange(width)[None, None, :]
    assert block.shape[0] == rows and block.shape[-1] == width
    assert torch.equal(block.mask_mod(b, None, q, kv), dense[:, 0])


def test_varlen_gets_one_unpadded_row_and_every_boundary(tiny_model):
    model = load(tiny_model, hf.VARLEN_ATTENTION)
    lengths = [len(p) for p in PROMPTS]
    layout = hf.packed_layout(model, lengths, capacity=30)  # rows are for masks: ignored
    inputs = hf.packed_inputs(model, PROMPTS, layout)
    assert "attention_mask" not in inputs
    assert inputs["input_ids"].shape == (1, sum(lengths))
    cu = inputs["cu_seq_lens_q"].tolist()
    assert [b - a for a, b in zip(cu, cu[1:])] == [lengths[i] for i in layout.rows[0]]
    pos = inputs["position_ids"][0].tolist()
    assert all(pos[start] == 0 for start in cu[:-1])  # positions restart at every boundary
    assert inputs["max_length_q"] == max(lengths)
    with pytest.raises(ValueError, match="varlen attention takes one unpadded row"):
        hf.packed_inputs(model, PROMPTS, PackedLayout.build(lengths))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex decoding and CUDA kernels need a CUDA GPU")
@pytest.mark.parametrize("impl, dtype", [("flex_attention", torch.float32), ("sdpa", torch.float32),
                                         (hf.VARLEN_ATTENTION, torch.bfloat16)])
def test_gpu_packed_prefill_and_generate(tiny_model, impl, dtype):
    """On CUDA in bf16, prepack_varlen runs torch's flash varlen kernel (CPU runs the reference)."""
    if impl == hf.VARLEN_ATTENTION:
        hf.register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=dtype, attn_implementation=impl).cuda().eval()
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    result = hf.prefill(model, PROMPTS)
    new = hf.generate(model, PROMPTS, max_new_tokens=5, eos_token_id=[])
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            ref = model(ids).logits[0, -1].float()
        torch.testing.assert_close(result.logits[i], ref, rtol=tolerance, atol=tolerance)
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert new[i] == ref[0, len(prompt):].tolist()


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), max_size=30), extra=st.integers(0, 20))
def test_layout_positions_and_boundaries(lengths, extra):
    capacity = max(lengths, default=1) + extra
    layout = PackedLayout.build(lengths, capacity)
    positions, seqs = layout.positions(), layout.sequence_ids()
    for i, (row, start) in enumerate(layout.place):
        assert positions[row][start : start + lengths[i]] == list(range(lengths[i]))
        assert seqs[row][start : start + lengths[i]] == [i] * lengths[i]
    assert layout.width <= capacity
    assert sum(row.count(-1) for row in seqs) == layout.padded_tokens - layout.real_tokens
    cu = layout.cu_seqlens()
    assert cu[-1] == layout.padded_tokens and all(b > a for a, b in zip(cu, cu[1:]))


def test_hf_path_imports_without_vllm():
    """The GPU machine has neither vLLM nor Ray: the HF path and `bench hf` must not need them."""
    code = (
        "import sys; sys.modules.update(vllm=None, ray=None); "
        "import vllm_prepack, vllm_prepack.hf, vllm_prepack.packing, vllm_prepack.bench.hf; "
        "from vllm_prepack import cli; cli.main(['bench', 'hf', '--help'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--attn" in done.stdout


@pytest.mark.parametrize("attn", ["sdpa", "prepack_varlen"])
def test_bench_hf_on_cpu(tmp_path, attn):
    """The benchmark as a GPU machine runs it: every variant measured, fp32 first tokens agree
    (HF's continuous batching on sdpa where the packed forward uses the varlen kernel)."""
    from vllm_prepack import cli
    from vllm_prepack.bench.hf import COLUMNS

    out = tmp_path / "hf.md"
    assert cli.main(["bench", "hf", "--models", "tiny", "--workloads", "mmlu", "--batches", "4", "8",
                     "--repeats", "1", "--attn", attn, "--out", str(out)]) == 0
    lines = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| 8 |")]
    rows = {cells[1].strip(): dict(zip(COLUMNS, (c.strip() for c in cells))) for cells in lines}
    assert list(rows) == ["padded", "length-ordered", "prepacked", "one row", "HF generate_batch",
                          "packed forward only", "FLOP floor"]
    number = lambda name, column: float(rows[name][column].replace(",", ""))  # noqa: E731
    for name in ["length-ordered", "prepacked", "one row"]:
        assert number(name, "prefill speedup") == pytest.approx(
            number("padded", "prefill ms") / number(name, "prefill ms"), rel=0.02)  # 3 digits
    for name in ["length-ordered", "prepacked", "one row", "HF generate_batch"]:
        assert rows[name]["first tokens = padded"] == "8/8"  # fp32: every path agrees
        assert number(name, "TTFT speedup") == pytest.approx(
            number("padded", "TTFT ms") / number(name, "TTFT ms"), rel=0.02)
    assert rows["HF generate_batch"]["prefill ms"] == ""  # TTFT only
    if attn == "prepack_varlen":  # batch 4's generate_batch gave the varlen kernel back: one row
        assert rows["prepacked"]["rows"] == "1"
