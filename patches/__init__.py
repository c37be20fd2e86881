"""Patches of vLLM internals, each unavoidable and isolated; installed as ``vllm_prepack._patches``.

Every module here opens with a header: why, which vLLM versions, how it is tested, how to remove it.
"""
