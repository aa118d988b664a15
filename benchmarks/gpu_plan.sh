#!/usr/bin/env bash
# The next GPU session's measurements for issue 6, one device call each (each sized to fit 10 minutes on one
# H100 / H200), results under $OUT/<call>/:
#
#   source benchmarks/gpu_setup.sh && bash benchmarks/gpu_plan.sh CALL
#
# carrying .whl (bash ../shared/tools/gpu-wheels.sh) and .cache/test-tokenizer (benchmarks/README.md). Then merge
# each call's throughput JSON into benchmarks/results/throughput_<gpu>.json with `throughput.py --merge`.
#
#   fp8_a    first the GPU tests of the FP8 / NF4 paths (their compiled tests failed in calls 18 and 19 from a torch
#            2.11 bug now avoided, fp8.cast; the whole output kept in tests.txt), then fp8 against stock and auto:
#            1B DPO and 1B SFT LoRA (results are written after every run: a call cut short keeps what it measured)
#   fp8_b    the same for 8B SFT LoRA and 8B DPO LoRA (the 70% case with fp8)
#   fp8_c    the same for 8B SFT QLoRA and 1B SFT QLoRA, and FP8 against bf16 on SmolLM2 (needs the model)
#   fp8_quality  what `fp8` does to a real model's training (needs the SmolLM2 model: carry .gguf/a, b and c in
#            three calls first): the demo SFT and DPO stages with `auto` and `auto,fp8` (stage_speedups.py), and
#            fp8_numerics.py (bf16 against FP8: losses, KL, first-step LoRA gradient cosines)
#   rest     the cases with no H100 row yet (call19 ran the others there): 1B reward model on fixed-length pairs, and
#            1B DPO, reward model and SFT LoRA on real-length data, stock and auto in the same call
#   memory   what holds the 1B SFT and DPO peaks (allocator history of one step), DPO with and without ref_first
#   host     the 1B layer count at tiny widths: steps the GPU finishes at once, so tokens/s is the host's rate
#            (Python, dispatch, launches) for stock and align: how much of a 1B step the host could hide; and align
#            with inductor's C++ wrapper (kernel launches from C++ instead of Python)
#   host_1b  1B SFT LoRA, stock / align / align with the C++ wrapper / with combo kernels, then 2 profiled steps
#            each (GPU busy and idle time per step)
#   host_cg  1B SFT LoRA with one compiled graph per layer, without and with CUDA graphs (call18's cudagraphs ran
#            0.13x-0.30x with the one graph all layers share: a recording per parameter set, re-recorded per layer?)
#            (host, host_1b, host_cg, fp8_quality and memory ran in call21; the 1B step is the GPU's)
#   profile  align's 1B SFT, 1B DPO and 8B SFT LoRA steps, 2 profiled steps each: kernel time by category, the
#            kernels to cut next (lean's recompute, device-to-device copies, casting norm reductions)
#   budget   what lean's recompute costs the 1B steps (call21: GEMM 79.9 ms a step against stock's 71.2, cuDNN's
#            attention forward twice a layer): SFT at lean budgets 0.5 (auto) / 0.55 / 0.65 / 0.8 / 1.0 (on the
#            CPU, benchmarks/lean_recompute.py: at 0.5 the layer recomputes 4 GEMMs and attention, at 0.65 only
#            attention, at 0.8 neither), and with the partitioner's profiling runtime estimator (it benchmarks each op
#            instead of counting flops) at 0.5; DPO at 0.2 (auto) / 0.3 / 0.2 profiled. All profiled: GPU busy ms a step is steadier than tokens/s.
#            Then one SFT step profiled with stacks: the code behind the device copies and fills
#   accumulate  the compiled layers' LoRA accumulate as one op (`align.fused_lora.COMPILED_ACCUMULATE`): 'op' (no copy
#            of the base output before the addmm; call22's stack profile: 105 copies, 3.6 ms of a 1B SFT step) and
#            'op_ab' (the whole LoRA layer one op: the LoRA product first, the base GEMM accumulating into it with
#            beta 1, and the input gradient likewise) at lean budgets 0.5 and 0.8 against addmm (the former auto) at
#            0.5 and 0.8, and op_ab at 0.6: 1B SFT and 8B SFT (0.5, 0.6) beside stock and auto (ran as call23, when
#            auto was addmm at 0.5; auto is now op_ab at 0.58)
#   accumulate_dpo  the same for 1B DPO (0.2 and 0.3; auto is op_ab at 0.2) and 8B SFT at 0.8
#   accumulate_1b  the short form (a few minutes of device time left): 1B SFT at budget 0.8, addmm against both ops
#   dropout  LoRA dropout 0.05, as every shipped recipe has (the cases have none): 1B and 8B SFT, stock, align
#            and align_b (addmm); DPO and the reward model train without dropout (TRL's disable_dropout). Then 1B SFT
#            auto without dropout. Ran as call24a/b while auto tried the whole-layer op with dropout (it did not pay;
#            auto now takes addmm with dropout, so align and align_b are the same there)
#   rows     every fixed-length LoRA row with today's auto, stock beside it: 1B SFT, DPO and reward model, 8B SFT and
#            DPO (on an H200 it refreshes rows measured with the former auto; on an H100 it is a second sample)
#   gaps     where a 1B / 8B SFT step's time beyond its kernels goes (call23: 118.5 ms a 1B step holding 109.2 ms of
#            kernels): stock and auto with 2 profiled steps, each recording the GPU's span, its idle gaps, the short
#            gaps between back-to-back kernels and the kernels per step (profile_gaps.analyze)
#   gaps_nb  gaps for 1B SFT with `non_blocking` beside stock and auto, one stack-profiled align step (the frames
#            behind each idle gap), then 8B SFT the same way
#   rows_nb  1B DPO, 1B reward model and 8B DPO (fixed length), stock and auto with non_blocking (auto's since call26)
#   qlora_nb 1B and 8B SFT QLoRA likewise
#   gemm     every base GEMM of a 1B / 8B LoRA step timed alone (cuBLAS), and a square GEMM: the floor under a step
#   dpo_steps 8B and 1B DPO, stock and auto, per-step losses (call27c: auto's first loss 0.5718 at 8B, not log 2)
#   head     1B SFT, 1B DPO and 8B SFT with head_grad on auto (the head alone 1.30x / 1.43x on an H200, call17's whole
#            steps within the spread, before auto's later changes)
#   refbits  the compiled 4-layer 8B-shape model's reference forward (adapters off) against its policy forward at
#            B = 0, bit for bit, twice in fresh processes and with inductor's deterministic mode (DPO's first loss)
#   autotune 1B SFT with fused LoRA's addmm (its rank-16 GEMMs in the compiled graph, where they run at about 40% of
#            the memory bandwidth as cuBLAS calls) with and without inductor's GEMM autotuning (Triton templates)
#   forms    each linear layer's LoRA GEMMs timed alone: the base GEMMs, fused LoRA's op as auto runs it, and LoRA
#            folded into the base GEMM's inner dimension ([x | h] @ [W | B].T): what the fold would save a step
#   firstloss  DPO's first loss at 8B (Call28: log 2 whenever step 1's forwards are recorded, 0.57-0.73 in 12-step
#            runs without): 12-step runs with the light recorder (`--step_bits light`: only the packed ids and the
#            log-probabilities of step 1's two forwards), twice, then once without any recorder, then with every new
#            tensor's memory filled with NaN (`--fill_uninitialized`: a kernel reading memory it did not write);
#            then the step traced without fused_lora (Call28: reference and policy apart from layer 0 there)
#   group    `group_lora` (q/k/v and gate/up LoRA layers as one op each, align/grouped_lora.py; experimental, built
#            before any GPU measurement): the grouping's GEMMs alone (lora_gemm_forms.py), then 1B SFT, 1B DPO and 8B
#            SFT with auto and auto,group_lora (tokens/s, peak, losses)
#   headline_1b / headline_8b / headline_qlora  every fixed-length row against stock with today's auto (group_lora
#            and head_grad in since Call30), lean budget 0.8 beside 1B SFT and 0.3 beside DPO (DPO / SFT peak goal 1.1;
#            1B SFT at 0.8 stays under 0.6x stock's peak), head_grad beside 1B SFT QLoRA
#   budget_8b  8B SFT at lean budgets 0.8 and 1.0 beside stock and auto: the 8B share of the limit with no recompute
#   dpo_attention  DPO's shared-prompt attention alone in align's flash-varlen form and stock's dense layout through
#            cuDNN / flash / efficient SDPA (the 1B DPO step's attention ran at ~2/3 of SFT's cuDNN rate, call23),
#            then 1B and 8B DPO steps with the dense form (packed_attention.DENSE_PAIRS) beside auto and stock
#            (run in Call32, then at dab9a77 `dpo_gqa`: the same with the key heads through enable_gqa, a switch
#            since folded into the option dense_pairs, which auto has)
#   dense_check  dense_pairs as committed after Call32: its GPU test, then 1B RM with it (not in RM's auto yet) and
#            1B DPO auto against auto less dense_pairs
#   offload / offload_dpo / offload_all / offload2 / offload2_min  activation offload (the opt-in option `offload`):
#            see the cases below (offload_all ran as Call33; offload2 is next, with the JSONs copied out of
#            $OUT/r/offload2/* into $OUT/j by the device command, as more than two folders deep do not come back)
#   memory_8b  what holds the 8B SFT LoRA peak (allocator history of one step) at auto's budget 0.58 and at 0.6-0.7, which
#            ran at 67% of the arithmetic limit but 0.62x of stock's peak (call23): what would have to go for 0.6 to
#            fit the 0.6x goal
#   rm_auto  the 1B reward model on fixed-length pairs, stock and auto (last measured before the whole-layer op)
#   budget2  the same SFT budgets at 8B beside stock (8B SFT LoRA is at 0.58x stock's peak, goal 0.6x: how much
#            budget it can take), then the 1B SFT budgets once more (a second sample of each: runs spread ~5%)
set -eu
CALL=${1:?usage: gpu_plan.sh fp8_a|fp8_b|fp8_c|fp8_quality|rest|memory|host|host_1b|host_cg|profile|budget|budget2|accumulate|accumulate_dpo|accumulate_1b|dropout|rm_auto|rows|gaps|gaps_nb|rows_nb|qlora_nb|gemm|refbits|dpo_steps|firstloss|group|head|headline_1b|headline_8b|headline_qlora|budget_8b|dpo_attention|autotune|forms|memory_8b|dense_check|offload|offload_dpo|offload_all|offload2|offload2_min|passes|passes_min}
OUT=${OUT:-/tmp/out}/$CALL
PY=${PYTHON:-python3}
W="--steps 8 --warmup 3 --timing window"
FP8="fp8=auto,fp8"
CPP="cpp=auto!cpp_wrapper=True"  # inductor's C++ wrapper: the compiled layers launch their kernels from C++
COMBO="combo=auto!combo_kernels=True"  # inductor fuses independent small kernels (LoRA casts) into one launch
NOINLINE="noinline=auto!dynamo.inline_inbuilt_nn_modules=False"  # one compiled graph per layer (guarded by module)
EST="functorch.activation_memory_budget_runtime_estimator='profile'"
BUDGETS="b55=auto@0.55;b65=auto@0.65;b8=auto@0.8;b10=auto@1.0;p5=auto!$EST"
OP="align.fused_lora.COMPILED_ACCUMULATE='op'"
AB="align.fused_lora.COMPILED_ACCUMULATE='op_ab'"
ADDMM="align.fused_lora.COMPILED_ACCUMULATE='addmm'"  # the former auto (op_ab is auto's since call23)
# op_ab at 0.6 saves what addmm saves at 0.5 (305 MiB a 1B layer) but recomputes 2 of its ops, not 4 (lean_recompute.py)
OPS="b5=auto@0.5!$ADDMM;o5=auto@0.5!$OP;a5=auto@0.5!$AB;a6=auto@0.6!$AB;b8=auto@0.8!$ADDMM;o8=auto@0.8!$OP;a8=auto@0.8!$AB"
CG="cg=auto!dynamo.inline_inbuilt_nn_modules=False,triton.cudagraphs=True"  # and each replayed as a CUDA graph
mkdir -p "$OUT"
case $CALL in
  fp8_a)
    $PY -m pytest -q -p no:logging tests/test_fp8.py tests/test_nf4.py > "$OUT/tests.txt" 2>&1 || true
    tail -4 "$OUT/tests.txt"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora,1b:sft_lora --paths stock,align --align_variants "$FP8" $W \
        --timeout 150 --out "$OUT" ;;
  fp8_b)
    $PY benchmarks/throughput.py --runs 8b:sft_lora,8b:dpo_lora --paths stock,align --align_variants "$FP8" $W \
        --timeout 150 --out "$OUT" ;;
  fp8_c)
    $PY benchmarks/throughput.py --runs 8b:sft_qlora,1b:sft_qlora --paths stock,align --align_variants "$FP8" $W \
        --timeout 150 --out "$OUT"
    [ -d .cache/models/SmolLM2-135M-Instruct ] && $PY benchmarks/fp8_numerics.py --out "$OUT/fp8_numerics.json" ;;
  fp8_quality)
    [ -d .cache/models/SmolLM2-135M-Instruct ] || { echo "no SmolLM2 model: carry .gguf/a, b, c first" >&2; exit 2; }
    $PY benchmarks/stage_speedups.py --runs "sft:auto|sft:auto,fp8|dpo:auto|dpo:auto,fp8" --workdir /tmp/ss \
        --out "$OUT/stage_speedups_fp8.json"
    $PY benchmarks/fp8_numerics.py --out "$OUT/fp8_numerics.json" ;;
  rest)
    $PY benchmarks/throughput.py --runs 1b:rm_lora --paths stock,align $W --timeout 150 --out "$OUT"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora,1b:rm_lora,1b:sft_lora --paths stock,align --data real $W \
        --timeout 150 --out "$OUT/real" ;;
  memory)
    $PY benchmarks/throughput.py --runs 1b:sft_lora,1b:dpo_lora --paths align --memory_step $W --timeout 200 \
        --out "$OUT/auto"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align_noref --memory_step $W --timeout 200 \
        --align_variants "noref=padding_free,shared_prompt,compile,lean,kbit_bf16,fused_lora,torch_nf4" \
        --out "$OUT/noref" ;;
  host)
    $PY benchmarks/throughput.py --runs host1b:sft_lora,host1b:dpo_lora --paths stock,align --steps 30 --warmup 5 \
        --align_variants "$CPP" --timing window --timeout 150 --out "$OUT" ;;
  host_1b)
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths stock,align --align_variants "$CPP;$COMBO" $W --profile 2 \
        --timeout 200 --out "$OUT" ;;
  host_cg)  # CUDA graphs again, each layer its own compiled graph (call18's shared one re-recorded per layer?)
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align --align_variants "$NOINLINE;$CG" $W \
        --timeout 250 --out "$OUT" ;;
  profile)  # where a GPU-bound step's kernel time goes (call21: the 1B SFT step keeps the GPU busy throughout)
    $PY benchmarks/throughput.py --runs 1b:sft_lora,1b:dpo_lora,8b:sft_lora --paths align $W --profile 2 \
        --timeout 200 --out "$OUT" ;;
  budget)
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths stock,align --align_variants "$BUDGETS" $W --profile 2 \
        --timeout 150 --out "$OUT"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align --align_variants "d3=auto@0.3;dp2=auto@0.2!$EST" \
        $W --profile 2 --timeout 150 --out "$OUT"
    # what issues the 1B SFT step's 151 device-to-device copies and 506 fills (profile_gaps.py's `copies`)
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align --steps 2 --warmup 3 --profile 1 --profile_stack \
        --timeout 150 --out "$OUT/stack" ;;
  budget2)
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths stock,align --align_variants "$BUDGETS" $W --profile 2 \
        --timeout 150 --out "$OUT/8b"
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align --align_variants "$BUDGETS" $W --profile 2 \
        --timeout 150 --out "$OUT/1b" ;;
  accumulate_1b)
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align_b8,align_o8,align_a8 \
        --align_variants "o8=auto@0.8!$OP;b8=auto@0.8!$ADDMM;a8=auto@0.8!$AB" $W --profile 2 --timeout 90 --out "$OUT/1b" ;;
  accumulate)
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths stock,align --align_variants "$OPS" $W --profile 2 \
        --timeout 150 --out "$OUT/1b"
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths stock,align --align_variants "b5=auto@0.5!$ADDMM;o5=auto@0.5!$OP;a5=auto@0.5!$AB;a6=auto@0.6!$AB" \
        $W --profile 2 --timeout 150 --out "$OUT/8b" ;;
  accumulate_dpo)
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align --align_variants \
        "b2=auto!$ADDMM;o2=auto!$OP;b3=auto@0.3!$ADDMM;o3=auto@0.3!$OP;a3=auto@0.3!$AB" $W --profile 2 --timeout 150 \
        --out "$OUT/dpo"
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align_b8,align_o8,align_a8 \
        --align_variants "b8=auto@0.8!$ADDMM;o8=auto@0.8!$OP;a8=auto@0.8!$AB" $W --profile 2 --timeout 150 --out "$OUT/8b" ;;
  dropout)
    $PY benchmarks/throughput.py --runs 1b:sft_lora,8b:sft_lora --paths stock,align,align_b \
        --align_variants "b=auto!$ADDMM" --lora_dropout 0.05 $W --profile 2 --timeout 150 --out "$OUT/drop"
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align $W --timeout 150 --out "$OUT/plain" ;;
  rows)
    $PY benchmarks/throughput.py --runs 8b:sft_lora,8b:dpo_lora,1b:sft_lora,1b:dpo_lora,1b:rm_lora --paths stock,align \
        $W --timeout 150 --out "$OUT" ;;
  gaps)
    $PY benchmarks/throughput.py --runs 1b:sft_lora,8b:sft_lora --paths stock,align $W --profile 2 --timeout 150 \
        --out "$OUT" ;;
  gaps_nb)  # gaps, with non_blocking beside auto (a pageable batch copy waits for the GPU), then 1 step with stacks
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths stock,align,align_nb --align_variants "nb=auto,non_blocking" \
        $W --profile 2 --timeout 150 --out "$OUT"
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align --steps 2 --warmup 3 --profile 2 --profile_stack \
        --timeout 150 --out "$OUT/stack"
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths stock,align,align_nb --align_variants "nb=auto,non_blocking" \
        $W --profile 2 --timeout 200 --out "$OUT/8b" ;;
  rows_nb)  # auto with non_blocking (auto's since call26): the DPO and reward-model rows, stock beside them
    $PY benchmarks/throughput.py --runs 1b:dpo_lora,1b:rm_lora,8b:dpo_lora --paths stock,align $W --timeout 150 \
        --out "$OUT" ;;
  qlora_nb)
    $PY benchmarks/throughput.py --runs 1b:sft_qlora,8b:sft_qlora --paths stock,align $W --timeout 150 --out "$OUT" ;;
  gemm)  # cuBLAS's own rate on each shape's base GEMMs: the floor under a LoRA step (benchmarks/gemm_ceiling.py)
    $PY benchmarks/gemm_ceiling.py --shapes 1b,8b --out "$OUT" ;;
  dpo_steps)  # DPO with a loss logged every step: step 1 must be log 2 on both paths (the reference is the policy)
    $PY benchmarks/throughput.py --runs 8b:dpo_lora,1b:dpo_lora --paths stock,align --steps 12 --warmup 1 \
        --timeout 240 --out "$OUT" ;;
  head)  # head_grad (the LM head's hidden-state gradient built in its forward: 2 vocabulary GEMMs, not 3) on auto
    $PY benchmarks/throughput.py --runs 1b:sft_lora,1b:dpo_lora,8b:sft_lora --paths align,align_hg \
        --align_variants "hg=auto,head_grad" $W --timeout 150 --out "$OUT" ;;
  firstloss)  # 12-step 8B DPO: step 1 not log 2 in 3 of 3 plain runs (call27/28), log 2 when recorded or in 2-step runs
    R="--runs 8b:dpo_lora --paths align --steps 12 --warmup 1 --timeout 150"
    $PY benchmarks/throughput.py $R --out "$OUT/plain"
    # the light recorder barely moves memory or timing: are the ids or only the log-probabilities apart?
    $PY benchmarks/throughput.py $R --step_bits light --out "$OUT/light"
    # every new tensor filled with NaN: a kernel reading memory it did not write makes the loss NaN
    $PY benchmarks/throughput.py $R --fill_uninitialized --timeout 200 --out "$OUT/nan_fill"
    # each kernel waited for: a race between streams or with the host goes away
    CUDA_LAUNCH_BLOCKING=1 $PY benchmarks/throughput.py $R --out "$OUT/launch_blocking"
    # recompilations and graph breaks, the worker's whole output kept
    TORCH_LOGS=recompiles,graph_breaks THROUGHPUT_WORKER_LOG="$OUT/plain_logged.log" \
        $PY benchmarks/throughput.py $R --out "$OUT/plain_logged"
    # Call28's one deterministic mismatch: compiled PEFT LoRA layers without fused_lora (dynamo's counters and
    # recompile reasons this time)
    TORCH_LOGS=recompiles $PY benchmarks/dpo_step_bits.py --shape 8b --align_options \
        shared_prompt,ref_first,compile,lean,non_blocking --out "$OUT/no_fused_lora.json" > "$OUT/no_fused_lora.log" 2>&1 ;;
  short)  # one call for a scarce machine: firstloss's first two runs, group's SFT rows, then the NaN fill, 1B DPO
    R="--runs 8b:dpo_lora --paths align --steps 12 --warmup 1 --timeout 150"
    G="--paths align,align_grp --align_variants grp=auto,group_lora $W --timeout 150"
    $PY benchmarks/throughput.py $R --out "$OUT/plain"
    $PY benchmarks/throughput.py $R --step_bits light --out "$OUT/light"
    $PY benchmarks/throughput.py --runs 8b:sft_lora $G --out "$OUT/grp_8b_sft"
    $PY benchmarks/throughput.py --runs 1b:sft_lora $G --out "$OUT/grp_1b_sft"
    $PY benchmarks/throughput.py $R --fill_uninitialized --timeout 200 --out "$OUT/nan_fill"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora $G --out "$OUT/grp_1b_dpo" ;;
  group)  # the grouping measured alone, then in whole steps beside auto
    $PY -m pytest -q -p no:logging tests/test_grouped_lora.py > "$OUT/tests.txt" 2>&1 || true
    tail -3 "$OUT/tests.txt"
    $PY benchmarks/lora_gemm_forms.py --shapes 1b,8b --out "$OUT"
    $PY benchmarks/throughput.py --runs 1b:sft_lora,1b:dpo_lora,8b:sft_lora --paths align,align_grp \
        --align_variants "grp=auto,group_lora" $W --timeout 150 --out "$OUT" ;;
  refbits)  # benchmarks/ref_policy_bits.py: is the compiled reference the policy's bits at B = 0?
    for d in "" "" --deterministic; do
      $PY benchmarks/ref_policy_bits.py --layers 4 $d --out "$OUT/ref_policy_bits_$(date +%s%N)$d.json"
    done ;;
  autotune)  # inductor's GEMM autotuning (cuBLAS against its Triton templates) where the LoRA GEMMs are in the graph
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align,align_b,align_bt --align_variants \
        "b=auto!$ADDMM;bt=auto!$ADDMM,max_autotune_gemm=True" $W --profile 2 --timeout 500 --out "$OUT" ;;
  forms)  # a LoRA layer's GEMMs alone in fused LoRA's op form and folded into the base GEMM (benchmarks/lora_gemm_forms.py)
    $PY benchmarks/lora_gemm_forms.py --shapes 1b,8b --out "$OUT" ;;
  memory_8b)
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align,align_a6,align_a62,align_a65,align_a7 \
        --align_variants "a6=auto@0.6;a62=auto@0.62;a65=auto@0.65;a7=auto@0.7" --memory_step $W --profile 2 \
        --timeout 200 --out "$OUT" ;;
  headline_1b)  # the 1B LoRA rows against stock with today's auto; SFT at lean budget 0.8 and DPO at 0.3 beside them
    $PY benchmarks/throughput.py --runs 1b:sft_lora,1b:dpo_lora,1b:rm_lora --paths stock,align $W --timeout 150 \
        --out "$OUT/rows"
    $PY benchmarks/throughput.py --runs 1b:sft_lora --paths align_b8 --align_variants "b8=auto@0.8" $W --timeout 150 \
        --out "$OUT/sft_b8"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align_b3 --align_variants "b3=auto@0.3" $W --timeout 150 \
        --out "$OUT/dpo_b3" ;;
  headline_8b)  # the 8B headline rows against stock with today's auto; DPO at lean budget 0.3 beside them
    $PY benchmarks/throughput.py --runs 8b:sft_lora,8b:dpo_lora,8b:sft_qlora --paths stock,align $W --timeout 200 \
        --out "$OUT/rows"
    $PY benchmarks/throughput.py --runs 8b:dpo_lora --paths align_b3 --align_variants "b3=auto@0.3" $W --timeout 150 \
        --out "$OUT/dpo_b3" ;;
  headline_qlora)  # 1B SFT QLoRA against stock, and head_grad beside it (Call31: +4.6%, in a 4-bit auto since)
    $PY benchmarks/throughput.py --runs 1b:sft_qlora --paths stock,align,align_hg --align_variants "hg=auto,head_grad" \
        $W --timeout 150 --out "$OUT/qlora" ;;
  budget_8b)  # 8B SFT at lean budgets 0.8 and 1.0 beside stock and auto (Call31: 0.6 ran at 69% of the limit, 0.62x
    # stock's peak): how far the 8B step gets with no recompute, memory aside
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths stock,align,align_b8,align_b10 \
        --align_variants "b8=auto@0.8;b10=auto@1.0" $W --timeout 150 --out "$OUT" ;;
  dpo_attention)  # DPO's shared-prompt attention alone: align's flash-varlen call against stock's dense layout
    # through cuDNN / flash / efficient SDPA (benchmarks/dpo_attention_forms.py), 1B and 8B head sizes
    $PY benchmarks/dpo_attention_forms.py --shapes 1b,8b --out "$OUT"
    # then whole DPO steps with that form (packed_attention.DENSE_PAIRS) beside auto and stock; since Call32 auto has
    # it (dense_pairs), so align and align_dp run the same: dense_check compares auto against auto less dense_pairs
    $PY benchmarks/throughput.py --runs 1b:dpo_lora,8b:dpo_lora --paths stock,align,align_dp \
        --align_variants "dp=auto!align.packed_attention.DENSE_PAIRS=True" $W --timeout 150 --out "$OUT/steps" ;;
  dense_check)  # dense_pairs in auto (Call32; DPO only): the reward model with auto and auto,dense_pairs (into RM's
    # auto if it pays), and 1B DPO with auto against auto less dense_pairs (the option as auto now runs it)
    $PY -m pytest -q tests/test_speed_cuda.py -k "dense_pairs or varlen" > "$OUT/tests.txt" 2>&1; tail -3 "$OUT/tests.txt"
    ND="padding_free,shared_prompt,ref_first,compile,lean,kbit_bf16,fused_lora,torch_nf4,non_blocking,group_lora,head_grad"
    $PY benchmarks/throughput.py --runs 1b:rm_lora --paths align,align_dp --align_variants "dp=auto,dense_pairs" \
        $W --timeout 150 --out "$OUT/rm"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align,align_nd --align_variants "nd=$ND" \
        $W --timeout 150 --out "$OUT/dpo" ;;
  offload)  # activation offload (align/offload.py, opt-in): its CUDA test and dense_pairs' first, then 8B SFT at lean
    # budget 0.8 (70% of the limit at 0.65x stock's peak in Call32) with 2 and 3 GiB a forward offloaded, beside
    # stock, auto and 0.8 alone: whether both 8B goals meet at once
    $PY -m pytest -q tests/test_speed_cuda.py -k "offload or dense_pairs or varlen" > "$OUT/tests.txt" 2>&1 || true
    tail -3 "$OUT/tests.txt"
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths stock,align,align_b8,align_o8,align_o82 \
        --align_variants "b8=auto@0.8;o8=auto,offload@0.8!align.offload.MAX_GIB=3;o82=auto,offload@0.8!align.offload.MAX_GIB=2" \
        $W --timeout 150 --out "$OUT/sft8b" ;;
  offload_dpo)  # 1B DPO recomputing less (budget 0.58, 0.8: not measured since call13's older code, where 0.5 ran 15%
    # faster than 0.2) with and without 4 or 2 GiB offloaded, beside auto (0.2); the
    # reward model with dense_pairs (into its auto if it pays)
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align,align_b58,align_o58,align_b8,align_o8,align_o58s \
        --align_variants "b58=auto@0.58;o58=auto,offload@0.58!align.offload.MAX_GIB=4;b8=auto@0.8;o8=auto,offload@0.8!align.offload.MAX_GIB=4;o58s=auto,offload@0.58!align.offload.MAX_GIB=2" \
        $W --timeout 150 --out "$OUT/dpo"
    $PY benchmarks/throughput.py --runs 1b:rm_lora --paths align,align_dp --align_variants "dp=auto,dense_pairs" \
        $W --timeout 150 --out "$OUT/rm" ;;
  offload_all)  # offload and offload_dpo in one call (a machine that comes rarely; Call33): tests, 8B SFT, 1B DPO, RM
    OUT="$OUT" bash "$0" offload || true
    OUT="$OUT" bash "$0" offload_dpo ;;
  offload2)  # after Call33 (offload's first GPU call): copies back timed by the backward's place (the first layers'
    # tensors no longer back at the backward's start, the peak), a side stream each way, DPO's detached reference
    # forward not offloaded; the CUDA test, then 8B SFT at 0.8 with 3 GiB (prefetch distance 1x and 2x), 1B DPO at
    # 0.58 (Call33: 1.09x auto's speed at 12.1 GiB) with 4 and 5 GiB
    $PY -m pytest -q tests/test_speed_cuda.py -k offload > "$OUT/tests.txt" 2>&1 || true
    tail -3 "$OUT/tests.txt"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths stock,align,align_b58,align_o58,align_o585 \
        --align_variants "b58=auto@0.58;o58=auto,offload@0.58!align.offload.MAX_GIB=4;o585=auto,offload@0.58!align.offload.MAX_GIB=5" \
        $W --timeout 150 --out "$OUT/dpo" || true
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align_b8,align_o8,align_o8a \
        --align_variants "b8=auto@0.8;o8=auto,offload@0.8!align.offload.MAX_GIB=3;o8a=auto,offload@0.8!align.offload.MAX_GIB=3,align.offload.AHEAD=2" \
        $W --timeout 150 --out "$OUT/sft8b" ;;
  offload2_min)  # offload2's short form: the CUDA test, 1B DPO auto / 0.58 / 0.58 with 4 GiB, 8B SFT 0.8 / 0.8 with 3 GiB
    $PY -m pytest -q tests/test_speed_cuda.py -k offload > "$OUT/tests.txt" 2>&1 || true
    tail -3 "$OUT/tests.txt"
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align,align_b58,align_o58 \
        --align_variants "b58=auto@0.58;o58=auto,offload@0.58!align.offload.MAX_GIB=4" $W --timeout 120 --out "$OUT/dpo" || true
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align_b8,align_o8 \
        --align_variants "b8=auto@0.8;o8=auto,offload@0.8!align.offload.MAX_GIB=3" $W --timeout 120 --out "$OUT/sft8b" ;;
  passes)  # (`a1`: `auto` before Call34, one pass at 0.2; `#N`: passes_per_batch N) passes_per_batch (a batch through forward and backward in passes over its examples, gradients summed,
    # one optimizer step): 1B DPO in 2 passes at lean budgets 0.58 and 0.8 beside stock, auto (0.2) and 0.58 in one
    # pass (Call33: 1.09x auto's speed at 12.1 GiB, DPO/SFT 1.5); 8B SFT in 2 passes at 1.0 and 0.8 beside 0.8 in one;
    # 8B DPO in 2 passes at 0.58 beside auto; then the mended offload (1B DPO 0.58 + 4 GiB, 8B SFT 0.8 + 3 GiB) and
    # the CUDA offload test. Lowest priority last: the call's time limit cuts from the end
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths stock,align_a1,align_b58,align_p58,align_p8 \
        --align_variants "a1=auto@0.2#1;b58=auto@0.58#1;p58=auto@0.58#2;p8=auto@0.8#2" $W --timeout 120 --out "$OUT/dpo" || true
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align_b8,align_p10,align_p8 \
        --align_variants "b8=auto@0.8;p10=auto@1.0#2;p8=auto@0.8#2" $W --timeout 120 --out "$OUT/sft8b" || true
    $PY benchmarks/throughput.py --runs 8b:dpo_lora --paths align_a1,align_p58 --align_variants "a1=auto@0.2#1;p58=auto@0.58#2" \
        $W --timeout 120 --out "$OUT/dpo8b" || true
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths align_o58 \
        --align_variants "o58=auto,offload@0.58!align.offload.MAX_GIB=4" $W --timeout 120 --out "$OUT/dpo_off" || true
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align_o8 \
        --align_variants "o8=auto,offload@0.8!align.offload.MAX_GIB=3" $W --timeout 120 --out "$OUT/sft8b_off" || true
    $PY -m pytest -q tests/test_speed_cuda.py -k offload > "$OUT/tests.txt" 2>&1 || true
    tail -3 "$OUT/tests.txt" ;;
  passes_min)  # passes' short form: 1B DPO stock / auto / 2 passes at 0.58 and 0.8; 8B SFT 0.8 / 2 passes at 1.0
    $PY benchmarks/throughput.py --runs 1b:dpo_lora --paths stock,align_a1,align_p58,align_p8 \
        --align_variants "a1=auto@0.2#1;p58=auto@0.58#2;p8=auto@0.8#2" $W --timeout 100 --out "$OUT/dpo" || true
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align_b8,align_p10 \
        --align_variants "b8=auto@0.8;p10=auto@1.0#2" $W --timeout 100 --out "$OUT/sft8b" || true ;;
  extra_8b)  # group_lora in 8B DPO and head_grad in 8B SFT beside auto; two more plain 12-step 8B DPO first losses
    $PY benchmarks/throughput.py --runs 8b:dpo_lora --paths align,align_grp --align_variants "grp=auto,group_lora" \
        $W --timeout 150 --out "$OUT/grp"
    $PY benchmarks/throughput.py --runs 8b:sft_lora --paths align,align_hg --align_variants "hg=auto,head_grad" \
        $W --timeout 150 --out "$OUT/hg"
    for i in 1 2; do
      $PY benchmarks/throughput.py --runs 8b:dpo_lora --paths align --steps 12 --warmup 1 --timeout 150 --out "$OUT/plain$i"
    done ;;
  rm_auto)
    $PY benchmarks/throughput.py --runs 1b:rm_lora --paths stock,align $W --timeout 150 --out "$OUT" ;;
  *) echo "unknown call $CALL" >&2; exit 2 ;;
esac
