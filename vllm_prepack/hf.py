"""Prepacked prefill for HF transformers causal LMs: the paper's method, done without dense masks
where the attention implementation allows it. Imports torch and transformers, never vLLM.

    caches, logits = vllm_prepack.hf.prefill(model, prompts)   # per-prompt KV caches + logits
    new_tokens = vllm_prepack.hf.generate(model, prompts, max_new_tokens=32)

Prompts are packed into rows (first-fit decreasing, the shared core in ``packing.py``); position
ids restart at every prompt, and each prompt attends only to itself:
- flash-attention implementations, and ``prepack_varlen`` (``register_varlen_attention``: torch's
  own varlen flash kernel, for GPUs without the flash-attn package), get all prompts in one row
  with no padding at all and the sequence boundaries (``cu_seq_lens_q/k``), no mask;
- ``flex_attention`` gets a ``BlockMask`` (block-sparse: fully masked tiles are skipped);
- ``sdpa`` and ``eager`` get a 4D block-diagonal mask, rows x width x width: bool for sdpa, the
  model dtype for eager. That is the only dense mask, and its size equals what padded batching
  builds for the same rows (a padded batch of B prompts builds B x L x L); use flex for large rows.
The forward writes every layer's keys and values into one buffer, so each prompt's cache is a
view of it (no copy, a few Python objects per prompt), and its last-token logits come from the
output head applied to its last hidden state only. ``generate`` skips the per-prompt caches and
gathers the left-padded batch cache that decoding needs in one indexing operation.
Full-attention and sliding-window layers are supported; the packed masks do not apply a sliding
window, so with one every prompt must fit in it (checked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from vllm_prepack.packing import PackedLayout

FLASH_PREFIX = "flash"
VARLEN_ATTENTION = "prepack_varlen"


@dataclass
class PrefillResult:
    caches: list  # one transformers DynamicCache per prompt, in input order
    logits: torch.Tensor  # (num_prompts, vocab): last-token logits, in input order
    layout: PackedLayout

    def __iter__(self):  # caches, logits = prefill(...)
        return iter((self.caches, self.logits))


def _check_prompts(model, prompts: Sequence[Sequence[int]]) -> list[int]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of token-id lists")
    vocab = model.get_input_embeddings().num_embeddings
    max_len = getattr(model.config, "max_position_embeddings", None)
    lengths = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {i} has token {bad!r}, not an id in [0, {vocab})")
        if max_len is not None and len(prompt) > max_len:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens, over the model's maximum of {max_len}"
            )
        lengths.append(len(prompt))
    return lengths


def attention_kind(model) -> str:
    impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if FLASH_PREFIX in impl or impl == VARLEN_ATTENTION:
        return "varlen"
    if impl == "flex_attention":
        return "flex"
    if impl in ("sdpa", "eager"):
        return impl
    raise ValueError(f"attention implementation {impl!r} is not supported for packed prefill")


def packed_layout(model, lengths: Sequence[int], capacity: int | None = None) -> PackedLayout:
    """Rows of at most `capacity` tokens (default: the longest prompt, as in the paper); varlen
    attention needs no rows: every prompt goes into one unpadded row."""
    if attention_kind(model) == "varlen":
        capacity = max(1, sum(lengths))
    return PackedLayout.build(lengths, capacity)


def packed_inputs(model, prompts, layout: PackedLayout) -> dict:
    """input_ids, position_ids and the attention arguments for one packed forward."""
    device = model.device
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    rows = [
        [t for i in row for t in prompts[i]] for row in layout.rows
    ]
    ids = torch.full((len(rows), layout.width), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    inputs = {
        "input_ids": ids.to(device),
        "position_ids": torch.tensor(layout.positions(), dtype=torch.long, device=device),
    }
    kind = attention_kind(model)
    if kind == "varlen":
        if len(layout.rows) != 1:
            raise ValueError("varlen attention takes one unpadded row: build it with packed_layout")
        cu = torch.tensor(layout.cu_seqlens(), dtype=torch.int32, device=device)
        longest = max(layout.lengths)
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return inputs
    seq = torch.tensor(layout.sequence_ids(), dtype=torch.long, device=device)
    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_prompt_causal(b, h, q, kv):
            return (seq[b, q] == seq[b, kv]) & (q >= kv)

        inputs["attention_mask"] = create_block_mask(
            same_prompt_causal, B=seq.shape[0], H=None, Q_LEN=layout.width,
            KV_LEN=layout.width, device=device,
        )
        return inputs
    causal = torch.ones(layout.width, layout.width, dtype=torch.bool, device=device).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal  # (rows, width, width)
    mask = mask[:, None]
    if kind == "eager":
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=device).masked_fill(
            ~mask, torch.finfo(model.dtype).min
        )
    inputs["attention_mask"] = mask
    return inputs


def register_varlen_attention() -> str:
    """Register VARLEN_ATTENTION with transformers (idempotent) and return its name:
    ``from_pretrained(path, attn_implementation=hf.register_varlen_attention())``.

    For GPUs without the flash-attn package: packed prefill runs torch's own varlen flash kernel
    over the sequence boundaries (no mask at all); every other call (padded batches, decoding)
    is plain sdpa, with sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError("varlen attention runs one packed row with no cached tokens before it")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    out = _varlen(q, k, v, cu, kwargs["max_length_q"], scaling)
    return out[None], None


