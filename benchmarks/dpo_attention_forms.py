"""DPO's shared-prompt attention in several forms, forward + backward timed alone.

    python benchmarks/dpo_attention_forms.py [--shapes 1b,8b] [--prompt 1024] [--completion 1024] [--out DIR]

Why: in the 1B DPO step attention took 50.5 of 262 busy ms on an H100 (Call23's profile), run by torch's
flash-varlen (FlashAttention-2) at about 210-230 TFLOP/s, where SFT's equal samples go through one batched SDPA
call that picks cuDNN's Hopper kernel at about 320-350 (benchmarks/README.md). This times the candidates on their own
before any is built into `align.packed_attention`.

The row is what `shared_prompt` packs: `pairs` x (prompt | chosen | rejected), the throughput cases' shapes (1B: 4
pairs, 32 query / 8 key heads of 64; 8B: 2 pairs, 32 / 8 heads of 128). Forms:
- `varlen`: align's path (`packed_attention._varlen_attention` with the layout `shared_prompt` sets): per pair a
  prompt+chosen segment on its own keys and a rejected segment on the prompt's keys and its own, lower-right causal,
  all in one flash-varlen call.
- `dense_<backend>` (`cudnn`, `flash`, `efficient`): stock's layout, `[prompt | chosen]` and `[prompt | rejected]` as
  2 x pairs causal sequences gathered from the row (the prompt's queries computed twice; equal completion lengths
  only), one batched SDPA call with that backend forced, the key heads through `enable_gqa`; the rejected sequences'
  prompt outputs dropped. This is the `dense_pairs` option's op (`packed_attention.DENSE_PAIRS`, in `auto` on a GPU
  since Call32; whole steps without it: `throughput.py --align_variants` with the options less `dense_pairs`).
- `dense_<backend>_repeat`: the same with the key/value heads repeated to the query heads (Call32's first form;
  Call32's results files name the two `dense_<backend>` and `dense_<backend>_gqa`).
Reported per form: ms for a forward and backward (gradients of q, k and v), TFLOP/s of the form's own work and of
the work varlen does (pairs of query and visible key x 4 x heads x dim forward, 2.5x that backward), and the largest
difference from varlen's output. A form that cannot run (a backend refusing the shape) records its error.
On a CPU (tiny shapes, for tests): varlen through align.testing's stand-in, the dense forms through SDPA's math.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from align import packed_attention  # noqa: E402
from align.manifest import write_json_atomic  # noqa: E402
from gemm_ceiling import median_seconds  # noqa: E402
from throughput import gpu_tag  # noqa: E402

SHAPES = {"1b": dict(pairs=4, heads=32, kv_heads=8, dim=64), "8b": dict(pairs=2, heads=32, kv_heads=8, dim=128),
          "tiny": dict(pairs=2, heads=4, kv_heads=2, dim=8)}
BACKENDS = ("cudnn", "flash", "efficient")


def visible_pairs(segments) -> int:
    """Query-key pairs a lower-right causal layout computes (each query sees the keys up to its own position)."""
    total = 0
    for q0, q1, kv in segments:
        lq, lk = q1 - q0, sum(b - a for a, b in kv)
        total += sum(lk - lq + i + 1 for i in range(lq))
    return total


def varlen_form(q, k, v, segments):
    """align's path: the row's segments in one flash-varlen call."""
    packed_attention.set_layout(segments, q.shape[2])
    try:
        return packed_attention._varlen_attention(q, k, v, q.shape[-1] ** -0.5,
                                                  packed_attention._varlen_args(q.device))
    finally:
        packed_attention.set_layout(None)


def dense_form(q, k, v, plan, backend: str | None, repeat_heads: bool = False):
    """Stock's layout in one batched causal SDPA call (`packed_attention.DENSE_PAIRS`' op; `backend` forced, None:
    SDPA's math; `repeat_heads`: the key heads repeated to the query heads rather than through `enable_gqa`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, None: SDPBackend.MATH}
    with sdpa_kernel(kinds[backend]):
        return packed_attention._pairs_attention(q, k, v, q.shape[-1] ** -0.5, plan, repeat_heads=repeat_heads)


def make(shape: dict, prompt: int, completion: int, device: str, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = shape["pairs"] * (prompt + 2 * completion)
    new = lambda h: torch.randn(1, h, t, shape["dim"], generator=g).to(device, dtype).requires_grad_()
    return new(shape["heads"]), new(shape["kv_heads"]), new(shape["kv_heads"])


def forms(device: str) -> list[str]:
    dense = [f"dense_{b}" for b in BACKENDS] if device == "cuda" else ["dense_math"]
    return ["varlen"] + dense + [f"{f}_repeat" for f in dense]


def run_form(form: str, q, k, v, segments, plan):
    if form == "varlen":
        return varlen_form(q, k, v, segments)
    backend = form.removeprefix("dense_").removesuffix("_repeat")
    return dense_form(q, k, v, plan, None if backend == "math" else backend, repeat_heads=form.endswith("_repeat"))


def measure(name: str, prompt: int, completion: int, device: str, reps: int) -> dict:
    shape = SHAPES[name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = make(shape, prompt, completion, device, dtype)
    segments = packed_attention.pair_segments(shape["pairs"], prompt, completion)
    plan = packed_attention.pair_indices(shape["pairs"], prompt, completion, device)
    grad = torch.randn(1, q.shape[2], shape["heads"], shape["dim"], generator=torch.Generator().manual_seed(1)).to(
        device, dtype)
    unit = 4 * shape["heads"] * shape["dim"] * 3.5  # flops per visible pair, forward + backward
    work = {"varlen": visible_pairs(segments)}
    work["dense"] = 2 * shape["pairs"] * (prompt + completion) * (prompt + completion + 1) // 2
    reference, out = None, {}
    for form in forms(device):
        try:
            o = run_form(form, q, k, v, segments, plan).detach().float()
            if form == "varlen":
                reference = o
            diff = None if reference is None else (o - reference).abs().max().item()

            def step(form=form):  # gradients returned, not accumulated into q / k / v
                torch.autograd.grad(run_form(form, q, k, v, segments, plan), (q, k, v), grad)

            seconds = median_seconds(torch, step, device, reps)
        except Exception as e:  # a backend that refuses the shape: recorded, the others still run
            out[form] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        own = work["varlen" if form == "varlen" else "dense"]
        out[form] = dict(ms=seconds * 1e3, tflops_own_work=own * unit / seconds / 1e12,
                         tflops_varlen_work=work["varlen"] * unit / seconds / 1e12, max_abs_diff_from_varlen=diff)
    return dict(shape=name, **shape, prompt=prompt, completion=completion, tokens=q.shape[2],
                visible_pairs=work, forms=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--completion", type=int, default=1024)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from align import testing

        testing.use_cpu_varlen()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results = [measure(s, args.prompt, args.completion, device, args.reps) for s in args.shapes.split(",")]
    for r in results:
        line = ", ".join(f"{f} {v['ms']:.2f} ms ({v['tflops_varlen_work']:.0f} TFLOP/s of varlen's work)"
                         if "ms" in v else f"{f} {v['error']}" for f, v in r["forms"].items())
        print(f"[dpo_attention_forms] {r['shape']}: {line}", flush=True)
    path = os.path.join(args.out, f"dpo_attention_forms_{gpu_tag(name)}.json")
    write_json_atomic(path, dict(meta=dict(device=name, torch=torch.__version__, reps=args.reps,
                                           time=time.strftime("%Y-%m-%d %H:%M:%S")), shapes=results))
    print(f"[dpo_attention_forms] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
