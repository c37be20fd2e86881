"""``vllm-prepack bench hf``: prepacked prefill vs padded batching in HF transformers.

Per batch of prompts (seeded synthetic lengths shaped like the paper's datasets), side by side
in one process on one device:
- padded: HF's default, one left-padded batch with a 2D attention mask;
- length-ordered: the same prompts sorted by length, as 4 padded sub-batches;
- prepacked: ``vllm_prepack.hf`` (FFD rows, block-diagonal attention; one row with varlen);
- one row: the same, all prompts in a single unpadded row (with sdpa: one dense S x S mask);
- packed forward only: the prepacked forward on prebuilt inputs (its gap to prepacked is the
  packing + unpacking overhead);
- FLOP floor: 2 x linear-layer parameters x real tokens / the device's measured GEMM rate.
prefill: token ids in, per-prompt KV caches (padded: the batch cache) and last-token logits out.
TTFT: token ids in, first new token of every prompt on the host out: HF's ``model.generate(...,
max_new_tokens=1)`` for padding, ``vllm_prepack.hf.generate(..., max_new_tokens=1)`` for packing,
and HF's own continuous batching, ``model.generate_batch`` (paged attention, no padding; TTFT
only: its prefill is not separable), with its KV cache and step sized to the batch (on sdpa
where ``--attn`` names flex attention or the varlen kernel, which it does not take).
Memory is the CUDA peak of the prefill above what was allocated before it, and the whole peak
with the weights (not measured on CPU).
Medians of --repeats runs after a warm-up; a variant that runs out of memory reads OOM.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from vllm_prepack import hf
from vllm_prepack.argtypes import at_least_one
from vllm_prepack.bench.report import header, table
from vllm_prepack.models import HF_BENCH_SHAPES
from vllm_prepack.workloads import SHAPES, batch_ratio, prompt_lengths, token_ids

LENGTH_GROUPS = 4  # sub-batches of the length-ordered baseline


def build_model(shape: str, device: str, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM

    config = HF_BENCH_SHAPES[shape].hf_config(pad_token_id=0)
    if attn == hf.VARLEN_ATTENTION:
        hf.register_varlen_attention()
    torch.manual_seed(0)
    with torch.device(device):  # random init in place, in the target dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Measured:
    seconds: float  # median
    peak: float  # bytes above the starting allocation (nan off CUDA)
    total: float  # peak bytes allocated, weights included (nan off CUDA)
    result: object  # what the last run returned


def _measure(fn, device: str, repeats: int) -> Measured | None:
    """Median time and peak memory of `fn`; None when it runs out of memory."""
    cuda = device.startswith("cuda")
    try:
        fn()  # warm-up (and compilation for flex)
        _sync(device)
        times, peak, total = [], float("nan"), float("nan")
        for _ in range(repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            _sync(device)
            t = time.perf_counter()
            result = fn()
            _sync(device)
            times.append(time.perf_counter() - t)
            if cuda:
                total = torch.cuda.max_memory_allocated()
                peak = total - base
        return Measured(statistics.median(times), peak, total, result)
    except torch.OutOfMemoryError:
        if cuda:
            torch.cuda.empty_cache()
        return None


def _left_padded(model, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask as HF batches prompts for generation (left padding)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), model.config.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(model.device), mask.to(model.device)


@torch.inference_mode()
def padded_prefill(model, prompts) -> torch.Tensor:
    """HF padded prefill: batch KV cache and last-token logits (positions as generate sets them)."""
    from transformers import DynamicCache

    ids, mask = _left_padded(model, prompts)
    hidden = model.base_model(input_ids=ids, attention_mask=mask,
                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                              past_key_values=DynamicCache(config=model.config),
                              use_cache=True).last_hidden_state
    return model.get_output_embeddings()(hidden[:, -1]).float()


@torch.inference_mode()
def padded_first_tokens(model, prompts) -> list[int]:
    """HF's default path: model.generate on the left-padded batch, one new token."""
    ids, mask = _left_padded(model, prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                         pad_token_id=model.config.pad_token_id or 0)
    return out[:, -1].tolist()


