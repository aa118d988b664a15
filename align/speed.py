"""Speed and memory options of the training stages (`--speedups`), on top of TRL's trainers.

    options = speed.resolve(run_args.speedups, stage="sft", model_args=model_args)
    model = speed.prepare_model(model, options)            # before the adapter: Liger kernels, bf16 4-bit layout
    speed.prepare_args(train_args, options, stage="sft")   # trainer keys: padding-free batches
    trainer = SFTTrainer(...)
    speed.finish(trainer, options)                         # segment attention, shared-prompt pairs, compiled layers

Segment attention lives in `align/packed_attention.py`, the fused LoRA forward in `align/fused_lora.py`, the
torch-ops NF4 layers in `align/nf4.py` and the head that builds its gradient in the forward in `align/head_grad.py`;
this module decides which options apply and puts them in place (the packed SFT, DPO and reward forwards, their
layouts planned in the collator, compiled layers).

Options (a comma-separated list, `auto`, or `none`):

- `padding_free` (SFT): a batch is one row of its samples back to back, no pad tokens (TRL's padding-free
  collator: position ids restart at each sample). Attention stays inside each sample: `segment attention` runs
  causal SDPA (the flash kernel) per sample, so no (tokens x tokens) mask is built and no token sees another sample.
- `shared_prompt` (DPO, RM): chosen and rejected share their prompt, so each pair is one row
  `prompt | chosen | rejected` with the rejected tokens attending to the prompt and to themselves, not to the chosen
  ones. The prompt goes through the model once instead of twice, for the policy and for the reference forward; the
  per-token log-probabilities are put back where TRL's loss expects them, so every DPO loss type works unchanged.
  For a reward model (RM) the same row per pair holds the chosen sequence and the rejected one after their common
  prefix (the prompt, and whatever else they share): no pad tokens, the prefix once, and the score head applied to
  the 2B pooled tokens only (transformers' rule: each sequence's rightmost token that is not the pad token).
- `dense_pairs` (DPO, RM, with `shared_prompt`; in `auto` on a GPU for DPO, where it was measured): a batch whose
  pairs all have one shape (prompt, chosen and rejected lengths equal across the batch, as when every sample is cut
  to the same caps) runs its attention as stock's layout, `[prompt | chosen]` and `[prompt | rejected]` gathered
  from the packed row into 2 x pairs causal sequences in one batched SDPA call (`packed_attention.DENSE_PAIRS`),
  which a Hopper GPU runs with cuDNN's kernel, instead of one flash-varlen call: 14% more attention flops, at a
  higher rate. Only attention changes; the prompt still goes through every other op once. H200, against `auto` in
  the same call: 1B DPO +4.0%, 8B DPO +3.9% tokens/s (H100, with the key heads repeated: 1B +3.1% and +3.2%, 8B
  +3.2%), 0.4-0.7 GiB more peak. Batches of unequal pairs keep flash varlen.
- `ref_first` (DPO): the reference log-probabilities are computed before the policy forward, not after it as in
  TRL (`align/dpo.py` `ReferenceFirst`): the reference forward's working memory no longer comes on top of every
  activation the policy keeps for its backward. Same values. With `compile` the reference forward runs the policy's
  own compiled graph, the policy adapter carrying the reference's weights (`QuickReferenceSwitch`), so that both
  round alike and the first loss is log 2, as in eager mode.
- `compile`: `torch.compile` of each decoder layer (one compiled graph shared by all layers): fused norms, RoPE,
  SwiGLU and LoRA adds, and fewer saved activations (the partitioner recomputes cheap element-wise ops).
- `lean` (with `compile`): the partitioner keeps about half of the activations a compiled layer would save and
  recomputes the rest in the backward, matmuls included (`activation_memory_budget`, recipe key
  `lean_memory_budget`: 0.5 for SFT and RM, 0.58 with fused LoRA's whole-layer op (the same memory), for DPO 0.58
  in its default 2 passes (`passes_per_batch`, `align/batch_passes.py`) and 0.2 in one, its rows being 1.5x as
  long): less memory, some speed.
- `liger`: Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (what TRL's `use_liger_kernel` applies). GPU only.
- `fused_lora`: LoRA layers compute in the activations' dtype. PEFT casts every adapted layer's input to the fp32
  LoRA weights (under autocast the matmul then casts it back to bf16: two copies of the input per layer in the
  forward, two of its gradient in the backward); here the small LoRA weights are cast instead (the fp32 weights
  stay the trained ones), the scaling is folded into B, and B's product is added to the base output by one
  `addmm` (the GEMM accumulates into it) instead of three element-wise passes; outside compiled code, into the
  base GEMM's own output in place (`addmm_`: no copy of it). In compiled layers with a bf16 `nn.Linear` base and no
  LoRA dropout the whole layer is one op (`fused_lora.COMPILED_ACCUMULATE` "op_ab"): the small LoRA product is
  written first and the base GEMM accumulates into it, likewise the input gradient, so no memory-bound pass reads
  and writes the layer's output to add the adapter, and inductor makes no copy (H100: 1B SFT +4.6%, 1B DPO +8.7%,
  8B SFT +2.6-5%, 8B DPO +4.2%, less memory at the same budget). With LoRA dropout, each adapter
  saves a one-byte keep-mask for its backward instead of its own dropped copy of the input (the dropped input is
  recomputed); on a GPU the masks are drawn differently from PEFT's, so runs with dropout match PEFT's in
  distribution, not bit for bit (on a CPU both draw the same masks). Left out under DeepSpeed ZeRO-3 (it reads LoRA weights outside their modules). Adapter variants
  (DoRA, ...), a bias on B, several active adapters and disabled adapters keep PEFT's forward.
- `group_lora` (with `compile` and `fused_lora`; in `auto` on a GPU): each block's q/k/v LoRA layers, and
  its MLP's gate/up layers, run as one fused LoRA op over their concatenated weights (`align/grouped_lora.py`: the
  base weights moved into one buffer, no second copy): four LoRA ops a Llama layer instead of seven. Same values
  (CPU tests to 1e-5). H100, against `auto` in the same call: 1B SFT +3.8%, 8B SFT +2.3% tokens/s (call29), the
  same peak and losses; 1B DPO +2.7%, 8B DPO +2.0%, 1B reward model +2.7% (call30), peaks 6.0 -> 6.2, 21.7 -> 21.8
  and 11.5 -> 11.0 GiB once v leaves the group's buffer as a copy (as a view it kept the whole q/k/v output alive
  for the backward: 1B DPO 7.2 GiB in call29). A plain linear base only: a 4-bit (QLoRA) base keeps one op a layer.
- `non_blocking`: the data loader copies each batch to the GPU from pinned memory without waiting (accelerate's
  `non_blocking`, TrainingArguments' `accelerator_config`). By default the copy of step N+1's batch waits until the
  GPU has finished step N (a copy from pageable memory synchronizes the stream), so the GPU idles while the host
  starts each step. In `auto` on a GPU: an H100's profiled steps (call26) idled 4.2 -> 2.3 ms a 1B SFT step and
  5.8 -> 4.1 ms an 8B one, the time spent waiting for the host's launches 1.6 -> 0.4 and 1.8 -> 0.6 ms (tokens/s
  +2.4% / +0.1%, within the run-to-run spread, as on an H200 before).
- `torch_nf4` (4-bit base, with `compile`): bitsandbytes' NF4 linear layers computed with torch ops
  (`align/nf4.py`): inside a compiled layer inductor fuses the dequantization into one kernel per weight instead
  of bitsandbytes' ops with Python per call (twice per weight per forward, again in the backward); bit for bit
  bitsandbytes' dequantized weight, and like it no bf16 copy of a weight kept for the backward. On an H200
  (same call): 1B QLoRA 41.4k -> 58.5k tokens/s, 8B QLoRA 13.1k -> 13.8k, at 0.53x / 0.59x stock's peak memory.
- `head_grad` (with `padding_free` or `shared_prompt`, a frozen LM head): the packed forwards' LM head builds the
  hidden-state gradient of each token's log-probability in its forward (`align/head_grad.py`): two
  `(tokens x vocab)` projections per training step instead of TRL's three, same outputs. In `auto` on a CPU and a
  GPU: the head alone runs 1.30x (1B) / 1.43x (8B) faster (H200), whole steps against `auto` in the same call
  +2.2% (1B SFT), +2.1% (8B SFT), +1.6% (1B DPO) tokens/s (H100 call30), 1B SFT QLoRA +4.6% and +5.5% in two
  samples, 8B SFT QLoRA +1.7% (H100 call31; H200 call17's 0.80x, with the code of then, did not come back).
- `fp8` (LoRA, one process): the frozen base linear layers multiply in FP8 (`align/fp8.py`): a bf16 weight held
  as two e4m3 copies with row-wise scales (as many bytes as bf16), activations and output gradients quantized per
  token, `torch._scaled_mm` with bf16 output; adapters, attention, norms and the LM head stay as they were. Twice
  the bf16 matmul rate on Hopper GPUs. A 4-bit base (with `torch_nf4` and `compile`) is dequantized straight to
  e4m3 inside the compiled layer (`nf4.NF4Fp8Linear`). Not in `auto`: it changes the numerics (FP8 rounding, ~4%
  per matmul), so it is a choice: on SmolLM2-135M-Instruct the assistant-token loss moves 1.2% (next-token KL 0.027),
  where an NF4 (QLoRA) base moves it 12.7% (KL 0.25; `benchmarks/fp8_numerics.py`). The DPO reference goes through the
  same FP8 base (step-0 loss still log 2). Left out with an 8-bit base, under DeepSpeed / FSDP / DDP and with a
  separate reference model. Experimental: 1.05x-1.35x the speed of `auto` on an H100 / H200 (slower with a 4-bit
  8B base), but the LoRA gradients are FP8's (first step on SmolLM2: median cosine 0.957 to fp32's, bf16 0.999,
  an NF4 base 0.667); trained on an H100, the SmolLM2 SFT stage ended 0.015 above bf16's eval loss, within
  the batch-order spread (benchmarks/README.md, Call21).
- `offload` (opt-in, CUDA): the first `offload_gib` (recipe key; default 3) of the activations a forward saves for
  its backward go to pinned host memory on a side stream while the forward goes on, and are brought back on it ahead
  of their backward (`align/offload.py`). Exact (the same tensors come back); it lets a `lean_memory_budget` that
  recomputes less fit the memory of one that recomputes more. Weights and small tensors stay on the GPU. Left out
  under DeepSpeed and FSDP (sharded weights).
- `cudagraphs` and `mlp_chunks` were removed after an H200 measurement: `REMOVED` holds why, and a recipe naming
  one gets that as its error.
- `kbit_bf16` (4-bit base): keep the norms, embeddings and head in bf16 as TRL does, instead of PEFT's fp32 copies,
  which make the whole residual stream fp32 (twice the activation memory, slower element-wise work).

`auto` (the default) is `padding_free,shared_prompt,dense_pairs,ref_first,compile,lean,kbit_bf16,fused_lora,
torch_nf4,non_blocking,group_lora,head_grad` on a CUDA GPU (group_lora with a plain linear base only, dense_pairs in
DPO only; DPO then in 2 passes a batch, `batch_passes`) and `padding_free,shared_prompt,ref_first,head_grad` on a CPU (SmolLM2 stages: SFT 2.1x, DPO 2.6x, RM 1.8x
tokens/s, same losses); `compile` and `lean` come with it only on one process without gradient checkpointing, where
they were measured (name them to use them elsewhere); options that do not apply to a stage or model are left out (and
logged).
Segment attention replaces SDPA (or eager) attention on models with plain causal attention (Llama, Qwen2, Mistral
without sliding window); with flash attention, padding-free batches use its own packing and `shared_prompt` is off.
Every option keeps the loss: tests/test_speed.py checks the padded vs padding-free loss and the paired vs
shared-prompt log-probabilities; benchmarks/throughput.py measures speed, memory and the losses against stock TRL +
PEFT.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging

import torch

from align import fp8, fused_lora, packed_attention
from align import head_grad as grad_in_forward

logger = logging.getLogger("align")

OPTIONS = ("padding_free", "shared_prompt", "compile", "lean", "liger", "kbit_bf16", "fused_lora", "torch_nf4",
           "head_grad", "non_blocking", "fp8", "ref_first", "group_lora", "dense_pairs", "offload")
# options that were measured on an H200 and did not pay (benchmarks/README.md), named in the error for a recipe
REMOVED = {
    "cudagraphs": "compiled layers as CUDA graphs ran at 0.13x (1B DPO) / 0.30x (1B SFT) the tokens/s of the same set "
                  "without them, and with a graph per layer no faster (H100: a 1B step keeps the GPU busy throughout)",
    "mlp_chunks": "MLPs over token slices raised the 1B DPO peak 8.9 -> 23.1 GiB at 0.87x the tokens/s",
}
# measured on an H100 and an H200: benchmarks/README.md; SFT with LoRA dropout (the layers keep "addmm") takes 0.5,
# where it recomputes no GEMM (benchmarks/lean_recompute.py --lora_dropout 0.05; H100 call24: 1B 0.45x, 8B 0.56x of
# stock's peak, stock with dropout too)
LEAN_BUDGET = {"sft": 0.5, "dpo": 0.2}
# with fused LoRA's whole-layer op in the compiled layers (`fused_lora.compiled_accumulate` "op_ab") the partitioner
# picks other tensors at each budget: SFT at 0.58 keeps what "addmm" keeps at 0.5 (1B: 7.9 GiB either way, 8B 24.9
# against 24.5; H100 call23), recomputing 2 GEMM ops a layer instead of 4 (benchmarks/lean_recompute.py)
LEAN_BUDGET_ONE_OP = {"sft": 0.58, "dpo": 0.2}
# DPO with `lean` (the GPU `auto`): each batch in 2 passes (`batch_passes`, recipe key `passes_per_batch`), each
# holding half the pairs' activations, so the partitioner may keep more of each layer at the SFT step's peak: H100
# Call34, against `auto` in one pass at 0.2: 1B 65,619 -> 69,476 tokens/s (2.10x stock) at 7.5 GiB (DPO/SFT 0.94),
# 8B 12,650 -> 13,953 (1.90x) at 24.3 GiB (0.97)
DPO_PASSES = 2
LEAN_BUDGET_PASSES = {"dpo": 0.58}
AUTO_CUDA = ("padding_free", "shared_prompt", "dense_pairs", "ref_first", "compile", "lean", "kbit_bf16", "fused_lora",
             "torch_nf4", "non_blocking", "group_lora", "head_grad")
AUTO_CPU = ("padding_free", "shared_prompt", "ref_first", "head_grad")  # measured on 2 CPU cores: benchmarks/README.md
ATTENTION = packed_attention.ATTENTION
_STAGE_ONLY = {"padding_free": ("sft",), "shared_prompt": ("dpo", "rm"), "dense_pairs": ("dpo", "rm"),
               "ref_first": ("dpo",)}
_PACKED_HEAD = {"sft": "padding_free", "dpo": "shared_prompt"}  # the option whose forward runs align's LM head
_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what TRL's DPOTrainer asks its fused head for
_SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")  # and TRL's SFTTrainer


def resolve(spec: str | None, stage: str, model_args=None, train_args=None) -> tuple[str, ...]:
    """The options that apply: `spec` is `none` or a comma-separated list of `OPTIONS` and `auto`.

    `auto` means what was measured to pay (benchmarks/README.md): `AUTO_CUDA` on a CUDA GPU, `AUTO_CPU` on a CPU;
    with `train_args`, the compiled options (`compile`, `lean`) come with `auto` only for adapter training on one
    process without gradient checkpointing, the setting they were measured in (named options are always kept)."""
    names, from_auto = [], set()
    for name in (n.strip() for n in (spec or "none").split(",")):
        if name == "auto":
            new = [n for n in (AUTO_CUDA if torch.cuda.is_available() else AUTO_CPU) if n not in names]
            names += new
            from_auto.update(new)
        elif name in OPTIONS:
            from_auto.discard(name)
            if name not in names:
                names.append(name)
        elif name in REMOVED:
            raise ValueError(f"speedup {name!r} was removed: {REMOVED[name]}; choose from {', '.join(OPTIONS)}")
        elif name not in ("none", ""):
            raise ValueError(f"unknown speedup {name!r}: choose from {', '.join(OPTIONS)}, or auto / none")
    if train_args is not None and from_auto & {"compile", "lean"}:
        from align import launch

        engine = launch.distributed_engine(train_args)
        why = (f"not measured under {engine}" if engine != "none" else
               "not measured with gradient checkpointing" if getattr(train_args, "gradient_checkpointing", False)
               else "measured on adapter training only" if not getattr(model_args, "use_peft", True) else None)
        if why:
            logger.info("speedups: auto leaves out compile and lean (%s); name them to use them", why)
            names = [n for n in names if n not in ({"compile", "lean"} & from_auto)]
    kept = []
    four_bit = model_args is not None and model_args.load_in_4bit
    eight_bit = model_args is not None and getattr(model_args, "load_in_8bit", False)
    for name in names:
        if stage not in _STAGE_ONLY.get(name, (stage,)):
            continue
        if name in ("kbit_bf16", "torch_nf4") and model_args is not None and not four_bit:
            continue
        if name == "fp8":
            why = ("an 8-bit base keeps bitsandbytes' kernels" if eight_bit else
                   "a 4-bit base takes FP8 only through torch_nf4 with compile"
                   if four_bit and not {"torch_nf4", "compile"} <= set(names) else
                   "the base is trained (no LoRA)" if model_args is not None and not model_args.use_peft else
                   fp8.device_supports_fp8("cuda" if torch.cuda.is_available() else "cpu"))
            if why:
                logger.info("speedups: fp8 left out (%s)", why)
                continue
        if name == "torch_nf4" and not torch.cuda.is_available() and _torch_version() < (2, 13):
            # measured with torch 2.11 on a CPU: compiled layers' logits up to 0.23 off the eager ones (2.13: equal)
            logger.info("speedups: torch_nf4 left out (torch %s's CPU compiler gets it wrong; 2.13 does not)",
                        torch.__version__)
            continue
        if name == "group_lora" and not {"compile", "fused_lora"} <= set(names):
            logger.info("speedups: group_lora works through compile and fused_lora; left out")
            continue
        if name == "group_lora" and (four_bit or eight_bit):
            logger.info("speedups: group_lora groups plain linear base layers; a k-bit base keeps one op a layer")
            continue
        if name in ("lean", "torch_nf4") and "compile" not in names:
            logger.info("speedups: %s works through compile; left out", name)
            continue
        if name == "dense_pairs" and "shared_prompt" not in names:
            logger.info("speedups: dense_pairs is a form of shared_prompt's attention; left out")
            continue
        if name == "dense_pairs" and stage == "rm" and name in from_auto:
            logger.info("speedups: auto leaves out dense_pairs in RM (measured in DPO only); name it to use it")
            continue
        if name == "head_grad" and _PACKED_HEAD.get(stage) not in names:
            logger.info("speedups: head_grad works through align's own LM head (%s); left out",
                        _PACKED_HEAD.get(stage, "not in this stage"))
            continue
        if name in ("liger", "non_blocking", "offload") and not torch.cuda.is_available():
            logger.info("speedups: %s needs a CUDA GPU; left out", name)
            continue
        kept.append(name)
    return tuple(kept)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def prepare_model(model, options) -> torch.nn.Module:
    """Options that change the base model itself; call before the adapter is attached."""
    if "kbit_bf16" in options and getattr(model, "is_loaded_in_4bit", False):
        for p in model.parameters():  # the fp32 copies PEFT's k-bit preparation made; 4-bit weights are uint8
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if "liger" in options:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    return model


def prepare_args(train_args, options, stage: str) -> None:
    """Trainer keys the options need. Padding-free batches: TRL's collator; align's data is already cut to
    `max_length` (longer rows are dropped), and TRL refuses `max_length` with padding-free without packing."""
    if stage == "sft" and "padding_free" in options:
        train_args.padding_free = True
        train_args.max_length = None
    if "non_blocking" in options:  # batches copied from pinned memory without waiting for the GPU
        train_args.dataloader_pin_memory = True
        train_args.accelerator_config.non_blocking = True


def lean_budget(trainer, lean_memory_budget: float | None = None, one_op: bool = False) -> float:
    """`lean`'s activation memory budget: the one given, else `LEAN_BUDGET` of the trainer's stage (DPO rows carry
    prompt + chosen + rejected, 1.5x the tokens of an SFT row of the same pair, so DPO keeps less of each layer);
    `LEAN_BUDGET_ONE_OP` when the compiled layers run fused LoRA as one op (`one_op`); `LEAN_BUDGET_PASSES` when
    the batch goes through in passes (`trainer.passes_per_batch` > 1), each holding part of its activations."""
    from trl import DPOTrainer

    stage = "dpo" if isinstance(trainer, DPOTrainer) else "sft"
    if lean_memory_budget is not None:
        budget = lean_memory_budget
    elif getattr(trainer, "passes_per_batch", 1) > 1 and stage in LEAN_BUDGET_PASSES:
        budget = LEAN_BUDGET_PASSES[stage]
    else:
        budget = (LEAN_BUDGET_ONE_OP if one_op else LEAN_BUDGET)[stage]
    if not 0 < budget <= 1:
        raise ValueError(f"lean_memory_budget must be in (0, 1], got {budget}")
    return budget


def resolve_passes(trainer, options, passes_per_batch: int | None = None) -> int:
    """The passes each training batch goes through in: the recipe's `passes_per_batch`, else `DPO_PASSES` for DPO
    with `lean` (the GPU `auto`) and at least that many pairs a batch, else 1 (a batch of one pair keeps DPO's
    one-pass lean budget, as its pass would hold more than an SFT step of one row)."""
    from trl import DPOTrainer

    if passes_per_batch is not None:
        return passes_per_batch
    dpo = "lean" in options and isinstance(trainer, DPOTrainer)
    return DPO_PASSES if dpo and trainer.args.per_device_train_batch_size >= DPO_PASSES else 1


def finish(trainer, options, lean_memory_budget: float | None = None, offload_gib: float | None = None,
           passes_per_batch: int | None = None) -> None:
    """Options that act on the trainer's model after TRL has set it up (TRL installs its fused LM head in
    `__init__`; the wrappers here sit around that head). `lean_memory_budget`: with `lean`, the fraction of a
    compiled layer's activations kept for the backward (default: `lean_budget`); `offload_gib`: with `offload`, the
    saved activations per forward moved to host memory (default `offload.MAX_GIB`); `passes_per_batch`: the
    trainer's `batch_passes.BatchPasses` setting (default: `DPO_PASSES` for DPO with `lean`, else 1)."""
    if hasattr(trainer, "passes_per_batch"):  # before the lean budget, which depends on it
        trainer.passes_per_batch = resolve_passes(trainer, options, passes_per_batch)
    model = _causal_lm(trainer.model)
    segments = [o for o in ("padding_free", "shared_prompt") if o in options]
    if "shared_prompt" in segments and (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
                                        or getattr(trainer, "precompute_ref_logps", False)):
        # a sharded LM head needs TRL's gather; precomputed reference log-probs came from the paired rows, and the
        # policy must be scored the same way for the step-0 loss to stay exactly log 2
        logger.info("speedups: shared_prompt left out (sharded LM head or precomputed reference log-probs)")
        segments.remove("shared_prompt")
    # flash attention packs by itself (TRL passes cu_seq_lens) but has no shared-prompt layout; without segment
    # attention, padding-free batches still train correctly (transformers builds the packed block-diagonal mask)
    why = segments and packed_attention.segment_attention_blocker(model)
    if why:
        logger.info("speedups: segment attention left out (%s); shared_prompt off", why)
        segments = []
    packed_attention.DENSE_PAIRS = "dense_pairs" in options and "shared_prompt" in segments
    if segments:
        packed_attention.use_segment_attention(model)
        if "padding_free" in segments:  # a sharded LM head needs TRL's gather: its fused head is kept there
            own_head = not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)
            _wrap_forward(model, functools.partial(_packed_sample_forward, own_head=own_head,
                                                   head_grad="head_grad" in options))
        reward = "shared_prompt" in segments and _is_reward_trainer(trainer)
        if reward:  # one row per pair, the score read at each sequence's pooled token
            _wrap_forward(model, _reward_pair_forward, fused_head_only=False)
        elif "shared_prompt" in segments:
            outputs = _DPO_OUTPUTS + (("log_sum_sq_probs",) if getattr(trainer, "use_weighting", False) else ())
            _wrap_forward(model, functools.partial(_shared_prompt_forward, outputs=outputs,
                                                   head_grad="head_grad" in options))
        if reward:
            pad = _pad_token_id(model)
            plan_in_collator(trainer, lambda batch: reward_host_plan(batch, pad))
        elif getattr(trainer, "ref_model", None) is None:  # a separate reference model is not wrapped
            plan_in_collator(trainer, lambda batch: host_plan(batch, segments))
    if "fused_lora" in options:
        from align import launch

        if launch.distributed_engine(trainer.args) == "deepspeed_zero3":
            # ZeRO-3 gathers a parameter when its own module runs; the fused forward reads lora_A/lora_B weights
            # from the parent layer, so a partitioned one would be an empty placeholder
            logger.info("speedups: fused_lora left out under DeepSpeed ZeRO-3 (partitioned LoRA weights)")
            options = tuple(o for o in options if o != "fused_lora")
        else:
            fused_lora.use_fused_lora(trainer.model)
            if "group_lora" in options and launch.distributed_engine(trainer.args) in ("none", "ddp"):
                from align import grouped_lora

                grouped_lora.group_lora(trainer.model)
    if hasattr(trainer, "reference_first"):  # align's DPO trainer (align/dpo.py `ReferenceFirst`)
        trainer.reference_first = "ref_first" in options
        from align import launch

        # the reference through the policy's compiled graph (`QuickReferenceSwitch`): first, so that its autograd
        # graph is gone before the policy's forward; not where the adapter weights are sharded
        trainer.reference_in_policy_graph = ("compile" in options and "ref_first" in options
                                             and launch.distributed_engine(trainer.args) in ("none", "ddp"))
    if "fp8" in options:
        from align import launch

        engine = launch.distributed_engine(trainer.args)
        if engine != "none" or getattr(trainer, "ref_model", None) is not None:
            # DeepSpeed casts every floating-point parameter to bf16 and DDP / FSDP broadcast or shard them, e4m3
            # ones included: measured on one process only. A separate reference model would stay bf16 and no
            # longer match the policy at step 0.
            logger.info("speedups: fp8 left out (%s)", f"under {engine}" if engine != "none" else
                        "separate reference model")
            options = tuple(o for o in options if o != "fp8")
        else:
            fp8.use_fp8(trainer.model)
    if "torch_nf4" in options and "compile" in options:
        from align import nf4

        nf4.use_torch_nf4(model, fp8="fp8" in options)
    one_op = "compile" in options and fused_lora.compiled_accumulate(model) == "op_ab"
    budget = lean_budget(trainer, lean_memory_budget, one_op) if "lean" in options else None
    if "compile" in options:
        compile_layers(model, memory_budget=budget)
    if "offload" in options:
        from align import launch, offload

        engine = launch.distributed_engine(trainer.args)
        if engine.startswith(("deepspeed", "fsdp")):
            logger.info("speedups: offload left out under %s (sharded weights would be taken for activations)", engine)
            options = tuple(o for o in options if o != "offload")
        else:
            offload.use_offload(model, offload_gib)
            trainer.align_offload_gib = offload.MAX_GIB if offload_gib is None else offload_gib
    trainer.align_speedups = tuple(options)
    trainer.align_lean_memory_budget = budget