@lru_cache(maxsize=1)
def _varlen_kernel():
    """torch's varlen flash attention and its causal/GQA keywords, which differ between torch
    versions (``is_causal`` in older ones, ``window_size`` later)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def _varlen(q, k, v, cu: torch.Tensor, longest: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each [cu[i], cu[i+1]) span; q (tokens, heads, dim), k/v with
    fewer heads under GQA. The flash kernel on CUDA in half precision; elsewhere (CPU, fp32)
    one sdpa call per sequence, which is also the reference the tests compare with."""
    groups = q.shape[1] // k.shape[1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kernel, causal, gqa = _varlen_kernel()
        if groups > 1 and not gqa:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        extra = {"enable_gqa": True} if groups > 1 and gqa else {}
        return kernel(q, k, v, cu, cu, longest, longest, scale=scale, **causal, **extra)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=groups > 1,
        ).transpose(0, 1)
    return out


def _placement(layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt, as tensors: its row, its first column in that row, and its length."""
    rows, starts = zip(*layout.place)
    return torch.tensor(rows), torch.tensor(starts), torch.tensor(layout.lengths)


class _KVBuffer:
    """Every layer's keys and values of the packed forward in one (2, layers, *shape) tensor,
    so that one prompt's slice of all layers is a single view (unbound per layer for free)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.kv: torch.Tensor | None = None

    def write(self, index: int, keys: torch.Tensor, values: torch.Tensor):
        if self.kv is None:
            self.kv = keys.new_empty((2, self.num_layers, *keys.shape))
        if keys.shape != self.kv.shape[2:] or values.shape != keys.shape:
            raise ValueError(
                f"layer {index} caches keys {tuple(keys.shape)} and values {tuple(values.shape)}, "
                f"not {tuple(self.kv.shape[2:])}: packed prefill needs the same K/V shape in every layer"
            )
        self.kv[0, index].copy_(keys)
        self.kv[1, index].copy_(values)
        return self.kv[0, index], self.kv[1, index]


@lru_cache(maxsize=1)
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """Packed-forward cache layer: keeps its keys and values in the shared _KVBuffer."""

        def __init__(self, buffer: _KVBuffer, index: int):
            super().__init__()
            self.buffer, self.index = buffer, index

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = self.buffer.write(self.index, key_states, value_states)
            return self.keys, self.values

    return BufferLayer


def _like(template, **fields):
    """A shallow copy of `template` with `fields` replaced (cheaper than copy.copy, which
    matters at prompts x layers objects per prefill)."""
    obj = object.__new__(type(template))
    obj.__dict__.update(template.__dict__, **fields)
    return obj


class _CacheTemplate:
    """The model's own DynamicCache layout (layer types, sliding windows), used to build
    per-prompt and batch caches around existing tensors without copying them."""

    def __init__(self, model):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        self.cache = DynamicCache(config=model.config)
        self.windows = []  # per layer: None (full attention) or the sliding window
        for i, layer in enumerate(self.cache.layers):
            if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
                raise ValueError(
                    f"layer {i} uses a {type(layer).__name__} cache: packed prefill supports "
                    "full-attention and sliding-window attention layers"
                )
            self.windows.append(getattr(layer, "sliding_window", None))
        self.initialized = False

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @property
    def smallest_window(self) -> int | None:
        return min((w for w in self.windows if w is not None), default=None)

    def build(self, keys, values, length: int):
        """A DynamicCache over per-layer keys/values (views kept as they are) of `length` tokens."""
        if not self.initialized:  # dtype, device and the layers' own tensors, once
            for layer in self.cache.layers:
                layer.lazy_initialization(keys[0], values[0])
            self.initialized = True
        layers = []
        for layer, window, k, v in zip(self.cache.layers, self.windows, keys, values):
            if window is None:
                layers.append(_like(layer, keys=k, values=v))
            else:  # what DynamicSlidingWindowLayer.update keeps: the last window - 1 tokens
                layers.append(_like(layer, keys=k[:, :, 1 - window :], values=v[:, :, 1 - window :],
                                    cumulative_length=length))
        return _like(self.cache, layers=layers)


@dataclass
class _Packed:
    layout: PackedLayout
    kv: torch.Tensor  # (2, layers, rows, kv_heads, width, head_dim)
    logits: torch.Tensor
    template: _CacheTemplate


def _packed_prefill(model, prompts, capacity: int | None) -> _Packed | None:
    """The one packed forward; None for no prompts."""
    from transformers import DynamicCache

    lengths = _check_prompts(model, prompts)
    template = _CacheTemplate(model)
    window = template.smallest_window
    over = next((i for i, n in enumerate(lengths) if window is not None and n > window), None)
    if over is not None:
        raise ValueError(
            f"prompt {over} has {lengths[over]} tokens, over the model's sliding window of "
            f"{window}: packed masks do not apply the window, so prompts must fit in it"
        )
    if not lengths:
        return None
    layout = packed_layout(model, lengths, capacity)
    inputs = packed_inputs(model, prompts, layout)
    buffer = _KVBuffer(template.num_layers)
    layer_class = _buffer_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_class(buffer, i) for i in range(template.num_layers)]
    hidden = model.base_model(**inputs, past_key_values=cache, use_cache=True).last_hidden_state
    rows, starts, lengths = _placement(layout)
    last_hidden = hidden[rows.to(hidden.device), (starts + lengths - 1).to(hidden.device)]
    logits = model.get_output_embeddings()(last_hidden).float()
    return _Packed(layout, buffer.kv, logits, template)


