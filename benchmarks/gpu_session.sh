#!/usr/bin/env bash
# One run on a GPU machine: build the CUDA extension, run the GPU tests, run the benchmarks, and
# leave logs and tables under $OUT (default /tmp/seed_fast_gpu_out).
#
#   bash benchmarks/gpu_session.sh [MODE]   # from the repository root, on the GPU machine
#
#   (none)   build, GPU tests, full benchmarks
#   quick    build, GPU tests, quick benchmarks (fewer shapes and repeats)
#   targets  build, GPU tests, the kernels' and tokenizer's benchmarks on the shapes their
#            performance targets are set on (codebook N<=8192 K=8192; attention batch 1/32/256;
#            LoRA 4096 tokens r 16; tokenizer batch 1/256; BLIP-2 Q-Former stock vs patched 1/256)
#   bench    build, full benchmarks, no tests
#   tests    build, GPU tests only
#   dispatch build, a few GPU tests, then every backend of the three ops (ours and the vendor paths)
#            on SEED's shapes, for the dispatch table (benchmarks/dispatch_table.py reads the JSON),
#            impl="auto" beside them, the tokenizer at batch 1 and 256, host cost per tiny call; about
#            8-9 minutes on an H200 (allow the whole run 590 s)
#   rest     build, the benchmarks `targets` leaves out (fp16 codebook, LLM decode), no tests
#   jobs     build, then the four end-to-end jobs at the released shapes, no tests: tokenizing
#            (seed-tokenizer-2 fp16 at batch 1 and 256, codes against an fp32 copy, compiled and FP8
#            peers), SEED-LLaMA 8B decoding (batch 1 / 8 / 32) and the unCLIP step (batch 1 / 8),
#            LoRA fine-tuning (seq 2048) against peft, bf16 / int8 / int4 memory; about 9 minutes
#            (allow 590 s; the later steps are cut first)
#   suite    build, then benchmarks/run_all.py (every benchmark, summary tables + JSON + PNG), its
#            time limits scaled to fit SUITE_BUDGET seconds (default 400); SUITE_TESTS=1 first runs
#            the regression guard and export tests
#
# Wheels the machine lacks (diffusers, for the embedded model's decoder) can be put in .wheels/
# (git-ignored): they are installed offline with --no-deps first.
#
# The machine's own python3 (with torch, triton, transformers) is used; nothing is downloaded.
# Every step is time-boxed (STEP_LIMIT_* seconds) so one slow step cannot eat the whole run, and
# everything is packed into one archive, $OUT/gpu_session.tar.gz, after each step (a run cut short
# still leaves what it did), next to session.log and summary.md.
set -u
OUT=${OUT:-/tmp/seed_fast_gpu_out}
W=${GPU_SESSION_WORK:-/tmp/seed_fast_gpu_work}
rm -rf "$W"
mkdir -p "$OUT" "$W/results"
MODE=${1:-full}
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$W/session.log"; }
pack() {
  cp "$W/session.log" "$OUT/session.log" 2>/dev/null
  tar -czf "$OUT/gpu_session.tar.gz.tmp" -C "$W" . && mv "$OUT/gpu_session.tar.gz.tmp" "$OUT/gpu_session.tar.gz"
}
step() {  # step NAME LIMIT LOGFILE CMD...
  local name=$1 limit=$2 logf=$3
  shift 3
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$W/$logf" 2>&1
  local rc=$?
  echo "$name rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$W/session.log"
  pack
  return $rc
}

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$W/session.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$W/session.log"
$PY -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$W/session.log"