def _causal_lm(model):
    """The transformers model under PEFT / accelerate wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _wrap_forward(model, packed_forward, fused_head_only: bool = True) -> None:
    """Put `packed_forward(inner, model, kwargs, plan)` in front of the model's forward (with `fused_head_only`,
    only of its TRL fused-head calls); it returns None when a batch does not fit it, and the inner forward runs as
    before. `plan`: the batch's `HostPlan`, taken out of the keyword arguments (the inner forward never sees it)."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        plan = kwargs.pop(PLAN_KEY, None)
        if not args and (kwargs.get("fused_lm_head") or not fused_head_only):
            out = packed_forward(inner, model, kwargs, plan)
            if out is not None:
                return out
        packed_attention.set_layout(None)
        return inner(*args, **kwargs)

    model.forward = forward


# --- layouts planned by the collator, from the batch's CPU tensors ---------------------------------------------

PLAN_KEY = "align_layout_plan"


class HostPlan:
    """A batch's packed layout, made by the collator from its CPU tensors and carried in the batch under `PLAN_KEY`
    to the wrapped forward. Made on the device instead, it would read device tensors on the host (a wait for the GPU
    in every forward, so the host could not queue the next step's work while the GPU runs this one). The
    DataLoader's pin-memory thread pins its tensors and the device placement copies them without waiting.

    kind "samples": the sample starts of a padding-free row of `length` tokens, and `head`: (rows, targets), the
    positions whose next-token label is trained and those labels, for the LM head (None when the batch has no
    labels or no trained token). kind "pairs": `pair_layout` of a DPO batch of shape `length`; kind
    "reward_pairs": `reward_pair_layout` of a reward-model batch. `labels`: the labels the plan was made from (for
    reward pairs, the input ids), checked on the device, without a sync, against those the forward receives."""

    def __init__(self, kind: str, length, starts=None, pair=None, labels=None, head=None):
        self.kind, self.length, self.starts, self.pair, self.labels, self.head = kind, length, starts, pair, labels, head

    def _map(self, fn):
        def each(x):
            return None if x is None else tuple(fn(t) if isinstance(t, torch.Tensor) else t for t in x)
        labels = None if self.labels is None else fn(self.labels)
        return HostPlan(self.kind, self.length, self.starts, each(self.pair), labels, each(self.head))

    def pin_memory(self, device=None):
        return self._map(lambda x: x.pin_memory())

    def to(self, device, non_blocking=False):
        return self._map(lambda x: x.to(device, non_blocking=non_blocking or x.is_pinned()))

    def labels_match(self, labels) -> bool:
        """Whether the plan is for `labels`: same shape here, same values asserted on the device (no sync)."""
        if self.labels is None or self.labels.shape != labels.shape:
            return False
        torch._assert_async((labels == self.labels).all(), "align: the batch's labels differ from its host plan's")
        return True