def length_ordered(fn, prompts) -> list:
    """`fn` over LENGTH_GROUPS sub-batches of the prompts sorted by length, in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = -(-len(order) // LENGTH_GROUPS)
    out = [None] * len(prompts)
    for k in range(0, len(order), size):
        group = order[k : k + size]
        for i, value in zip(group, fn([prompts[i] for i in group])):
            out[i] = value
    return out


@torch.inference_mode()
def packed_forward_only(model, inputs) -> None:
    from transformers import DynamicCache

    model.base_model(**inputs, past_key_values=DynamicCache(config=model.config), use_cache=True)


def gemm_rate(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul on this device."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _measure(lambda: a @ a, device, 5).seconds


def linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def continuous_batching_first_tokens(model, prompts) -> list[int]:
    """HF's continuous batching (``generate_batch``, transformers >= 4.56), one new token: what an
    HF user picks instead of padded batches. Its KV cache and step are sized to this batch (every
    prompt's prefill in one step, as packing does); left to infer them from free memory it took
    15 s a call for 8 tiny prompts on a CPU. (No inference_mode here: its generation thread
    updates the cache in place.)"""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    # The page size is `block_size` up to transformers 5.18 and `page_size` from 5.19 (the old name
    # kept there as a deprecated alias).
    page_arg = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters \
        else "block_size"
    sizing = ContinuousBatchingConfig(
        **{page_arg: page}, num_blocks=sum(-(-(len(p) + 1) // page) for p in prompts) + len(prompts),
        max_batch_tokens=sum(map(len, prompts)), max_requests_per_batch=len(prompts))
    config = GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=-1,
                              pad_token_id=model.config.pad_token_id or 0)
    # it takes sdpa, eager and flash kernels only: with anything else (flex attention,
    # VARLEN_ATTENTION: sdpa but for packed rows) it runs on sdpa
    impl = model.config._attn_implementation or "eager"
    switch = impl not in ("sdpa", "eager") and "flash" not in impl
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        outputs = model.generate_batch(inputs=[list(p) for p in prompts], generation_config=config,
                                       continuous_batching_config=sizing, progress_bar=False)
    finally:
        if switch:
            model.set_attn_implementation(impl)
    tokens = [out.generated_tokens[0] for out in outputs.values() if out.generated_tokens]
    if len(tokens) != len(prompts):  # generate_batch logs a failure and returns what it has
        raise RuntimeError(f"generate_batch returned {len(tokens)} of {len(prompts)} first tokens")
    return tokens


def first_tokens(model, prompts, capacity: int | None = None) -> list[int]:
    return [t[0] for t in hf.generate(model, prompts, max_new_tokens=1, eos_token_id=[],
                                      capacity=capacity)]


def run_batch(model, prompts, device: str, repeats: int, rate: float) -> list[dict]:
    lengths = [len(p) for p in prompts]
    layout = hf.packed_layout(model, lengths)
    one_row = sum(lengths)
    variants = {  # name: (prefill, first tokens on the host)
        "padded": (lambda: padded_prefill(model, prompts),
                   lambda: padded_first_tokens(model, prompts)),
        "length-ordered": (lambda: length_ordered(lambda p: padded_prefill(model, p), prompts),
                           lambda: length_ordered(lambda p: padded_first_tokens(model, p), prompts)),
        "prepacked": (lambda: hf.prefill(model, prompts),
                      lambda: first_tokens(model, prompts)),
        "one row": (lambda: hf.prefill(model, prompts, capacity=one_row),
                    lambda: first_tokens(model, prompts, capacity=one_row)),
        "HF generate_batch": (None, lambda: continuous_batching_first_tokens(model, prompts)),
    }
    prefill = {name: _measure(fns[0], device, repeats) for name, fns in variants.items() if fns[0]}
    ttft = {name: _measure(fns[1], device, repeats) for name, fns in variants.items()}
    inputs = hf.packed_inputs(model, prompts, layout)
    prefill["packed forward only"] = _measure(lambda: packed_forward_only(model, inputs), device, repeats)
    padding_ratio = max(lengths) * len(lengths) / sum(lengths)

    def ratio(a: Measured | None, b: Measured | None, field: str = "seconds") -> float:
        return getattr(a, field) / getattr(b, field) if a and b else float("nan")

    def ms(m: Measured | None) -> float | str:
        return 1e3 * m.seconds if m else "OOM"

    baseline = ttft["padded"]
    rows = []
    for name in [*variants, "packed forward only"]:
        measured = prefill.get(name)
        row = {"variant": name}
        if name in prefill:
            row.update({
                "prefill ms": ms(measured),
                "prefill speedup": ratio(prefill["padded"], measured),
                "of padding ratio": ratio(prefill["padded"], measured) / padding_ratio,
                "peak MiB": measured.peak / 2**20 if measured else float("nan"),
                "memory vs padded": ratio(measured, prefill["padded"], "peak"),
                "with weights MiB": measured.total / 2**20 if measured else float("nan"),
            })
        if name in ttft:
            timed = ttft[name]
            row.update({"TTFT ms": ms(timed), "TTFT speedup": ratio(baseline, timed)})
            if timed and baseline:  # bf16 may flip near-ties between different kernels
                same = sum(a == b for a, b in zip(timed.result, baseline.result))
                row["first tokens = padded"] = f"{same}/{len(prompts)}"
        rows.append(row)
    rows.append({"variant": "FLOP floor", "prefill ms": 2e3 * linear_params(model) * one_row / rate})
    overhead = ratio(prefill["prepacked"], prefill["packed forward only"]) - 1
    for row in rows:
        row.update({"batch": len(prompts), "padding ratio": padding_ratio,
                    "rows": len(layout.rows), "pack+unpack overhead": overhead})
    return rows


COLUMNS = ["batch", "variant", "prefill ms", "prefill speedup", "of padding ratio", "TTFT ms",
           "TTFT speedup", "peak MiB", "memory vs padded", "with weights MiB", "first tokens = padded",
           "padding ratio", "rows", "pack+unpack overhead"]


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
                print(f"bench hf: {shape} {workload} batch {batch} done", file=sys.stderr, flush=True)
            parts.append(
                f"**{shape}, {workload} (synthetic; batch max/mean ratio at "
                f"{SHAPES[workload].at_batch}: {batch_ratio(prompt_lengths(workload, 6400), SHAPES[workload].at_batch):.2f}), "
                f"{device} {str(dtype).removeprefix('torch.')}, attention {args.attn}, median of {args.repeats}**\n\n"
                + table(rows, COLUMNS)
            )
            if args.out:  # what is done so far survives a time limit
                args.out.write_text("\n".join(parts))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    parts.append(f"GEMM rate used for the FLOP floor: {rate / 1e12:.1f} TFLOP/s (measured).")
    return "\n".join(parts)


def _device(text: str) -> str:
    """--device: cuda only where torch sees one."""
    if text not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"must be cuda or cpu, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: torch sees no CUDA device here")
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--device", type=_device, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"],
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--models", nargs="+", choices=list(HF_BENCH_SHAPES),
                        help="random-weight model shapes (default: sheared-1.3b llama2-7b on "
                             "cuda, tiny on cpu)")
    parser.add_argument("--attn", default="sdpa",
                        choices=["sdpa", "flex_attention", hf.VARLEN_ATTENTION, "eager"],
                        help=f"{hf.VARLEN_ATTENTION}: torch's varlen flash kernel for the packed "
                             "forward, sdpa for everything else")
    parser.add_argument("--workloads", nargs="+", default=["mmlu", "alpaca"], choices=list(SHAPES),
                        help="synthetic prompt-length mixes")
    parser.add_argument("--batches", type=at_least_one, nargs="+", default=[16, 32, 64, 128],
                        help="prompts per batch")
    parser.add_argument("--repeats", type=at_least_one, default=5,
                        help="timings of each row (the median is shown)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt lengths")
