"""The ``vllm.general_plugins`` entry point: vLLM calls it in every process it starts.

It must be cheap, re-entrant (called again in each worker, possibly twice in one process) and
harmless to plain vLLM, which loads it too when vllm-prepack is merely installed: it never
raises. On a supported vLLM it installs the model-runner layout hook
(``patches/runner_layout.py``), inert unless ``record_layout`` is set; on another release it
only warns (the scheduler refuses to start there, naming the supported range).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_prepack")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_prepack.touchpoints import UnsupportedVLLM, check_vllm_version

    try:
        check_vllm_version()
    except UnsupportedVLLM as e:
        logger.warning("%s (the model-runner hook is not installed)", e)
        return
    from vllm_prepack._patches import runner_layout

    try:
        runner_layout.install()
    except Exception as e:  # plain vLLM loads this plugin too: never fail its start
        logger.warning("vllm-prepack's model-runner layout hook is not installed: %r", e)