def head_rows(labels):
    """(rows, targets) of a padding-free row's labels (1, L): the positions t whose label t+1 is trained, and those
    labels; None when no token is trained (TRL's head then keeps the loss connected to the model)."""
    shifted = labels[0, 1:]
    rows = (shifted != -100).nonzero().flatten()
    return (rows, shifted[rows]) if len(rows) else None


def sample_starts(position_ids) -> list[int]:
    """Start of every sample in a padding-free row (position ids restart at 0), plus the row length."""
    return (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]


def host_plan(batch, segments) -> HostPlan | None:
    """The `HostPlan` of a collated CPU batch, or None when it is not a batch the wrapped forwards pack."""
    pos, ids, mask = batch.get("position_ids"), batch.get("input_ids"), batch.get("attention_mask")
    if "padding_free" in segments and pos is not None and mask is None and pos.shape[0] == 1 and not pos.is_cuda:
        labels = batch.get("labels")
        if labels is None or labels.shape != pos.shape or labels.is_cuda:
            labels = None
        return HostPlan("samples", pos.shape[1], starts=sample_starts(pos), labels=labels,
                        head=None if labels is None else head_rows(labels))
    completion = batch.get("completion_mask")
    if "shared_prompt" in segments and ids is not None and mask is not None and completion is not None \
            and not ids.is_cuda:
        labels = ids.masked_fill(completion == 0, -100)  # what TRL's DPO compute_loss passes as labels
        pair = pair_layout(ids, mask, labels)
        return None if pair is None else HostPlan("pairs", tuple(ids.shape), pair=pair, labels=labels)
    return None


