"""What the `fp8` speedup does to a real model's numbers: SmolLM2-135M-Instruct on the repo's SFT rows, the
assistant tokens' loss, the per-sequence log-probability (what DPO's log-ratios are made of) and the KL between
the next-token distributions, with the base layers in their dtype and in FP8 (`align/fp8.py`). For scale, two
more variants change the weights only: their e4m3 round trip (FP8's weight share of the error) and their NF4 round
trip (bitsandbytes, block 64, double quantization: what a QLoRA base computes with). Besides the forward numbers,
the first step's LoRA gradients (one backward of the same loss over all rows; LoRA B, as A gets none while B is
zero) as cosines to the reference's: what an optimizer step sees (on random weights, FP8's gradients drift with the
width: `fp8_grad_drift.py`).

    python benchmarks/fp8_numerics.py --rows 32 --out benchmarks/results/fp8_numerics_cpu.json

On a CPU the model runs in fp32 (the reference) and the FP8 path quantizes from it; on a GPU, bf16 against FP8.
Speed is not measured here (throughput.py does that).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def scored_rows(tokenizer, path: str, n: int, max_length: int):
    """(ids, assistant-token mask) of the first `n` rows of `path` (any format align reads), chat-templated."""
    import torch

    from align import data

    rows = []
    for record in data.read_records(path)[:n]:
        messages = data.to_messages(record)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][:max_length]
        mask = torch.zeros(len(full), dtype=torch.bool)
        mask[len(prompt):] = True
        rows.append((torch.tensor(full), mask))
    return rows


def measure(model, rows, device):
    """Per row: (sum of assistant-token log-probs, their count, next-token log-distributions at those tokens)."""
    import torch

    out = []
    with torch.no_grad():
        for ids, mask in rows:
            logits = model(input_ids=ids[None].to(device)).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1)
            target, keep = ids[1:].to(device), mask[1:].to(device)
            token = logp.gather(-1, target[:, None])[:, 0][keep]
            out.append((token.sum().item(), int(keep.sum()), logp[keep].cpu()))
    return out


def lora_gradients(model, rows, device) -> dict:
    """The LoRA gradients of the assistant tokens' mean negative log-likelihood over `rows` (one backward per row,
    summed), fp32 on the CPU, by parameter name; parameters whose gradient is zero (LoRA A at step 1) left out."""
    import torch

    tokens = sum(int(mask[1:].sum()) for _, mask in rows)
    model.zero_grad(set_to_none=True)
    for ids, mask in rows:
        logits = model(input_ids=ids[None].to(device)).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None].to(device))[:, 0]
        (-logp[mask[1:].to(device)].sum() / tokens).backward()
    return nonzero_gradients(model)


def nonzero_gradients(model) -> dict:
    """The model's gradients, fp32 on the CPU, by parameter name; those that are zero or missing left out."""
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


def gradient_cosines(got: dict, want: dict) -> dict:
    """min / median over parameters of the cosine between two runs' gradients (`lora_gradients`), and the
    parameter with the smallest; a parameter with a gradient in one run only counts as 0."""
    import torch.nn.functional as F

    cos = {n: (F.cosine_similarity(got[n].flatten(), g.flatten(), dim=0).item() if n in got else 0.0)
           for n, g in want.items()}
    worst = min(cos, key=cos.get)
    return {"parameters": len(cos), "min": round(cos[worst], 4), "median": round(statistics.median(cos.values()), 4),
            "min_parameter": worst}


def round_trip_weights(model, kind: str) -> int:
    """Replace every LoRA base weight by its e4m3 (row scales) or NF4 round trip, in place; returns how many."""
    import torch
    from peft.tuners.lora import LoraLayer

    from align import fp8

    count = 0
    with torch.no_grad():
        for module in model.modules():
            base = getattr(module, "base_layer", None)
            if not isinstance(module, LoraLayer) or fp8.convertible(base) is not None:
                continue
            w = base.weight
            if kind == "fp8_weights_only":
                q, scale = fp8.quantize_rows(w)
                w.copy_(q.float() * scale)
            else:
                from bitsandbytes.functional import dequantize_4bit, quantize_4bit

                packed, state = quantize_4bit(w.data.to(torch.bfloat16), blocksize=64, quant_type="nf4",
                                              compress_statistics=True)
                w.copy_(dequantize_4bit(packed, state).to(w.dtype))
            count += 1
    return count


def main(argv=None):
    import torch

    from align import config, fp8, modeling, stacking

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, ".cache/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--data", default=os.path.join(REPO, "data/sft/llama_factory_alpaca_en_demo.json"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/fp8_numerics_cpu.json"))
    ap.add_argument("--no_gradients", dest="gradients", action="store_false",
                    help="forward numbers only (the gradient cosines take a backward per row and variant)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bfloat16" if cuda else "float32"
    model_args = config.ModelArguments(model_name_or_path=args.model, dtype=dtype, use_peft=True,
                                       lora_target_modules=["all-linear"], lora_dropout=0.0)
    tokenizer = modeling.load_tokenizer(model_args)
    rows = scored_rows(tokenizer, args.data, args.rows, args.max_length)
    results, grads = {}, {}
    # bf16 against the fp32 reference (CPU only: the GPU's reference is bf16) is the scale of plain rounding
    variants = ("plain", "fp8", "fp8_weights_only", "nf4_weights_only") + (() if cuda else ("bf16",))
    for name in variants:
        torch.manual_seed(0)  # the same LoRA A in every variant: their B gradients are comparable
        model = stacking.attach_trainable_adapter(modeling.load_model(model_args, training=False), model_args)
        model.to(device).eval()  # LoRA B starts at zero: the base model's outputs
        if name == "bf16":
            model.to(torch.bfloat16)
        layers = fp8.use_fp8(model) if name == "fp8" else round_trip_weights(model, name) if "only" in name else 0
        results[name] = measure(model, rows, device)
        if args.gradients:
            grads[name] = lora_gradients(model, rows, device)
        print(f"[fp8_numerics] {name}: {layers} layers changed", flush=True)
    plain = results["plain"]
    tokens = sum(n for _, n, _ in plain)
    loss = -sum(s for s, _, _ in plain) / tokens
    summary = {
        "model": os.path.basename(args.model.rstrip("/")), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "reference_dtype": dtype, "rows": len(rows), "assistant_tokens": tokens, "loss_plain": round(loss, 5),
        "versions": {"torch": torch.__version__},
    }
    for name, got in results.items():
        if name == "plain":
            continue
        other = -sum(s for s, _, _ in got) / tokens
        seq_diff = [abs(a[0] - b[0]) for a, b in zip(plain, got)]
        kl = torch.cat([torch.sum(a[2].exp() * (a[2] - b[2]), -1) for a, b in zip(plain, got)])
        summary[name] = {
            "loss": round(other, 5), "loss_relative_difference": round((other - loss) / loss, 5),
            "sequence_logprob_abs_difference": {"median": round(statistics.median(seq_diff), 4),
                                                "max": round(max(seq_diff), 4)},
            "next_token_kl": {"mean": float(f"{kl.mean().item():.3e}"), "max": float(f"{kl.max().item():.3e}")},
        }
        if grads:
            summary[name]["lora_gradient_cosine"] = gradient_cosines(grads[name], grads["plain"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, args.out)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
