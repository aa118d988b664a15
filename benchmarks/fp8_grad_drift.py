"""How far FP8's first-step LoRA gradients drift from a higher precision's on random-weight Llamas, by width: what
the throughput tables' "step-1 grad cosine" column shows for the `fp8` paths (min -0.24 at the 8B shape on an
H200), measured here eagerly (no torch.compile, no fused layers), so the drift is FP8 rounding and not the
compiled path. Each shape is built three times from one seed, in fp32 (the reference), bf16 and bf16 with
`fp8.use_fp8` (row-wise e4m3), with LoRA r16 on all linear layers; one backward of the LM loss on one random batch;
per shape the min and median over the LoRA B gradients of each pair's cosine.

    python benchmarks/fp8_grad_drift.py --shapes 16x512,16x1024,16x2048 --out benchmarks/results/fp8_grad_drift_cpu.json

A shape is LAYERSxHIDDEN (intermediate 4x hidden, heads of 64, 2 key/value heads); --vocab and --seq are shared.
Random weights are a stress case: a real model's gradients are measured by fp8_numerics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fp8_numerics import gradient_cosines, nonzero_gradients  # this folder: sys.path[0] of a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def lora_model(layers: int, hidden: int, vocab: int, dtype, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).to(device)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))


def lora_gradients(model, ids) -> tuple[dict, float]:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return nonzero_gradients(model), out.loss.item()


def drift(layers: int, hidden: int, vocab: int, seq: int, device) -> dict:
    import torch

    from align import fp8

    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1)).to(device)
    grads, losses = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.bfloat16)):
        model = lora_model(layers, hidden, vocab, dtype, device)
        if name == "fp8":
            fp8.use_fp8(model)
        grads[name], losses[name] = lora_gradients(model, ids)
        del model
    return {"layers": layers, "hidden": hidden, "vocab": vocab, "seq": seq, "batch": 2, "losses": losses,
            **{f"{a}_vs_{b}": gradient_cosines(grads[a], grads[b])
               for a, b in (("bf16", "fp32"), ("fp8", "fp32"), ("fp8", "bf16"))}}


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="16x512,16x1024,16x2048", help="LAYERSxHIDDEN, comma-separated")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/fp8_grad_drift_cpu.json"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "versions": {"torch": torch.__version__}, "shapes": []}
    for shape in args.shapes.split(","):
        layers, hidden = (int(v) for v in shape.lower().split("x"))
        results["shapes"].append(drift(layers, hidden, args.vocab, args.seq, device))
        print(f"[fp8_grad_drift] {shape}: {json.dumps(results['shapes'][-1])}", flush=True)
        tmp = args.out + ".tmp"  # written after every shape: a run cut short keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=2)
        os.replace(tmp, args.out)
    return results


if __name__ == "__main__":
    main()
