"""Ways to compute a LoRA linear layer's GEMMs, timed alone per layer shape: what a change to fused LoRA would
save before it is built into the model.

    python benchmarks/lora_gemm_forms.py --shapes 1b,8b --out benchmarks/results      # on the GPU
    python benchmarks/lora_gemm_forms.py --shapes tiny --reps 2 --out /tmp/x          # CPU smoke run

For each linear layer of a shape (q, k, v, o, gate, up, down at the shape's tokens a step, LoRA rank 16), the forward
and the backward (input, A and B gradients; a frozen base) in these forms:

- `base`: the base GEMMs alone (forward and input gradient), the floor.
- `op_ab`: fused LoRA's whole-layer op as `auto` runs it (`align::lora_linear_ab`): the rank-16 product written
  first and the base GEMM accumulated into it; in the backward the input gradient started as `(g @ B) @ A` and the
  base GEMM added into it; `(g @ B).T @ x` and `g.T @ h` for A and B.
- `kcat`: LoRA folded into the base GEMM's inner dimension: `[x | h] @ [W | B].T`, with W kept inside a
  `(out, in + r)` buffer and x written into an `(tokens, in + r)` one (as a producer kernel could write it), so no
  rank-16 product is written and read back; the backward's `g @ [W | B]` gives the base input gradient and `g @ B`
  in one GEMM, then `(g @ B) @ A` is added into the first part in place.

Layers that read one input (q / k / v, gate / up) are also timed as a group (`GROUPS`):
- `separate`: each layer's `op_ab` on the shared x (what the model runs today), summed;
- `grouped`: one `op_ab` over the concatenated weights, `W` (sum of outs, in), `A` (sum of ranks, in) and B
  block-diagonal (sum of outs, sum of ranks): one base GEMM at the group's width and one set of LoRA GEMMs (x read
  once for A), the outputs side by side; B's gradient is the diagonal blocks of `g.T @ h`.

Every form gives the same outputs and gradients (`check_forms`, run before timing). Per shape: ms a step for each
form summed over the layers, each form's excess over `base`, and per group `separate` against `grouped`. Writes
`<out>/lora_gemm_forms_<gpu>.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from align.manifest import write_json_atomic  # noqa: E402
from gemm_ceiling import linear_shapes, median_seconds  # noqa: E402
from throughput import SHAPES, gpu_tag  # noqa: E402

FORMS = ("base", "op_ab", "kcat")
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def make(torch, m: int, i: int, o: int, r: int, device: str, dtype, seed: int = 0) -> dict:
    """One layer's tensors: input x, output gradient g, base weight W, LoRA A (r, i) and B (o, r) (scaling folded)."""
    gen = torch.Generator(device).manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=device) * scale).to(dtype)
    t = dict(x=rand(m, i), g=rand(m, o), w=rand(o, i, scale=i ** -0.5), a=rand(r, i, scale=i ** -0.5),
             b=rand(o, r, scale=r ** -0.5))
    wb = torch.empty(o, i + r, device=device, dtype=dtype)  # W kept inside [W | B]; B written each step
    wb[:, :i], wb[:, i:] = t["w"], t["b"]
    xh = torch.empty(m, i + r, device=device, dtype=dtype)  # x as its producer would write it, h beside it
    xh[:, :i] = t["x"]
    t.update(wb=wb, xh=xh)
    return t


def run(torch, form: str, t: dict) -> tuple:
    """(output, input gradient, A gradient, B gradient) of one layer in `form` (`base`: output and input gradient)."""
    x, g, w, a, b = t["x"], t["g"], t["w"], t["a"], t["b"]
    if form == "base":
        return x @ w.t(), g @ w, None, None
    if form == "op_ab":
        h = x @ a.t()
        out = (h @ b.t()).addmm_(x, w.t())
        gh = g @ b
        gx = (gh @ a).addmm_(g, w)
        return out, gx, gh.t() @ x, g.t() @ h
    if form == "kcat":
        i = x.shape[1]
        xh, wb = t["xh"], t["wb"]
        torch.mm(xh[:, :i], a.t(), out=xh[:, i:])
        h = xh[:, i:]
        out = xh @ wb.t()
        full = g @ wb  # [g @ W | g @ B]
        gx, gh = full[:, :i], full[:, i:]
        gx.addmm_(gh, a)
        return out, gx, gh.t() @ xh[:, :i], g.t() @ h
    raise ValueError(f"unknown form {form!r}; choose from {', '.join(FORMS)}")


def make_group(torch, m: int, i: int, outs: list[int], r: int, device: str, dtype, seed: int = 0) -> dict:
    """Layers on one input x: each layer's tensors (`make`, x shared) and the group's concatenated ones."""
    layers = [make(torch, m, i, o, r, device, dtype, seed=seed + n) for n, o in enumerate(outs)]
    x = layers[0]["x"]
    for t in layers:
        t["x"] = x
    b = torch.zeros(sum(outs), r * len(outs), device=device, dtype=dtype)
    row = 0
    for n, t in enumerate(layers):
        b[row:row + t["b"].shape[0], n * r:(n + 1) * r] = t["b"]
        row += t["b"].shape[0]
    cat = lambda key: torch.cat([t[key] for t in layers])
    return dict(layers=layers, cat=dict(x=x, g=torch.cat([t["g"] for t in layers], 1), w=cat("w"), a=cat("a"), b=b))


