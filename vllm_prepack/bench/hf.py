"""``vllm-prepack bench hf``: prepacked prefill vs padded batching in HF transformers.

Per batch of prompts (seeded synthetic lengths shaped like the paper's datasets), side by side
in one process on one device:
- padded: HF's default, one right-padded batch with a 2D attention mask;
- length-ordered: the same prompts sorted by length, as 4 padded sub-batches;
- prepacked: ``vllm_prepack.hf.prefill`` (FFD rows, block-diagonal attention);
- one row: the same, all prompts in a single unpadded row;
- FLOP floor: 2 x linear-layer parameters x real tokens / the device's measured GEMM rate.
Prefill = the forward with a KV cache and last-token logits; TTFT adds building the inputs,
splitting the caches and picking the first token; memory is the CUDA peak above the weights
(not reported on CPU). Medians of --repeats runs after a warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch

from vllm_prepack import hf
from vllm_prepack.bench.report import header, table
from vllm_prepack.packing import PackedLayout
from vllm_prepack.workloads import SHAPES, batch_ratio, prompt_lengths, token_ids

MODEL_SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (256, 4, 4, 4, 768, 512),
    "sheared-1.3b": (2048, 24, 16, 16, 5504, 32000),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000),
}


def build_model(shape: str, device: str, dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = MODEL_SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, pad_token_id=0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(fn, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds and peak bytes above the starting allocation."""
    fn()  # warm-up (and compilation for flex)
    _sync(device)
    times, peak = [], float("nan")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


@torch.inference_mode()
def padded_prefill(model, prompts) -> torch.Tensor:
    """HF default: right-padded batch, 2D mask, KV cache, last-token logits only."""
    from transformers import DynamicCache

    width = max(map(len, prompts))
    pad = model.config.pad_token_id or 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask,
                              past_key_values=DynamicCache(config=model.config),
                              use_cache=True).last_hidden_state
    last = torch.tensor([len(p) - 1 for p in prompts], device=model.device)
    return model.get_output_embeddings()(hidden[torch.arange(len(prompts)), last]).argmax(-1)


def length_ordered(model, prompts, groups: int = 4) -> list:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = -(-len(order) // groups)
    return [padded_prefill(model, [prompts[i] for i in order[k : k + size]])
            for k in range(0, len(order), size)]


@torch.inference_mode()
def packed_forward_only(model, inputs) -> None:
    from transformers import DynamicCache

    model.base_model(**inputs, past_key_values=DynamicCache(config=model.config), use_cache=True)


def gemm_rate(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul on this device."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = _measure(lambda: a @ a, device, 5)
    return 2 * n**3 / seconds


def linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def run_batch(model, prompts, device: str, repeats: int, rate: float) -> list[dict]:
    lengths = [len(p) for p in prompts]
    layout = PackedLayout.build(lengths)
    packed_inputs = hf.packed_inputs(model, prompts, layout)
    variants = {
        "padded": lambda: padded_prefill(model, prompts),
        "length-ordered": lambda: length_ordered(model, prompts),
        "prepacked": lambda: hf.prefill(model, prompts).logits.argmax(-1),
        "one row": lambda: hf.prefill(model, prompts, capacity=sum(lengths)).logits.argmax(-1),
    }
    results = {name: _measure(fn, device, repeats) for name, fn in variants.items()}
    forward, _ = _measure(lambda: packed_forward_only(model, packed_inputs), device, repeats)
    floor = 2 * linear_params(model) * sum(lengths) / rate
    padded_time, padded_peak = results["padded"]
    padding_ratio = max(lengths) * len(lengths) / sum(lengths)
    rows = []
    for name, (seconds, peak) in results.items():
        rows.append({
            "variant": name,
            "TTFT ms": 1e3 * seconds,
            "speedup vs padded": padded_time / seconds,
            "of padding ratio": padded_time / seconds / padding_ratio,
            "peak MiB": peak / 2**20,
            "memory vs padded": peak / padded_peak,
        })
    rows.append({"variant": "packed forward only", "TTFT ms": 1e3 * forward,
                 "speedup vs padded": padded_time / forward,
                 "of padding ratio": padded_time / forward / padding_ratio})
    rows.append({"variant": "FLOP floor", "TTFT ms": 1e3 * floor})
    overhead = (results["prepacked"][0] - forward) / results["prepacked"][0]
    for row in rows:
        row.update({"batch": len(prompts), "padding ratio": padding_ratio,
                    "rows": len(layout.rows), "pack+unpack overhead": overhead})
    return rows


def main(args) -> str:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or (
        "bf16" if device.startswith("cuda") else "fp32")]
    shapes = args.models or (["sheared-1.3b", "llama2-7b"] if device.startswith("cuda") else ["tiny"])
    parts = [header("bench hf")]
    rate = gemm_rate(device, dtype)
    for shape in shapes:
        model = build_model(shape, device, dtype, args.attn)
        for workload in args.workloads:
            rows = []
            for batch in args.batches:
                lengths = prompt_lengths(workload, batch, seed=args.seed, max_len=1024)
                prompts = token_ids(lengths, vocab_size=model.config.vocab_size, seed=args.seed)
                rows += run_batch(model, prompts, device, args.repeats, rate)
            parts.append(
                f"**{shape}, {workload} (synthetic; batch max/mean ratio at "
                f"{SHAPES[workload].at_batch}: {batch_ratio(prompt_lengths(workload, 6400), SHAPES[workload].at_batch):.2f}), "
                f"{device} {str(dtype).removeprefix('torch.')}, attention {args.attn}, median of {args.repeats}**\n\n"
                + table(rows, ["batch", "variant", "TTFT ms", "speedup vs padded", "of padding ratio",
                               "peak MiB", "memory vs padded", "padding ratio", "rows",
                               "pack+unpack overhead"])
            )
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    parts.append(f"GEMM rate used for the FLOP floor: {rate / 1e12:.1f} TFLOP/s (measured).")
    return "\n".join(parts)


def add_arguments(parser) -> None:
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"])
    parser.add_argument("--models", nargs="+", choices=list(MODEL_SHAPES))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention", "eager"])
    parser.add_argument("--workloads", nargs="+", default=["mmlu", "alpaca"], choices=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
