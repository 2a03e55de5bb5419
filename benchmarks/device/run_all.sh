#!/usr/bin/env bash
# Everything the GPU machine must check and measure, in one call (it has no package registry and
# ~15 minutes of device time per session). Stage the wheels here first, then make the device calls
# that ../shared/device/stage-wheels.sh prints, with this as YOUR_COMMAND:
#
#   ../shared/device/stage-wheels.sh onnxruntime-gpu==1.31.1 onnxruntime-genai-cuda==0.18.0 bitsandbytes==0.50.2
#   ... && bash benchmarks/device/run_all.sh
#
# Writes to $OUT: gpu_tests.log, bench-*.{json,md,png} (the suite's table), bench.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
# the phi3v_edge namespace without pip install (no registry there): link the user's folders into it
mkdir -p /tmp/pkg/phi3v_edge
for d in models export runtime benchmarks; do ln -sfn "$PWD/$d" "/tmp/pkg/phi3v_edge/$d"; done
export PYTHONPATH=/tmp/pkg:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$OUT/device.txt"
# 1. correctness on the GPU: CUDA-graph decode == plain decode, GPU == CPU, LongRoPE under replay
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
# 2. the suite: full-size random-weight checkpoint, INT4 + fp16 bundles, every system in its own process
timeout 900 python3 -m phi3v_edge.benchmarks.suite --workdir /tmp/p3v --results-dir "$OUT" --runs 3 2>&1 | tee "$OUT/bench.log"
