#!/usr/bin/env bash
# Everything a lent GPU should run, in one go (see issue #6): the kernel tests on the full grid
# (real CUDA graph captures included), the kernel micro-benchmark with the decode-step comparison,
# and the engine-vs-PEFT check on the row pool and on the unified pool (Triton reading adapter blocks
# inside the KV cache). Each part has its own time limit so one slow part cannot eat the others'
# time; results land in ${OUT:-gpu_results}.
#   bash benchmarks/gpu_session.sh            (on the device: OUT is set by the device tool)
# The GPU machine has torch, triton, transformers, peft and grpcio but maybe not pytest, and no
# network: prepare pytest here with `pip install --target .gpu_deps pytest` and carry .gpu_deps.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/server:$PWD/client:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import pytest" 2>/dev/null && [ -d .gpu_deps ]; then
  export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_deps"  # appended: the machine's own packages win
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/device.txt"
timeout 200 python -m pytest -q -x -p no:cacheprovider tests/kernels 2>&1 | tail -25 | tee "$OUT/kernel_tests.txt"
timeout 240 python benchmarks/kernel_bench.py --presets llama-3-8b --batches 1 16 64 --steps 16 \
  --json "$OUT/kernel_bench.json" 2>&1 | tee "$OUT/kernel_bench.md" | tail -60
timeout 150 python benchmarks/gpu_check.py --out "$OUT" --presets smollm2-135m 2>&1 | tail -40  # both memory pools
