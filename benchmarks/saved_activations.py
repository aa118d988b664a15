"""Activation memory of one training forward, counted exactly on the CPU: the bytes autograd saves for the backward.

    python benchmarks/saved_activations.py [--tokens 1024] [--out benchmarks/results]

What autograd saves (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, the model's own weights
left out) does not depend on the
device, so the effect of an option on activation memory is measured here exactly, without a GPU. The model is the
Llama-3.2-1B shape with one and with two decoder layers (their difference is what each layer saves), bf16 weights,
LoRA r=16 alpha=32 on every linear layer (fp32 LoRA weights, PEFT's default), bf16 autocast as TRL trains, and
TRL's fused LM head (the full logits are never saved). Paths: PEFT's LoRA forward (stock), align's `fused_lora`,
`compile` (each decoder layer through torch.compile: the partitioner's choice of what to save, made here by
inductor on the CPU) and both, each with LoRA dropout 0 and 0.05 (what every shipped recipe uses). Attention saves only q, k and v (SDPA under
checkpoint, as the GPU's flash kernel keeps no attention matrix), the same in every path.
Writes `<out>/saved_activations_cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)


def qkv_saving_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA that saves only its inputs (q, k, v) and recomputes the rest in the backward, as the GPU's flash kernel
    does (it saves q, k, v, the output and the log-sum-exp); SDPA's CPU kernel would save the attention matrix."""
    from torch.utils.checkpoint import checkpoint
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return checkpoint(sdpa_attention_forward, module, query, key, value, attention_mask, use_reentrant=False,
                      **kwargs)


def saved_mib(layers: int, tokens: int, dropout: float, fused: bool, compiled: bool = False,
              memory_budget: float | None = None, grouped: bool = False) -> float:
    import transformers
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from align import fused_lora, speed

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, **LLAMA_1B)
    transformers.AttentionInterface.register("saves_qkv", qkv_saving_attention)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="saves_qkv").to(torch.bfloat16)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what TRL's SFTTrainer installs
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"))
    if fused:
        fused_lora.use_fused_lora(model)
    if grouped:  # `group_lora`: q/k/v and gate/up as one op each (works inside the compiled layers)
        from align import grouped_lora

        grouped_lora.group_lora(model)
    if compiled:
        torch._dynamo.reset()  # the layers of every model share one code object: compile afresh for this budget
        speed.compile_layers(model.get_base_model(), memory_budget=memory_budget)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if compiled:  # compile (and its own saved tensors) outside the count
            model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.sum().backward()
        return saved_activation_mib(model, lambda: model(input_ids=ids, labels=ids, fused_lm_head=True))


def saved_storages(model, forward) -> dict:
    """What autograd saves for the backward while `forward()` runs, per storage (`model`'s own weights and buffers
    left out: saved too, but resident anyway, e.g. the FP8 layers' transposed weights, `align/fp8.py`): data pointer
    -> (the storage's bytes, the bytes of the distinct views saved from it). The output is held until counted: its
    graph keeps them alive."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    views: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            views.setdefault(storage.data_ptr(), (storage.nbytes(), {}))[1][
                (t.storage_offset(), tuple(t.shape), t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return {ptr: (nbytes, sum(v.values())) for ptr, (nbytes, v) in views.items()}


def saved_activation_mib(model, forward) -> float:
    """MiB that autograd saves for the backward while `forward()` runs, each storage once (`saved_storages`)."""
    return sum(nbytes for nbytes, _ in saved_storages(model, forward).values()) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--lean_budgets", default=None, help="comma list: instead of the four paths, `compile,fused_lora` "
                   "with `lean` at each budget (and without lean), dropout 0; writes saved_activations_lean_cpu.json")
    p.add_argument("--group_lora", action="store_true", help="with --lean_budgets: each compiled path also with "
                   "`group_lora`; writes saved_activations_group_cpu.json")
    args = p.parse_args(argv)
    runs = []
    paths = {"stock PEFT": (False, False, None), "align fused_lora": (True, False, None),
             "align compile": (False, True, None), "align compile,fused_lora": (True, True, None)}
    dropouts = (0.0, 0.05)
    if args.lean_budgets:
        paths = {"stock PEFT": (False, False, None), "align compile,fused_lora": (True, True, None), **{
            f"align compile,fused_lora,lean@{b}": (True, True, float(b)) for b in args.lean_budgets.split(",")}}
        dropouts = (0.0,)
        if args.group_lora:
            paths.update({f"{k},group_lora": (*v, True) for k, v in paths.items() if v[1]})
    for dropout in dropouts:
        for path, (fused, compiled, budget, *grouped) in paths.items():
            t0 = time.time()
            one, two = (saved_mib(n, args.tokens, dropout, fused, compiled, budget, bool(grouped))
                        for n in (1, 2))
            run = {"path": path, "lora_dropout": dropout,
                   "per_layer_mib": round(two - one, 2), "outside_layers_mib": round(2 * one - two, 2),
                   "16_layers_gib": round((2 * one - two + 16 * (two - one)) / 1024, 3)}
            runs.append(run)
            print(f"{run['path']:>24}  dropout {dropout:<4}  per layer {run['per_layer_mib']:8.1f} MiB  outside "
                  f"{run['outside_layers_mib']:7.1f} MiB  16 layers {run['16_layers_gib']:6.2f} GiB  "
                  f"({time.time() - t0:.0f} s)", flush=True)
    stock = {r["lora_dropout"]: r for r in runs if r["path"] == "stock PEFT"}
    for r in runs:
        r["per_layer_vs_stock"] = round(r["per_layer_mib"] / stock[r["lora_dropout"]]["per_layer_mib"], 4)
    result = {"meta": {"shape": "Llama-3.2-1B (1 and 2 decoder layers: per-layer and outside-layer bytes)",
                       "tokens": args.tokens, "lora": "r16 a32 all-linear",
                       "dtype": "bf16 weights, fp32 LoRA weights, bf16 autocast", "head": "TRL fused LM head",
                       "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "note": "bytes autograd saves for the backward in one forward, each storage once (CPU; "
                               "attention saves q, k, v as flash attention does on a GPU)"},
              "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    name = ("saved_activations_group_cpu.json" if args.group_lora else "saved_activations_lean_cpu.json") \
        if args.lean_budgets else "saved_activations_cpu.json"
    path = os.path.join(args.out, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
