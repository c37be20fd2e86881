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
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=impl
    ).eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, arch_dir):
    return load(arch_dir, request.param)


def reference(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt]), use_cache=True)


def test_logits_and_kv_equal_separate_prefills(model):
    result = hf.prefill(model, PROMPTS)
    assert len(result.layout.rows) < len(PROMPTS)  # really packed
    for i, prompt in enumerate(PROMPTS):
        ref = reference(model, prompt)
        torch.testing.assert_close(result.logits[i], ref.logits[0, -1], rtol=1e-4, atol=1e-4)
        assert len(result.caches[i].layers) == len(ref.past_key_values.layers)
        for ours, theirs in zip(result.caches[i].layers, ref.past_key_values.layers):
            assert ours.keys.shape == theirs.keys.shape == ours.values.shape
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.values, theirs.values, rtol=1e-4, atol=1e-5)


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


def test_varlen_arguments_describe_every_sequence(tiny_model):
    model = load(tiny_model, "sdpa")
    layout = PackedLayout.build([len(p) for p in PROMPTS])
    model.config._attn_implementation = "flash_attention_2"
    try:
        inputs = hf.packed_inputs(model, PROMPTS, layout)
    finally:
        model.config._attn_implementation = "sdpa"
    cu = inputs["cu_seq_lens_q"].tolist()
    assert inputs["input_ids"].shape == (1, layout.padded_tokens) and cu[-1] == layout.padded_tokens
    pos = inputs["position_ids"][0].tolist()
    assert all(pos[start] == 0 for start in cu[:-1])  # positions restart at every boundary
    assert inputs["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex/flash attention kernels need a CUDA GPU")
@pytest.mark.parametrize("impl", ["flex_attention", "sdpa"])
def test_gpu_packed_prefill_matches(tiny_model, impl):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation=impl).cuda().eval()
    result = hf.prefill(model, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = model(torch.tensor([prompt], device="cuda")).logits[0, -1]
        torch.testing.assert_close(result.logits[i], ref, rtol=1e-3, atol=1e-3)


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
    code = (
        "import sys, vllm_prepack, vllm_prepack.hf, vllm_prepack.packing; "
        "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')], 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