def plan_in_collator(trainer, planner) -> None:
    """Wrap the trainer's collator: every batch it makes carries its `HostPlan` (`planner(batch)`, when not None)."""
    collate = trainer.data_collator

    @functools.wraps(collate)
    def collate_and_plan(examples):
        batch = collate(examples)
        plan = planner(batch)
        if plan is not None:
            batch[PLAN_KEY] = plan
        return batch

    trainer.data_collator = collate_and_plan


def _packed_sample_forward(inner, model, kwargs, plan=None, outputs=_SFT_OUTPUTS, own_head=True, head_grad=False):
    """Padding-free SFT batch (one row, position ids restarting at 0, no attention mask): attend per sample.

    With the batch's host plan (and `own_head`), the LM head scores the trained positions the collator found
    (`HostPlan.head`) instead of TRL's fused head picking them with a boolean index (`hidden_states[mask]`, a wait
    for the GPU in every forward, and `masked_scatter`, whose backward waits again): same kernel, same outputs."""
    pos = kwargs.get("position_ids")
    if pos is None or kwargs.get("attention_mask") is not None or pos.shape[0] != 1:
        return None
    planned = plan is not None and plan.kind == "samples" and plan.length == pos.shape[1]
    starts = plan.starts if planned else sample_starts(pos)
    packed_attention.set_layout([(a, b, [(a, b)]) for a, b in itertools.pairwise(starts) if b > a], pos.shape[1])
    labels = kwargs.get("labels")
    if not (own_head and planned and plan.head is not None and labels is not None
            and kwargs.get("shift_labels") is None and plan.labels_match(labels)):
        with packed_attention.no_mask_building():
            return inner(**kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in ("fused_lm_head", "labels", "num_items_in_batch")}
    rest["use_cache"] = False
    backbone = getattr(model, model.base_model_prefix)
    rest.update(packed_attention.packed_attention_kwargs(labels.device))
    with packed_attention.no_mask_building():
        hidden = backbone(**rest).last_hidden_state[0]
    rows, targets = plan.head
    return fused_head(model, hidden, rows, targets, rows, labels[:, 1:] != -100, outputs,
                      num_items=kwargs.get("num_items_in_batch"), head_grad=head_grad)


