#!/usr/bin/env bash
# The GPU checks (issue 15), as one script for a machine with a CUDA device; CI never runs it. Results go to
# $OUT (default runs/gpu): the `gpu` tests (every experts implementation against auto in fp32/bf16 and a bf16
# training step of an upcycled model; the plug-ins in bf16), the MoE block under grouped_mm against dense k*T,
# and GPU memory of a bf16 FSDP2 step and of writing its output, streamed and gathered (bench/gpu_memory.py).
# Estimated 5-10 minutes on one H200 (not yet run: no session of this project has been lent a GPU).
#
#   make gpu-wheels                 # here: the pinned wheels a bare GPU image may lack, into .whl/
#   bash bench/gpu_checks.sh        # there, from the repository root (installs .whl/ first when present)
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# moekit and its built-in plug-ins (the entry points) without touching the image's torch
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
status=0
echo "== gpu tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_moe_gpu.py tests/test_plugins_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
echo "== MoE block on CUDA (grouped_mm is auto's choice there)"
$PY bench/moe_block.py --device cuda --dtype bf16 fp32 --impls eager grouped_mm --tokens 512 2048 4096 8192 \
  --repeats 7 --json "$OUT/moe_block_cuda.json" 2>&1 | tee "$OUT/moe_block_cuda.txt" || status=1
echo "== GPU memory of a bf16 FSDP2 step"
$PY bench/gpu_memory.py --json "$OUT/gpu_memory.json" 2>&1 | tee "$OUT/gpu_memory.txt" || status=1
exit $status
