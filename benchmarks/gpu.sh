#!/usr/bin/env bash
# The GPU session's checks in one script, for the device machine (see ../shared/GPU.md): run from the repo root
# with the pinned wheels in .gpu/whl; every result lands in $OUT (default /tmp/out) as soon as it exists.
#   bash benchmarks/gpu.sh            # suite, then the end-to-end benchmark, then make bench's GPU rows
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -n 12 -x tests > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
timeout 420 python3 benchmarks/e2e.py --out "$OUT" ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1
timeout 240 python3 benchmarks/run.py --out "$OUT" --skip_flux > "$OUT/bench.log" 2>&1
timeout 300 python3 benchmarks/fsdp_memory.py --out "$OUT" > "$OUT/fsdp_memory.log" 2>&1  # --fsdp's GPU memory
timeout 180 python3 benchmarks/checkpoint_stall.py --out "$OUT" > "$OUT/checkpoint_stall.log" 2>&1
cp benchmarks/results/*.md "$OUT/" 2>/dev/null
exit 0
