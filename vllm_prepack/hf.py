"""Prepacked prefill for HF transformers causal LMs: the paper's method, done without dense masks
where the attention implementation allows it. Imports torch and transformers, never vLLM.

    caches, logits = vllm_prepack.hf.prefill(model, prompts)   # per-prompt KV caches + logits
    new_tokens = vllm_prepack.hf.generate(model, prompts, max_new_tokens=32)

Prompts are packed into rows (first-fit decreasing, the shared core in ``packing.py``); position
ids restart at every prompt, and each prompt attends only to itself:
- flash-attention implementations get varlen boundaries (``cu_seq_lens_q/k``) over one row with
  no padding at all;
- ``flex_attention`` gets a ``BlockMask`` (block-sparse: fully masked tiles are skipped);
- ``sdpa`` and ``eager`` get a 4D block-diagonal mask, rows x width x width: bool for sdpa, the
  model dtype for eager. That is the only dense mask, and its size equals what padded batching
  builds for the same rows (a padded batch of B prompts builds B x L x L); use flex for large rows.
After the one forward, each prompt's KV is a slice of the packed cache (no copy) and its
last-token logits come from the output head applied to its last hidden state only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_prepack.packing import PackedLayout

FLASH_PREFIX = "flash"


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
    if FLASH_PREFIX in impl:
        return "varlen"
    if impl == "flex_attention":
        return "flex"
    if impl in ("sdpa", "eager"):
        return impl
    raise ValueError(f"attention implementation {impl!r} is not supported for packed prefill")


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
        # all rows laid end to end as one sequence of boundaries
        inputs["input_ids"] = inputs["input_ids"].reshape(1, -1)
        inputs["position_ids"] = inputs["position_ids"].reshape(1, -1)
        cu = torch.tensor(layout.cu_seqlens(), dtype=torch.int32, device=device)
        longest = int((cu[1:] - cu[:-1]).max())
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


def _where(layout: PackedLayout, i: int, flat: bool) -> tuple[int, int]:
    """(row, start) of prompt i in the forward's input: the rows laid end to end when flat."""
    row, start = layout.place[i]
    return (0, row * layout.width + start) if flat else (row, start)


def _last_positions(layout: PackedLayout, flat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    where = [_where(layout, i, flat) for i in range(len(layout.lengths))]
    rows = [row for row, _ in where]
    cols = [start + n - 1 for (_, start), n in zip(where, layout.lengths)]
    return torch.tensor(rows), torch.tensor(cols)


@torch.inference_mode()
def prefill(model, prompts: Sequence[Sequence[int]], capacity: int | None = None) -> PrefillResult:
    """One packed forward over all prompts: per-prompt KV caches and last-token logits.

    capacity: tokens per packed row (default: the longest prompt, as in the paper). Ignored by
    flash-attention implementations, which pack everything into one unpadded row.
    """
    from transformers import DynamicCache

    lengths = _check_prompts(model, prompts)
    layout = PackedLayout.build(lengths, capacity)
    if not lengths:
        return PrefillResult([], torch.empty(0, model.config.vocab_size), layout)
    inputs = packed_inputs(model, prompts, layout)
    flat = inputs["input_ids"].shape[0] == 1 and len(layout.rows) > 1
    cache = DynamicCache(config=model.config)
    hidden = model.base_model(**inputs, past_key_values=cache, use_cache=True).last_hidden_state
    rows, cols = _last_positions(layout, flat)
    last_hidden = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    logits = model.get_output_embeddings()(last_hidden).float()
    return PrefillResult(_split_cache(model, cache, layout, flat), logits, layout)


def _layer_tensors(cache):
    for layer in cache.layers:
        yield layer.keys, layer.values


def _split_cache(model, cache, layout: PackedLayout, flat: bool) -> list:
    """Per-prompt DynamicCaches whose tensors are views into the packed cache."""
    from transformers import DynamicCache

    out = []
    for i in range(len(layout.lengths)):
        row, start = _where(layout, i, flat)
        end = start + layout.lengths[i]
        own = DynamicCache(config=model.config)
        for layer_idx, (k, v) in enumerate(_layer_tensors(cache)):
            own.update(k[row : row + 1, :, start:end], v[row : row + 1, :, start:end], layer_idx)
        out.append(own)
    return out


def _batch_cache(model, caches: list, lengths: list[int]):
    """Left-padded batch cache from per-prompt caches (a slice copy per prompt and layer)."""
    from transformers import DynamicCache

    width = max(lengths)
    batch = DynamicCache(config=model.config)
    per_prompt = [list(_layer_tensors(c)) for c in caches]
    for layer_idx in range(len(per_prompt[0])):
        k0, v0 = per_prompt[0][layer_idx]
        keys = k0.new_zeros((len(caches), k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((len(caches), v0.shape[1], width, v0.shape[3]))
        for b, layers in enumerate(per_prompt):
            k, v = layers[layer_idx]
            keys[b, :, width - k.shape[2] :] = k[0]
            values[b, :, width - v.shape[2] :] = v[0]
        batch.update(keys, values, layer_idx)
    return batch


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
    result = prefill(model, prompts, capacity)
    if not result.caches:
        return []
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    eos = torch.tensor(
        [] if eos_token_id is None else
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=model.device,
    )
    lengths = list(result.layout.lengths)
    cache = _batch_cache(model, result.caches, lengths)
    width = max(lengths)
    n = len(lengths)
    length = torch.tensor(lengths, device=model.device)
    mask = (torch.arange(width, device=model.device)[None, :] >= (width - length)[:, None]).long()
    tokens = result.logits.argmax(-1).to(model.device)
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
