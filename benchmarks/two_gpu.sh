#!/usr/bin/env bash
# The two-GPU measurements (device kind nvidia-h200-x2), in device calls of at most 10 minutes. Run a part again
# until it prints "done": each resumes where the last call stopped (launch_matrix.py --keep) and stops itself
# before the call limit (PART_SECONDS, default 540), killing its launches.
#
#   bash benchmarks/two_gpu.sh OUT random   # SFT + DPO, random-weights Llama-3.2-1B shape, random tokens: every
#                                           # config on 2 GPUs + one-GPU references with the same global batch
#   bash benchmarks/two_gpu.sh OUT real     # SmolLM2-135M-Instruct (.cache/models, `make smollm2` or
#                                           # benchmarks/gpu_setup.sh): SFT + DPO under DDP, ZeRO-3 and FSDP2
#   bash benchmarks/two_gpu.sh OUT pack     # OUT/two_gpu.tgz: the tables, JSON and logs (no weights)
#
# FRESH=1 runs every random-weights run again (default: keep those of benchmarks/results/two_gpu_h200x2_random_1b);
# RERUN=fsdp,fsdp_qlora keeps all but those configs.
# TOKENIZER (default .cache/tok): a tokenizer dir with a chat template for the random model, e.g.
#   python -c "from align.testing import load_test_tokenizer as t; t().save_pretrained('.cache/tok')"
set -u
OUT=${1:?usage: two_gpu.sh OUT random|real|pack}
PART=${2:?usage: two_gpu.sh OUT random|real|pack}
LIMIT=${PART_SECONDS:-540}
PY=${PYTHON:-python3}
# NVLink multicast stays off on shared multi-GPU hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ALL=single_gpu,single_gpu_qlora,multi_gpu,deepspeed_zero2,deepspeed_zero3,deepspeed_zero3_qlora,fsdp,fsdp_qlora
mkdir -p "$OUT"
case $PART in
  random)
    # runs already measured and committed (same seeds, so the same random model and data) are kept: only the rest run
    SEED=benchmarks/results/two_gpu_h200x2_random_1b/launch_matrix.json
    if [ -z "${FRESH:-}" ] && [ -f "$SEED" ] && [ ! -f "$OUT/random_1b/launch_matrix.json" ]; then
      mkdir -p "$OUT/random_1b"
      # RERUN=config,config: measure those configs again (e.g. after a fix that changes them)
      $PY -c "import json, sys; d = json.load(open(sys.argv[1])); again = set(sys.argv[3].split(','))
d['runs'] = [r for r in d['runs'] if r['config'] not in again]; json.dump(d, open(sys.argv[2], 'w'), indent=2)" \
        "$SEED" "$OUT/random_1b/launch_matrix.json" "${RERUN:-}"
    fi
    timeout "$LIMIT" $PY benchmarks/launch_matrix.py --out "$OUT/random_1b" --num_processes 2 --parallel 1 --keep \
      --random_model 1b --random_data 512:1024 --tokenizer "${TOKENIZER:-.cache/tok}" --stages sft,dpo \
      --configs "$ALL" --timeout 400 -- --max_length 1024
    rc=$? ;;
  real)
    timeout "$LIMIT" $PY benchmarks/launch_matrix.py --out "$OUT/smollm2" --num_processes 2 --parallel 1 --keep \
      --stages sft,dpo --configs single_gpu,multi_gpu,deepspeed_zero3,fsdp --timeout 400
    rc=$? ;;
  pack)
    cd "$OUT" && tar czf two_gpu.tgz $(find . \( -name '*.json' -o -name '*.md' -o -name '*.log' \) \
      -not -path '*checkpoint*' -not -path '*/_model*' -size -5M)
    exit $? ;;
  *) echo "unknown part $PART: random, real or pack"; exit 2 ;;
esac
# launch_matrix exits 0 when every run passed, 1 when one failed (see its table), 124 when the time was up
if [ "$rc" = 124 ] || [ "$rc" = 143 ]; then echo "$PART: not done (time limit), run it again"; else echo "$PART: done (exit $rc)"; fi
exit 0