_head_without_grad = False  # set by `head_without_grad`


def forward_is_detached() -> bool:
    """Inside `head_without_grad`: this forward's result is detached (no backward will use what it saves)."""
    return _head_without_grad


@contextlib.contextmanager
def head_without_grad():
    """The packed forwards' LM head (outside the compiled layers) runs without grad in the block: for a forward run
    with grad on only to take the policy's compiled graph, its result detached (DPO's reference,
    `dpo.QuickReferenceSwitch`): with `head_grad` the head would otherwise build the hidden-state gradient (a
    vocabulary-wide GEMM more) for nothing."""
    global _head_without_grad
    previous, _head_without_grad = _head_without_grad, True
    try:
        yield
    finally:
        _head_without_grad = previous


def fused_head(model, hidden, rows, targets, flat, mask, outputs, num_items=None, head_grad=False):
    """TRL's fused LM head (`add_fused_lm_head`, temperature 1, no logit scale or softcap: what segment attention
    admits) on host-planned positions: `hidden` (T, d) of a packed row, `rows` the positions scored, `targets`
    their labels, `flat` their places in the flattened per-token outputs of shape `mask.shape` (`mask`: labels !=
    -100). The rows are gathered and the outputs put in place by index, so neither way waits for the GPU. The loss
    is divided by `num_items` when given, else by the trained tokens, as TRL's is. `head_grad`: the same outputs
    with the hidden-state gradient built in the forward (`align/head_grad.py`), for a frozen head."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

    head = model.get_output_embeddings()
    hidden = hidden.to(head.weight.device).index_select(0, rows)
    with torch.no_grad() if _head_without_grad else contextlib.nullcontext():
        if head_grad and grad_in_forward.frozen(head.weight, head.bias):  # a trained head needs TRL's weight gradient
            per_token = grad_in_forward.log_probs(hidden, head.weight, head.bias, targets,
                                                  _CHUNKED_LOGPROB_CHUNK_SIZE, outputs)
        else:
            per_token = ChunkedLogProbFunction.apply(
                hidden, head.weight, head.bias, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs,
            )
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.numel()).index_copy(0, flat, x).view(mask.shape) for x in per_token
    )
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / (mask.sum().clamp(min=1) if num_items is None else num_items),
        log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits,
        is_top1=is_top1, label_mask=mask,
    )


def _packed_hidden(model, packed, pos, segments):
    """The backbone's last hidden states (T, d) of one packed row (`packed` ids at positions `pos`), attention kept
    inside `segments`."""
    packed_attention.set_layout(segments, packed.shape[0])
    backbone = getattr(model, model.base_model_prefix)
    with packed_attention.no_mask_building():
        return backbone(input_ids=packed[None], position_ids=pos[None], use_cache=False,
                        **packed_attention.packed_attention_kwargs(packed.device)).last_hidden_state[0]


# --- DPO: one row per pair, prompt shared ---------------------------------------------------------------------

def _pack_pairs(ids, lens: list[int], shared: list[int]):
    """One row of B pairs from the right-padded rows `[chosen_1..chosen_B, rejected_1..rejected_B]` (host tensors):
    each pair as its chosen row, then its rejected row after the `shared[i]` tokens the two begin with, at their
    own positions, attending to that prefix and to themselves. Returns (ids, position ids, segments, the offset of
    each pair in the row)."""
    b = len(shared)
    ids_parts, pos_parts, segments, offsets = [], [], [], []
    o = 0
    for i in range(b):
        p, lc, lr = shared[i], lens[i], lens[b + i]
        ids_parts += [ids[i, :lc], ids[b + i, p:lr]]
        pos_parts += [torch.arange(lc), torch.arange(p, lr)]
        segments.append((o, o + lc, [(o, o + lc)]))
        if lr > p:
            rest = (o + lc, o + lc + lr - p)
            segments.append((*rest, ([(o, o + p)] if p else []) + [rest]))
        offsets.append(o)
        o += lc + lr - p
    return torch.cat(ids_parts), torch.cat(pos_parts), segments, offsets


def pair_layout(input_ids, attention_mask, labels):
    """Plan the shared-prompt row of a DPO batch `[chosen_1..chosen_B, rejected_1..rejected_B]` (right-padded).

    Returns (packed_ids, position_ids, segments, flat, rows, targets) on the batch's device, or None when the
    batch is not such pairs (odd size, a prompt that differs between chosen and rejected, a row without completion
    tokens, left padding). For the trained tokens (labels != -100) in row-major order: `flat` is their place in the
    flattened (2B, L-1) per-token outputs TRL's loss reads, `rows` the packed positions whose hidden states predict
    them and `targets` their labels, what the fused head reads. The plan is made on the host from one copy of the
    batch (a few thousand integers), so the GPU gets its inputs without waiting on many small kernels and syncs.
    """
    n, length = input_ids.shape
    if n % 2 or attention_mask is None or labels is None:
        return None
    b, dev = n // 2, input_ids.device
    input_ids, attention_mask, labels = torch.stack([input_ids, attention_mask.to(input_ids.dtype), labels]).cpu()
    trained = labels != -100
    lens = attention_mask.sum(1)
    prompt = trained.int().argmax(1)
    ar = torch.arange(length)
    in_prompt = ar[None] < prompt[:b, None]
    if not (trained.any(1).all() and (prompt[:b] == prompt[b:]).all()
            and ((input_ids[:b] == input_ids[b:]) | ~in_prompt).all()
            and (attention_mask.bool() == (ar[None] < lens[:, None])).all()):
        return None
    ids_packed, pos_packed, segments, offsets = _pack_pairs(input_ids, lens.tolist(), prompt[:b].tolist())
    o = len(ids_packed)
    t = ar[:-1][None]
    off = torch.tensor(offsets)[:, None]
    p_t, lc_t = prompt[:b, None], lens[:b, None]
    chosen_idx = off + t
    rejected_idx = torch.where(t == p_t - 1, off + p_t - 1, off + lc_t + t - p_t)
    hidden_index = torch.cat([chosen_idx, rejected_idx]).clamp(0, o - 1)
    mask = trained[:, 1:]
    flat = mask.flatten().nonzero().flatten()
    host = (ids_packed, pos_packed, flat, hidden_index[mask], labels[:, 1:][mask])
    packed, pos, flat, rows, targets = (x.to(dev, non_blocking=True) for x in host)
    return packed, pos, segments, flat, rows, targets


_pair_cache: list = []  # [(input_ids, attention_mask, labels, their versions), plan] of the last pair batch


def _cached_pair_layout(input_ids, attention_mask, labels):
    """`pair_layout`, planned once per batch: DPO's reference and policy forwards get the same tensors."""
    tensors = (input_ids, attention_mask, labels)
    versions = tuple(getattr(x, "_version", None) for x in tensors)
    if _pair_cache and all(a is b for a, b in zip(_pair_cache[0][:3], tensors)) and _pair_cache[0][3] == versions:
        return _pair_cache[1]
    plan = pair_layout(*tensors)
    _pair_cache[:] = [(*tensors, versions), plan]
    return plan