if ls .wheels/*.whl >/dev/null 2>&1; then
  log "carried wheels"
  $PY -m pip install -q --no-deps --no-index .wheels/*.whl 2>&1 | tail -3 | tee -a "$W/session.log"
fi

log "build (editable install: C++ and CUDA extensions for this GPU; offline, no dependencies fetched)"
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
SEED_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
  step build "${STEP_LIMIT_BUILD:-300}" build.log $PY -m pip install --no-deps --no-build-isolation --no-index -e .
tail -3 "$W/build.log"
$PY -m seed_fast.info 2>&1 | tee -a "$W/session.log"

if [ "$MODE" = "suite" ] && [ -n "${SUITE_TESTS:-}" ]; then
  log "regression guard and export tests"
  step tests "${STEP_LIMIT_TESTS:-90}" tests.log $PY -m pytest -q -rfE -p no:cacheprovider -m "not slow" \
    ${TEST_PATHS:-tests/test_fast_path_guard.py tests/export/test_onnx_export.py}
  grep -E "passed|failed|error" "$W/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -30
fi
if [ "$MODE" = "suite" ]; then
  DEV=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); from common import device_name; print(device_name('cuda'))")
  log "benchmarks/run_all.py (budget ${SUITE_BUDGET:-400} s)"
  step suite "$(( ${SUITE_BUDGET:-400} + 60 ))" suite.log $PY benchmarks/run_all.py --device cuda --budget "${SUITE_BUDGET:-400}" \
    --out "$W/results/$DEV"
  tail -25 "$W/suite.log" | tee -a "$W/session.log"
  cp "$W/results/$DEV/summary.md" "$OUT/summary_suite.md" 2>/dev/null
  cp "$W/results/$DEV/summary.png" "$OUT/summary.png" 2>/dev/null
  pack
  exit 0
fi

if [ "$MODE" = "dispatch" ]; then
  TEST_PATHS=${TEST_PATHS:-"tests/ops/test_dispatch.py tests/test_fast_path_guard.py tests/ops/test_codebook_lookup.py \
    tests/ops/test_qformer_attention.py::test_one_launch_backward_equals_the_two_kernel_backward \
    tests/models/test_fast_path.py::test_default_encode_replays_a_graph_from_the_second_call \
    tests/models/test_fast_path.py::test_a_failed_capture_warns_once_and_runs_eagerly \
    tests/models/test_fast_path.py::test_cuda_graph_replay_matches_eager \
    tests/test_build.py::test_cuda_tensor_core_kernels_run_on_tensor_cores \
    tests/test_build.py::test_extensions_raise_only_through_libc10"}
  STEP_LIMIT_TESTS=${STEP_LIMIT_TESTS:-150}
fi
if [ "$MODE" != "bench" ] && [ "$MODE" != "rest" ] && [ "$MODE" != "jobs" ]; then
  log "tests on the GPU"
  # TEST_PATHS narrows the run (the Triton kernels compile per shape and dtype: the whole set takes
  # minutes); -rfE lists every failure by name, --durations shows where the time went
  step tests "${STEP_LIMIT_TESTS:-240}" tests.log $PY -m pytest -q -rfE --durations=15 -p no:cacheprovider -m "not slow" \
    ${TEST_PATHS:-tests/ops tests/models/test_fast_path.py tests/models/test_llm.py tests/integrations}
  grep -E "passed|failed|error" "$W/tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -30
fi

B="$W/results"
L=${STEP_LIMIT_BENCH:-120}
if [ "$MODE" = "dispatch" ]; then
  log "every backend on SEED's shapes (dispatch table), impl='auto' beside them"
  # most wanted first: every step packs its results, so a run cut short keeps the earlier ones
  step bench_codebook_f32 40 bench_codebook_float32.log $PY benchmarks/bench_codebook_lookup.py --dtype float32 \
    --ns 1,32,1024,8192 --dims 32 --quick --out "$B"
  step bench_codebook_f16 30 bench_codebook_float16.log $PY benchmarks/bench_codebook_lookup.py --dtype float16 \
    --ns 32,8192 --dims 32 --quick --out "$B"
  step bench_tokenizer 140 bench_tokenizer.log $PY benchmarks/bench_tokenizer.py --qformer-batches 1 \
    --tokenizer-batches 1,256 --out "$B"
  step bench_attention 110 bench_attention.log $PY benchmarks/bench_qformer_attention.py --batches 1,32,256 \
    --skip "compile|eager|math|flash" --out "$B"
  step bench_lora 80 bench_lora.log $PY benchmarks/bench_lora_linear.py --dtype bfloat16 --tokens 16,4096 --ranks 16 \
    --shapes "LLaMA-7B attn" --dropout 0.05 --out "$B"
  step bench_host 25 bench_host.log $PY benchmarks/bench_host_overhead.py --device cuda --out "$B"
  step bench_blip2 40 bench_blip2.log $PY benchmarks/bench_blip2.py --device cuda --batches 1,256 --repeats 10 --out "$B"
elif [ "$MODE" = "targets" ]; then
  log "benchmarks on the target shapes"
  step bench_codebook_f32 "$L" bench_codebook_float32.log $PY benchmarks/bench_codebook_lookup.py --quick --dtype float32 --out "$B"
  step bench_attention "$L" bench_attention.log $PY benchmarks/bench_qformer_attention.py --quick --batches 1,32,256 --out "$B"
  step bench_lora "$L" bench_lora.log $PY benchmarks/bench_lora_linear.py --dtype bfloat16 --tokens 4096,16384 --ranks 16 \
    --shapes "LLaMA-7B attn,LLaMA-7B mlp up,LLaMA-7B mlp down" --dropout 0.05 --out "$B"
  step bench_tokenizer "$L" bench_tokenizer.log $PY benchmarks/bench_tokenizer.py --qformer-batches 1,256 --tokenizer-batches 1,256 --out "$B"
  step bench_blip2 "$L" bench_blip2.log $PY benchmarks/bench_blip2.py --device cuda --batches 1,256 --out "$B"
elif [ "$MODE" = "jobs" ]; then
  log "end-to-end jobs at the released shapes"
  step bench_tokenizer 150 bench_tokenizer.log $PY benchmarks/bench_tokenizer.py --qformer-batches "" \
    --tokenizer-batches 1,256 --compile default --out "$B"
  step bench_llm_decode 100 bench_llm_decode.log $PY benchmarks/bench_llm_decode.py --model llama-7b --batch 1,8,32 \
    --no-lora --out "$B"
  step bench_train_llm 90 bench_train_llm.log $PY benchmarks/bench_train_llm.py --model llama-7b --seq 2048 --out "$B"
  step bench_unclip 110 bench_unclip.log $PY benchmarks/bench_unclip.py --batches 1,8 --steps 25 --compile default \
    --repeats 2 --out "$B"
  step bench_llm_quant 80 bench_llm_quant.log $PY benchmarks/bench_llm_quant.py --model llama-7b --out "$B"
elif [ "$MODE" = "rest" ]; then
  log "benchmarks left out of targets"
  step bench_codebook_f16 "$L" bench_codebook_float16.log $PY benchmarks/bench_codebook_lookup.py --quick --dtype float16 --out "$B"
  step bench_llm_decode "$L" bench_llm_decode.log $PY benchmarks/bench_llm_decode.py --out "$B"
elif [ "$MODE" != "tests" ]; then
  log "benchmarks"
  Q=""
  [ "$MODE" = "quick" ] && Q="--quick"
  step bench_codebook_f32 "$L" bench_codebook_float32.log $PY benchmarks/bench_codebook_lookup.py $Q --dtype float32 --out "$B"
  step bench_attention "$L" bench_attention.log $PY benchmarks/bench_qformer_attention.py $Q --batches 1,32,256 --out "$B"
  step bench_lora "$L" bench_lora.log $PY benchmarks/bench_lora_linear.py $Q --dtype bfloat16 --out "$B"
  step bench_tokenizer "$L" bench_tokenizer.log $PY benchmarks/bench_tokenizer.py $Q --out "$B"
  step bench_blip2 "$L" bench_blip2.log $PY benchmarks/bench_blip2.py --device cuda --batches 1,256 --out "$B"
  step bench_codebook_f16 "$L" bench_codebook_float16.log $PY benchmarks/bench_codebook_lookup.py $Q --dtype float16 --out "$B"
  step bench_llm_decode "$L" bench_llm_decode.log $PY benchmarks/bench_llm_decode.py $Q --out "$B"
fi
log "done"
find "$W/results" -type f | sed "s|$W/||" | tee -a "$W/session.log"
# a short summary last, for a terminal or log that keeps only the end of the output
for f in "$W"/results/*/*.md; do
  [ -f "$f" ] || continue
  echo "### $(basename "$f")" >> "$W/summary.md"
  head -c 3500 "$f" >> "$W/summary.md"
  echo >> "$W/summary.md"
done
pack
cp "$W/summary.md" "$OUT/summary.md" 2>/dev/null
cat "$W/session.log" | grep -E "rc=|passed|failed" | tail -20
