"""vllm-prepack: prefill packing for vLLM, and prepacked prefill for HF transformers.

``vllm_prepack.PrepackScheduler`` is loaded lazily, so the packing core (``vllm_prepack.packing``)
and the HF path (``vllm_prepack.hf``) import where vLLM is not installed.
"""

__version__ = "0.1.0"

_LAZY = {
    "PrepackScheduler": "vllm_prepack.scheduler",
    "PrepackAsyncScheduler": "vllm_prepack.scheduler",
    "PrepackConfig": "vllm_prepack.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vllm_prepack' has no attribute {name!r}")