def _shared_prompt_forward(inner, model, kwargs, plan=None, outputs=_DPO_OUTPUTS, head_grad=False):
    """TRL DPO fused-head call on a pair batch: one shared-prompt row through the backbone, per-token outputs in
    TRL's (2B, L-1) layout."""
    input_ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
    if input_ids is None or labels is None or kwargs.get("shift_labels") is not None:
        return None
    if plan is not None and plan.kind == "pairs" and plan.length == tuple(input_ids.shape) \
            and plan.labels_match(labels):
        plan = plan.pair
    else:
        plan = _cached_pair_layout(input_ids, kwargs.get("attention_mask"), labels)
    if plan is None:
        return None
    packed, pos, segments, flat, rows, targets = plan
    hidden = _packed_hidden(model, packed, pos, segments)
    return fused_head(model, hidden, rows, targets, flat, labels[:, 1:] != -100, outputs, head_grad=head_grad)


# --- reward model: one row per pair, shared prefix once -------------------------------------------------------

def _is_reward_trainer(trainer) -> bool:
    from trl import RewardTrainer

    return isinstance(trainer, RewardTrainer)


def _pad_token_id(model):
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.pad_token_id


def reward_pair_layout(input_ids, attention_mask, pad_token_id):
    """Plan the packed row of a reward-model batch `[chosen_1..chosen_B, rejected_1..rejected_B]` (TRL's
    RewardTrainer collator: right-padded full sequences).

    Each pair becomes `chosen | rejected after the common prefix`: the rejected tokens sit at their own positions
    and attend to the prefix (in the chosen segment) and to themselves, so the shared prompt (and whatever else the
    two share) goes through the model once, and no pad token at all. Returns (packed_ids, position_ids, segments,
    pool) on the batch's device: `pool` is, for every input row in order, the packed position of the token
    transformers' sequence classifier scores (the rightmost token that is not the pad token; one inside the
    shared prefix is read from the chosen segment, whose hidden state there is the rejected row's too). None when
    the batch is not such pairs (odd size, no pad token, left padding, an empty row, a scored token in padding)."""
    n, length = input_ids.shape
    if n == 0 or n % 2 or attention_mask is None or pad_token_id is None:
        return None
    b, dev = n // 2, input_ids.device
    ids, mask = torch.stack([input_ids, attention_mask.to(input_ids.dtype)]).cpu()
    lens = mask.sum(1)
    ar = torch.arange(length)
    last = (ar[None] * (ids != pad_token_id)).argmax(1)  # GenericForSequenceClassification's pooled token
    if not ((lens > 0).all() and (mask.bool() == (ar[None] < lens[:, None])).all() and (last < lens).all()):
        return None
    both = torch.minimum(lens[:b], lens[b:])
    differ = (ids[:b] != ids[b:]) | (ar[None] >= both[:, None])
    shared = torch.where(differ.any(1), differ.int().argmax(1), both).tolist()
    lens_l, last_l = lens.tolist(), last.tolist()
    packed, pos, segments, offsets = _pack_pairs(ids, lens_l, shared)
    pool_c = [o + t for o, t in zip(offsets, last_l[:b])]
    pool_r = [o + t if t < p else o + lc + t - p for o, t, p, lc in zip(offsets, last_l[b:], shared, lens_l)]
    host = (packed, pos, torch.tensor(pool_c + pool_r))
    packed, pos, pool = (x.to(dev, non_blocking=True) for x in host)
    return packed, pos, segments, pool