def run_group(torch, form: str, group: dict) -> tuple:
    """(outputs side by side, input gradient, A gradients stacked, B gradients stacked) of a group of layers on one
    input: `separate` (each layer's `op_ab`) or `grouped` (one `op_ab` over the concatenated weights)."""
    if form == "separate":
        parts = [run(torch, "op_ab", t) for t in group["layers"]]
        gx = parts[0][1]
        for p in parts[1:]:
            gx = gx + p[1]
        return (torch.cat([p[0] for p in parts], 1), gx, torch.cat([p[2] for p in parts]),
                torch.cat([p[3] for p in parts]))
    if form == "grouped":
        out, gx, ga, gb_full = run(torch, "op_ab", group["cat"])
        r, row, blocks = group["layers"][0]["a"].shape[0], 0, []
        for n, t in enumerate(group["layers"]):
            o = t["b"].shape[0]
            blocks.append(gb_full[row:row + o, n * r:(n + 1) * r])
            row += o
        return out, gx, ga, torch.cat(blocks)
    raise ValueError(f"unknown group form {form!r}; choose from separate, grouped")


def check_forms(torch, device: str = "cpu") -> float:
    """Largest relative difference of any form's outputs and gradients from `op_ab`'s (float64 on a small layer)."""
    t = make(torch, 48, 40, 24, 4, device, torch.float64, seed=1)
    want = run(torch, "op_ab", t)
    worst = 0.0
    got = run(torch, "kcat", t)
    for x, y in zip(got, want):
        worst = max(worst, ((x - y).abs().max() / y.abs().max()).item())
    base = run(torch, "base", t)
    lora_out = (t["x"] @ t["a"].t()) @ t["b"].t()
    worst = max(worst, ((base[0] + lora_out - want[0]).abs().max() / want[0].abs().max()).item())
    group = make_group(torch, 48, 40, [24, 8, 8], 4, device, torch.float64, seed=3)
    for x, y in zip(run_group(torch, "grouped", group), run_group(torch, "separate", group)):
        worst = max(worst, ((x - y).abs().max() / y.abs().max()).item())
    return worst


def measure(torch, shape: str, device: str, reps: int, rank: int = 16) -> dict:
    spec = SHAPES[shape]
    tokens, layers = spec["batch"] * spec["seq"], spec["config"]["num_hidden_layers"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows, step = [], dict.fromkeys(FORMS, 0.0)
    for name, i, o in linear_shapes(spec["config"]):
        t = make(torch, tokens, i, o, rank, device, dtype)
        ms = {f: median_seconds(torch, lambda f=f, t=t: run(torch, f, t), device, reps, warmup=2) * 1000 for f in FORMS}
        rows.append(dict(name=name, m=tokens, k=i, n=o, ms=ms))
        for f in FORMS:
            step[f] += ms[f] * layers
        del t
    shapes = {name: (i, o) for name, i, o in linear_shapes(spec["config"])}
    groups = {}
    for group, names in GROUPS.items():
        t = make_group(torch, tokens, shapes[names[0]][0], [shapes[n][1] for n in names], rank, device, dtype)
        ms = {f: median_seconds(torch, lambda f=f, t=t: run_group(torch, f, t), device, reps, warmup=2) * 1000
              for f in ("separate", "grouped")}
        groups[group] = dict(layers=list(names), ms=ms, saved_ms_per_step=(ms["separate"] - ms["grouped"]) * layers)
        del t
    return dict(shape=shape, tokens=tokens, rank=rank, layers=rows, ms_per_step=step,
                excess_over_base_ms=({f: step[f] - step["base"] for f in FORMS if f != "base"}), groups=groups)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    worst = check_forms(torch)
    if worst > 1e-9:
        raise SystemExit(f"the forms disagree: largest relative difference {worst:.2e}")
    shapes = [measure(torch, s, device, args.reps) for s in args.shapes.split(",")]
    for r in shapes:
        ex = ", ".join(f"{f} +{v:.1f} ms" for f, v in r["excess_over_base_ms"].items())
        print(f"[lora_gemm_forms] {r['shape']}: base GEMMs {r['ms_per_step']['base']:.1f} ms a step; over it: {ex}",
              flush=True)
        saved = ", ".join(f"{g} {v['saved_ms_per_step']:.1f} ms" for g, v in r["groups"].items())
        print(f"[lora_gemm_forms] {r['shape']}: grouped layers save a step: {saved}", flush=True)
    path = os.path.join(args.out, f"lora_gemm_forms_{gpu_tag(name)}.json")
    write_json_atomic(path, dict(meta=dict(device=name, torch=torch.__version__, reps=args.reps, forms_agree=worst,
                                           time=time.strftime("%Y-%m-%d %H:%M:%S")), shapes=shapes))
    print(f"[lora_gemm_forms] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
