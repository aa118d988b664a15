"""The LM head of one training step, TRL's `ChunkedLogProbFunction` against align's `head_grad` (gradient built in
the forward), side by side in one process: time of forward + backward, matmul FLOPs and the largest difference
of the hidden-state gradient, per model shape. CPU: fp32; CUDA: bf16 (what training runs).

    python benchmarks/head_grad.py --shapes smollm2,1b --tokens 1024 --repeats 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {"smollm2": (576, 49152), "1b": (2048, 128256), "8b": (4096, 128256)}  # (hidden, vocab)
_MM = {torch.ops.aten.mm.default, torch.ops.aten.mm.out}
_ADDMM = {torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default, torch.ops.aten.addmm.out}


class MatmulFlops(TorchDispatchMode):
    """2 m n k of every matmul that runs under it (torch's FlopCounterMode skips the in-place `addmm_` that both
    heads accumulate with)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MM or func in _ADDMM:
            a, b = args[:2] if func in _MM else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def heads():
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

    from align import head_grad

    outputs = ("log_probs", "entropy", "is_top1")  # what TRL's SFT trainer asks for
    return {
        "trl": lambda h, w, t: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, chunk, None, 1.0, outputs),
        "head_grad": lambda h, w, t: head_grad.log_probs(h, w, None, t, chunk, outputs),
    }


def step(fn, hidden, weight, targets, grad_out):
    hidden.grad = None
    fn(hidden, weight, targets)[0].backward(grad_out)
    return hidden.grad


def measure(shape: str, tokens: int, repeats: int, device: torch.device) -> dict:
    hidden_size, vocab = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5).to(device, dtype)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    grad_out = -torch.ones(tokens, device=device) / tokens  # d loss / d log p of a mean NLL
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"shape": shape, "hidden": hidden_size, "vocab": vocab, "tokens": tokens, "dtype": str(dtype),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    grads = {}
    for name, fn in heads().items():
        with MatmulFlops() as counter:
            grads[name] = step(fn, hidden, weight, targets, grad_out).float()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            step(fn, hidden, weight, targets, grad_out)
            sync()
            times.append(time.perf_counter() - t0)
        result[name] = {"ms": round(1000 * statistics.median(times), 2), "matmul_gflop": round(counter.flops / 1e9, 3)}
    result["speedup"] = round(result["trl"]["ms"] / result["head_grad"]["ms"], 3)
    result["flop_ratio"] = round(result["head_grad"]["matmul_gflop"] / result["trl"]["matmul_gflop"], 4)
    diff = (grads["head_grad"] - grads["trl"]).norm() / grads["trl"].norm()
    result["grad_rel_diff"] = float(f"{diff.item():.2e}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm2,1b")
    ap.add_argument("--tokens", type=int, default=1024, help="trained tokens in the batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for head_grad_<device>.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [measure(s, args.tokens, args.repeats, device) for s in args.shapes.split(",")]
    for r in rows:
        print(f"{r['shape']:>8} {r['tokens']} tokens ({r['dtype']}, {r['device']}): TRL {r['trl']['ms']} ms, "
              f"head_grad {r['head_grad']['ms']} ms ({r['speedup']}x), matmul FLOPs x{r['flop_ratio']}, "
              f"gradient rel. diff {r['grad_rel_diff']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = "cpu" if device.type == "cpu" else "".join(c if c.isalnum() else "_" for c in rows[0]["device"])[:24]
        path = os.path.join(args.out, f"head_grad_{tag.lower()}.json")
        with open(path, "w") as fh:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "rows": rows}, fh, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
