"""What the GPU's own bf16 GEMMs allow a LoRA training step: every base-weight GEMM of one step of a shape (each
linear layer's forward and its input-gradient GEMM; a frozen base has no weight gradient), timed alone with
cuBLAS through `torch.mm`, against issue 6's arithmetic limit (4 x parameters + attention at 790 TFLOP/s).

    python benchmarks/gemm_ceiling.py --shapes 1b,8b --out benchmarks/results        # on the GPU
    python benchmarks/gemm_ceiling.py --shapes tiny --reps 2 --out /tmp/x            # CPU smoke run

Per shape: each GEMM's (m, k, n), its time and TFLOP/s, the step's base-GEMM time summed (`gemm_floor_ms`), the
tokens/s a step could reach if nothing but those GEMMs ran (`gemm_only_tokens_per_s`) and that as a share of the
arithmetic limit; also one large square GEMM (`square_tflops`, the card's practical peak). LoRA's rank-16 GEMMs,
attention, norms, the loss and the optimizer come on top of the floor. Writes `<out>/gemm_ceiling_<gpu>.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from align.manifest import write_json_atomic  # noqa: E402
from throughput import PEAK_TFLOPS, SHAPES, flops_per_token, gpu_tag  # noqa: E402


def linear_shapes(config: dict) -> list[tuple[str, int, int]]:
    """(name, in, out) of a decoder layer's linear layers: q, k, v, o, gate, up, down."""
    d, f = config["hidden_size"], config["intermediate_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    return [("q_proj", d, d), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", d, d), ("gate_proj", d, f),
            ("up_proj", d, f), ("down_proj", f, d)]


def step_gemms(config: dict, tokens: int) -> list[dict]:
    """The base-weight GEMMs of one LoRA training step over `tokens` tokens: per linear layer of every decoder layer
    (q, k, v, o, gate, up, down) and the LM head, the forward `(tokens, in) @ (in, out)` and the input gradient
    `(tokens, out) @ (out, in)`, with how many times each runs a step."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    out = []
    for name, i, o in linear_shapes(config):
        out.append(dict(name=f"{name} forward", m=tokens, k=i, n=o, count=layers))
        out.append(dict(name=f"{name} input gradient", m=tokens, k=o, n=i, count=layers))
    v = config["vocab_size"]
    out.append(dict(name="lm_head forward", m=tokens, k=d, n=v, count=1))
    out.append(dict(name="lm_head input gradient", m=tokens, k=v, n=d, count=1))
    return out


def median_seconds(torch, fn, device: str, reps: int, warmup: int = 3) -> float:
    """Seconds per call of `fn` (median of `reps` calls after `warmup`; CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def time_mm(torch, m: int, k: int, n: int, device: str, reps: int) -> float:
    """Seconds per `(m, k) @ (k, n)` bf16 GEMM (median of `reps` timed after 3 warm-up calls)."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(m, n, device=device, dtype=torch.bfloat16)
    return median_seconds(torch, lambda: torch.mm(a, b, out=c), device, reps)


def measure(shape: str, device: str, reps: int) -> dict:
    import torch

    spec = SHAPES[shape]
    tokens, seq = spec["batch"] * spec["seq"], spec["seq"]
    rows, floor = [], 0.0
    for g in step_gemms(spec["config"], tokens):
        s = time_mm(torch, g["m"], g["k"], g["n"], device, reps)
        flops = 2.0 * g["m"] * g["k"] * g["n"]
        rows.append(dict(g, ms=s * 1000, tflops=flops / s / 1e12))
        floor += s * g["count"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = PEAK_TFLOPS.get(gpu_tag(name))
    limit = peak * 1e12 / flops_per_token(spec["config"], seq) if peak else None
    gemm_flops = sum(2.0 * r["m"] * r["k"] * r["n"] * r["count"] for r in rows)
    only = tokens / floor
    return dict(shape=shape, tokens_per_step=tokens, gemms=rows, gemm_floor_ms=floor * 1000,
                gemm_tflops=gemm_flops / floor / 1e12, gemm_only_tokens_per_s=only, limit_tokens_per_s=limit,
                gemm_only_limit_share=only / limit if limit else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--square", type=int, default=8192, help="side of the square GEMM timed as the card's peak")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    s = args.square
    square = 2.0 * s**3 / time_mm(torch, s, s, s, device, args.reps) / 1e12
    shapes = [measure(x, device, args.reps) for x in args.shapes.split(",")]
    for r in shapes:
        share = r["gemm_only_limit_share"]
        print(f"[gemm_ceiling] {r['shape']}: base GEMMs {r['gemm_floor_ms']:.1f} ms a step at "
              f"{r['gemm_tflops']:.0f} TFLOP/s -> {r['gemm_only_tokens_per_s']:,.0f} tokens/s if nothing else ran"
              + (f" ({share:.0%} of the limit)" if share else ""), flush=True)
    print(f"[gemm_ceiling] square {s}: {square:.0f} TFLOP/s", flush=True)
    result = dict(meta=dict(device=name, torch=torch.__version__, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                            reps=args.reps, peak_tflops=PEAK_TFLOPS.get(gpu_tag(name))),
                  square=dict(side=s, tflops=square), shapes=shapes)
    path = os.path.join(args.out, f"gemm_ceiling_{gpu_tag(name)}.json")
    write_json_atomic(path, result)
    print(f"[gemm_ceiling] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