def reward_host_plan(batch, pad_token_id) -> HostPlan | None:
    """The `HostPlan` of a collated CPU reward-model batch (checked in the forward against its input ids)."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if ids is None or ids.is_cuda:
        return None
    pair = reward_pair_layout(ids, mask, pad_token_id)
    return None if pair is None else HostPlan("reward_pairs", tuple(ids.shape), pair=pair, labels=ids)


def _reward_pair_forward(inner, model, kwargs, plan=None):
    """TRL RewardTrainer's call of a sequence classifier on a pair batch: one packed row through the backbone and
    the score head on the 2B pooled tokens only; the same pooled logits (2B, labels) as the padded forward."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None or kwargs.get("output_hidden_states") or kwargs.get("output_attentions") or any(
            kwargs.get(k) is not None for k in ("labels", "inputs_embeds", "position_ids")):
        return None
    if plan is not None and plan.kind == "reward_pairs" and plan.length == tuple(input_ids.shape) \
            and plan.labels_match(input_ids):
        layout = plan.pair
    else:
        layout = reward_pair_layout(input_ids, kwargs.get("attention_mask"), _pad_token_id(model))
    if layout is None:
        return None
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    packed, pos, segments, pool = layout
    hidden = _packed_hidden(model, packed, pos, segments)
    return SequenceClassifierOutputWithPast(logits=model.score(hidden.index_select(0, pool)))


