#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension there, run the GPU tests, run the
# benchmarks, leave logs and tables under $OUT (the device tool brings them back).
#
#   bash benchmarks/gpu_session.sh [quick]      # run from the repository root on the GPU machine
#
# The machine's own python3 (with torch, triton, transformers) is used; nothing is downloaded.
set -u
OUT=${OUT:-/tmp/seed_fast_gpu_out}
mkdir -p "$OUT"
QUICK=${1:-}
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$OUT/session.log"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/session.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/session.log"

log "build (C++ and CUDA extensions, in place)"
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
start=$(date +%s)
SEED_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s (arch $ARCH)" | tee -a "$OUT/session.log"
tail -5 "$OUT/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -m seed_fast.info 2>&1 | tee -a "$OUT/session.log"

log "tests on the GPU"
$PY -m pytest -q -x -p no:cacheprovider -m "not slow" tests/ops tests/models/test_fast_path.py tests/models/test_llm.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/session.log"
tail -15 "$OUT/tests.log"

log "benchmarks"
B="$OUT/results"
mkdir -p "$B"
if [ "$QUICK" = "quick" ]; then
  $PY benchmarks/bench_codebook_lookup.py --quick --out "$B" > "$OUT/bench_codebook.log" 2>&1
  $PY benchmarks/bench_qformer_attention.py --quick --out "$B" > "$OUT/bench_attention.log" 2>&1
  $PY benchmarks/bench_tokenizer.py --quick --out "$B" > "$OUT/bench_tokenizer.log" 2>&1
  $PY benchmarks/bench_lora_linear.py --quick --dtype bfloat16 --out "$B" > "$OUT/bench_lora.log" 2>&1
  $PY benchmarks/bench_llm_decode.py --quick --out "$B" > "$OUT/bench_llm_decode.log" 2>&1
else
  for dt in float32 float16; do
    $PY benchmarks/bench_codebook_lookup.py --dtype $dt --out "$B" > "$OUT/bench_codebook_$dt.log" 2>&1
  done
  $PY benchmarks/bench_qformer_attention.py --out "$B" > "$OUT/bench_attention.log" 2>&1
  $PY benchmarks/bench_tokenizer.py --out "$B" > "$OUT/bench_tokenizer.log" 2>&1
  $PY benchmarks/bench_lora_linear.py --dtype bfloat16 --out "$B" > "$OUT/bench_lora.log" 2>&1
  $PY benchmarks/bench_llm_decode.py --out "$B" > "$OUT/bench_llm_decode.log" 2>&1
fi
log "done; tables in $B"
ls -la "$B" | tee -a "$OUT/session.log"