@torch.inference_mode()
def prefill(model, prompts: Sequence[Sequence[int]], capacity: int | None = None) -> PrefillResult:
    """One packed forward over all prompts: per-prompt KV caches and last-token logits.

    capacity: tokens per packed row (default: the longest prompt, as in the paper). Ignored by
    varlen implementations (flash-attention, prepack_varlen): one unpadded row holds everything.
    Each prompt's cache holds views into the packed forward's one KV buffer (no copy).
    """
    packed = _packed_prefill(model, prompts, capacity)
    if packed is None:
        return PrefillResult([], torch.empty(0, model.config.vocab_size),
                             PackedLayout.build([], capacity))
    layout, caches = packed.layout, []
    for i, n in enumerate(layout.lengths):
        row, start = layout.place[i]
        own = packed.kv[:, :, row : row + 1, :, start : start + n]
        caches.append(packed.template.build(own[0].unbind(0), own[1].unbind(0), n))
    return PrefillResult(caches, packed.logits, layout)


def _batch_cache(packed: _Packed):
    """The left-padded batch cache decoding needs, gathered from the packed KV in one indexing.

    Pad slots repeat a prompt's first entry: they are masked out, and finite."""
    kv = packed.kv
    rows, starts, lengths = _placement(packed.layout)
    width = int(lengths.max())
    index = (torch.arange(width)[None, :] - width + lengths[:, None]).clamp(min=0)
    rows = rows[:, None].expand(-1, width)
    cols = starts[:, None] + index
    batch = kv[:, :, rows.to(kv.device), :, cols.to(kv.device)]  # (prompts, width, 2, layers, heads, dim)
    batch = batch.permute(2, 3, 0, 4, 1, 5)  # (2, layers, prompts, heads, width, dim)
    return packed.template.build(batch[0].unbind(0), batch[1].unbind(0), width)


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    capacity: int | None = None,
) -> list[list[int]]:
    """Greedy generation: packed prefill, then batched decoding with a left-padded cache.

    Returns the new token ids per prompt, in input order, each ending at its first EOS (EOS
    included), like per-prompt ``model.generate(..., do_sample=False)``.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    packed = _packed_prefill(model, prompts, capacity)
    if packed is None:
        return []
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    eos = torch.tensor(
        [] if eos_token_id is None else
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=model.device,
    )
    lengths = list(packed.layout.lengths)
    tokens = packed.logits.argmax(-1).to(model.device)
    cache = _batch_cache(packed) if max_new_tokens > 1 else None
    del packed  # the batch cache is a copy: free the packed KV before decoding
    width = max(lengths)
    n = len(lengths)
    length = torch.tensor(lengths, device=model.device)
    mask = (torch.arange(width, device=model.device)[None, :] >= (width - length)[:, None]).long()
    out = [tokens]
    done = torch.isin(tokens, eos)
    for step in range(1, max_new_tokens):
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=(length + step - 1)[:, None],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        tokens = logits.argmax(-1)
        out.append(tokens)
        done |= torch.isin(tokens, eos)
    generated = torch.stack(out, dim=1).tolist()
    eos_ids = set(eos.tolist())
    results = []
    for row in generated:
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:cut])
    return results