# --- compile -------------------------------------------------------------------------------------------------

def align_op_schemas() -> list[str]:
    """The schemas of align's custom ops (`align::*`, registered on import), sorted."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("align::"))
    return [str(getattr(torch.ops.align, n.split("::", 1)[1]).default._schema) for n in names]


def tag_compile_caches() -> str:
    """Add a hash of align's op schemas to torch.compile's cache keys (`torch.compiler.config.cache_key_tag`, kept
    beside a tag of the user's own). Inductor's on-disk cache (`/tmp/torchinductor_<user>`) can otherwise hand code
    compiled against an op's earlier arguments to a newer align: seen after `align::lora_linear_ab` took two more
    arguments and was changed back ("expected at most 5 argument(s) but received 7")."""
    import hashlib

    import torch.compiler.config as compiler

    ours = "align-ops-" + hashlib.sha1("\n".join(align_op_schemas()).encode()).hexdigest()[:12]
    if not hasattr(compiler, "cache_key_tag"):  # torch < 2.6
        return ours
    kept = [t for t in compiler.cache_key_tag.split("|") if t and not t.startswith("align-ops-")]
    compiler.cache_key_tag = "|".join(kept + [ours])
    return ours


def compile_layers(model, memory_budget: float | None = None) -> None:
    """`torch.compile` each decoder layer in place. With `inline_inbuilt_nn_modules` (torch >= 2.5) the layers share
    one compiled graph; shapes that vary between batches are compiled as dynamic after the first change.
    `memory_budget` (0-1): the fraction of the activations the partitioner may save (the rest is recomputed)."""
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    functorch.activation_memory_budget = 1.0 if memory_budget is None else memory_budget  # 1.0: torch's default
    tag_compile_caches()
    # fused LoRA's one-op form (`align::lora_linear`) must reach the budget's cost model as the GEMM it is: the
    # partitioner otherwise takes a custom op for a cheap one and recomputes the MLP's (benchmarks/lean_recompute.py)
    functorch.is_non_builtin_to_include = fused_lora.compiled_accumulate(model) != "addmm"

    # Round to bf16 where eager rounds: the policy (training graph) and the reference (no-grad graph, adapter off)
    # then give the same log-probabilities at step 0, as in eager mode, instead of differing by fusion choices.
    inductor.emulate_precision_casts = True
    if fp8.has_fp8_matmuls(model):
        fp8.cublas_in_compiled_layers()
    backbone = getattr(model, model.base_model_prefix)
    for layer in backbone.layers:
        layer.compile()
