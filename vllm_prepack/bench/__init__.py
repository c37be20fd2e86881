"""Benchmarks (``vllm-prepack bench ...``): every figure is a ratio against a baseline measured
side by side in the same run, printed with the command, the machine and the date."""
