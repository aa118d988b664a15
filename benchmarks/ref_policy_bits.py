"""Does a compiled LoRA model's reference forward (adapters off, no grad) give the policy's bits at B = 0?

DPO's first loss is log 2 exactly when they do (stock TRL + PEFT in eager mode: always). Five forwards of one
random batch through a model of the named shape, LoRA r16 on all linear layers with B = 0, `fused_lora` and each
decoder layer compiled (`speed.compile_layers`):
- the policy with grad (the training graph) and without (an inference graph with the LoRA ops);
- the reference as DPO ran it before Call27 (adapters off, no grad: an inference graph without them);
- the policy with grad again (the same graph twice: are its kernels deterministic?);
- the reference as DPO runs it with `compile` (`dpo.QuickReferenceSwitch`: `AdapterSwitch.stand_in(None)`, grad
  on, the policy's graph with B = 0).
Prints whether each pair of last hidden states is bitwise equal and their largest difference, with or without
`--deterministic` (inductor's `deterministic` mode: no on-device benchmarking of configs that change numerics).

    python benchmarks/ref_policy_bits.py --layers 4 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def last_hidden(model, ids, grad: bool, adapters: bool, stand_in: bool = False):
    import contextlib

    import torch

    from align.stacking import AdapterSwitch

    off = contextlib.nullcontext() if adapters else model.disable_adapter()
    if stand_in:
        off = AdapterSwitch.for_model(model).stand_in(None)
    with torch.set_grad_enabled(grad), off, torch.autocast(ids.device.type, dtype=torch.bfloat16):
        return model.base_model.model.model(input_ids=ids).last_hidden_state.detach().float()


def compare(args) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from align import fused_lora, speed
    from benchmarks.throughput import SHAPES

    import torch._inductor.config as inductor
    inductor.deterministic = args.deterministic
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = dict(SHAPES[args.shape]["config"], num_hidden_layers=args.layers)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg), dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    fused_lora.use_fused_lora(model)
    speed.compile_layers(model.base_model.model, memory_budget=args.budget)
    ids = torch.randint(0, cfg["vocab_size"], (1, args.tokens), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    out = {"policy_grad": last_hidden(model, ids, True, True), "policy_nograd": last_hidden(model, ids, False, True),
           "reference": last_hidden(model, ids, False, False), "policy_grad_again": last_hidden(model, ids, True, True),
           "reference_stand_in": last_hidden(model, ids, True, True, stand_in=True)}
    pairs = (("policy_grad", "policy_nograd"), ("policy_nograd", "reference"), ("policy_grad", "reference"),
             ("policy_grad", "policy_grad_again"), ("policy_grad", "reference_stand_in"))
    return {f"{a} vs {b}": {"equal": bool(torch.equal(out[a], out[b])),
                            "max_abs_diff": float((out[a] - out[b]).abs().max())} for a, b in pairs}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.2, help="lean's activation memory budget (DPO's default)")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    result = dict(vars(args), pairs=compare(args))
    print(json.dumps(result, indent=1))
    if args.out:
        from align.manifest import write_json_atomic

        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
