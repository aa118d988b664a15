#!/usr/bin/env bash
# Full-size quality run of every stage on SmolLM2-135M-Instruct (one GPU), then the evaluation report.
#
#   bash benchmarks/quality_run.sh OUT [train|align|dpo|ppo|eval ...]      (default: train align eval)
#
# train: SFT LoRA, SFT QLoRA, SFT full fine-tune (fp32 master weights) and the reward model, side by side on one GPU
# align: DPO LoRA (from SFT LoRA), DPO QLoRA (from SFT QLoRA), PPO LoRA (from SFT LoRA, reward = the RM adapter)
# eval:  base (and the base in 4-bit NF4 when QLoRA ran) and every tuned model on recipes/eval/general_full.yaml, held-out preference accuracy on the DPO
#        held-out pairs, win rate against the base judged by the reward model; report.md/html and results.json
# The stages of a phase are independent processes (a 135M model leaves the GPU mostly idle: overhead-bound), each
# with its log in OUT/logs/. STAGE_ARGS (e.g. "--max_steps 2") is appended to the SFT, RM and DPO stages (a smoke
# run), PPO_ARGS to PPO (its own keys: no max_length or eval batch size), EVAL_ARGS to the evaluation.
# Summary: OUT/stages.json (benchmarks/collect_runs.py).
set -u
OUT=${1:?usage: quality_run.sh OUT [train|align|dpo|ppo|eval ...]}
shift
PHASES=${*:-train align eval}
MODEL=${MODEL:-.cache/models/SmolLM2-135M-Instruct}
STAGE_ARGS=${STAGE_ARGS:-}
# PPO on a 135M model is bound by per-call overhead (PEFT's LoRA layers in Python, token-by-token generation):
# 16 rollouts in mini-batches of 4 ran at 15-18 s/step on an H100 shared with the other stages; fewer, larger
# calls here.
PPO_ARGS=${PPO_ARGS:---max_steps 24 --save_steps 24 --per_device_train_batch_size 32 --mini_batch_size 16 --max_new_tokens 64 --eval_split_size 64}
EVAL_ARGS=${EVAL_ARGS:-}
PY=${PYTHON:-python3}
# several processes share the machine's cores: without a cap each starts one thread per core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + 3) / 4 ))}
mkdir -p "$OUT/logs"
status=0

stage() {  # stage NAME SCRIPT RECIPE [ARGS...]: one stage in the background, its log in OUT/logs/NAME.log
  local name=$1 script=$2 recipe=$3
  shift 3
  echo "[$(date +%T)] start $name"
  ( $PY -m accelerate.commands.launch --num_processes 1 align/$script --config recipes/smollm2/$recipe \
      --model_name_or_path "$MODEL" --output_dir "$OUT/$name" --report_to tensorboard "$@" $STAGE_ARGS \
      > "$OUT/logs/$name.log" 2>&1; echo $? > "$OUT/logs/$name.rc" ) &
}

finish() {  # wait for the phase; report each stage's exit status and the tail of a failed one's log
  wait
  for rc in "$OUT"/logs/*.rc; do
    name=$(basename "$rc" .rc)
    if [ "$(cat "$rc")" != 0 ]; then
      echo "FAILED $name (exit $(cat "$rc")):"; tail -n 25 "$OUT/logs/$name.log"; status=1
    fi
  done
  echo "[$(date +%T)] phase done"
}

for phase in $PHASES; do
  case $phase in
  train)
    stage sft_lora sft.py sft_lora.yaml
    stage sft_qlora sft.py sft_qlora.yaml
    stage sft_full sft.py sft_full.yaml
    stage rm rm.py rm_lora.yaml
    finish ;;
  align|dpo|ppo)
    if [ "$phase" != ppo ]; then
      stage dpo_lora dpo.py dpo_lora.yaml --sft_adapter "$OUT/sft_lora"
      stage dpo_qlora dpo.py dpo_qlora.yaml --sft_adapter "$OUT/sft_qlora"
    fi
    if [ "$phase" != dpo ]; then
      STAGE_ARGS="$PPO_ARGS" stage ppo ppo.py ppo_lora.yaml --sft_adapter "$OUT/sft_lora" --reward_adapter "$OUT/rm"
    fi
    finish ;;
  eval)
    echo "[$(date +%T)] start eval"
    models=""
    for m in sft_lora sft_qlora sft_full dpo_lora dpo_qlora ppo; do
      [ -f "$OUT/$m/run.json" ] && models="$models ${m/sft_full/full}=$OUT/$m"
    done
    # QLoRA adapters sit on a 4-bit base: score that base too, to tell quantization loss from forgetting
    [ -f "$OUT/sft_qlora/run.json" ] && models="$models base_nf4=$MODEL@4bit"
    common=(--suite recipes/eval/general_full.yaml --preference_data "$OUT/dpo_lora/heldout_pairs.jsonl"
            --preference_limit 200 --reward_model "$OUT/rm" --win_rate_limit 64 --dtype bfloat16 --batch_size 32)
    # The base first, then one process per tuned model side by side (generation is overhead-bound: one process
    # leaves the GPU idle), each filling the shared result cache; the last call reads every result from the
    # cache and writes the report.
    $PY align/evaluate.py --models base=$MODEL "${common[@]}" --output_dir "$OUT/report_parts/base" $EVAL_ARGS \
      > "$OUT/logs/eval_base.log" 2>&1 || status=1
    for pair in $models; do
      $PY align/evaluate.py --models base=$MODEL $pair "${common[@]}" --output_dir "$OUT/report_parts/${pair%%=*}" \
        $EVAL_ARGS > "$OUT/logs/eval_${pair%%=*}.log" 2>&1 &
    done
    wait
    $PY align/evaluate.py --models base=$MODEL $models "${common[@]}" --output_dir "$OUT/report" $EVAL_ARGS 2>&1 \
      | tee "$OUT/logs/eval.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    echo "[$(date +%T)] eval done" ;;
  *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
args=()
for m in sft_lora sft_qlora sft_full rm dpo_lora dpo_qlora ppo; do [ -d "$OUT/$m" ] && args+=("$m=$OUT/$m"); done
[ ${#args[@]} -gt 0 ] && $PY benchmarks/collect_runs.py "$OUT/stages.json" "${args[@]}"
exit $status
