#!/usr/bin/env bash
# Every GPU check and benchmark in one command (run from the repo root on a CUDA machine):
#   bash bench/gpu_all.sh            # results and logs under bench/results/ (or $OUT if set)
# Uses the machine's own torch/triton/transformers with fastdebias from this tree; runs the `gpu`-marked
# tests, then the kernel benchmarks. Each stage is bounded so the whole run fits in about 9 minutes.
set -u
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# No install needed: the source tree imports as is (fastdebias/kernels is a symlink to kernels/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" | tee "$OUT/gpu_env_$dev.txt"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
timeout 150 python3 -m pytest -q -p no:warnings -m gpu $XDIST tests/ 2>&1 | tee "$OUT/gpu_tests_$dev.log" | tail -25
timeout 120 python3 bench/bench_lora.py --out "$OUT" 2>&1 | tail -5
if [ -f bench/bench_logits.py ]; then timeout 100 python3 bench/bench_logits.py --out "$OUT" 2>&1 | tail -5; fi
ls -la "$OUT"
