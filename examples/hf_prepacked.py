"""Prepacked prefill with HF transformers (no vLLM needed).

Run: python examples/hf_prepacked.py [MODEL_DIR]   (default: the embedded tiny random model)
On a GPU without the flash-attn package, prefer attn_implementation=hf.register_varlen_attention().
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_prepack import hf


def main(model_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    prompts = [tok(t)["input_ids"] for t in ["Hi", "A much longer prompt " * 20, "Hello there"]]
    caches, logits = hf.prefill(model, prompts)  # one packed forward, per-prompt KV caches
    print([c.get_seq_length() for c in caches], logits.shape)
    for ids in hf.generate(model, prompts, max_new_tokens=16):
        print(repr(tok.decode(ids)))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        from vllm_prepack.models import decoder_model

        main(str(decoder_model()))
