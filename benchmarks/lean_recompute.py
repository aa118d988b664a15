"""What `lean` recomputes: the forward ops a compiled decoder layer re-runs in its backward, and the tensors it saves,
at each activation memory budget. The partitioner's choice depends on shapes and cost estimates, not on the device,
so it is made here on the CPU with the GPU's shapes.

    python benchmarks/lean_recompute.py [--shape 1b|8b] [--rows 4 --seq 2048] [--budgets 0.5,0.55,0.65,0.8,1.0]
        [--accumulate op_ab] [--lora_dropout 0.05] [--group_lora] [--out DIR]

One decoder layer of Llama-3.2-1B, or with `--shape 8b` of Llama-3.1-8B (its vocabulary cut to 1,000: the head is
outside the compiled layer), bf16, LoRA r16 on every linear layer, align's `fused_lora`, compiled by
`speed.compile_layers` with each budget, `rows` x `seq` tokens (the throughput cases: 4 x 2048, 8B 2 x 2048). The CPU's flash
attention kernel has no flop formula in torch (the partitioner would count it as free and always recompute it); it
is given the GPU kernels' formula (`sdpa_flop_count`), so the choice is the one the GPU's partitioner makes. Counts
per layer: GEMMs (mm/addmm, and fused_lora's base+LoRA op as one) and attention forwards in the backward graph beyond what the backward itself needs (a
backward with nothing recomputed has `bw_gemms_none`), and the saved activations in MiB (weights left out).
Writes `<out>/lean_recompute[_8b][_ACCUMULATE][_dropoutP]_cpu.json`.
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

from align.manifest import write_json_atomic  # noqa: E402
from saved_activations import LLAMA_1B  # noqa: E402
from throughput import LLAMA_8B as THROUGHPUT_8B  # noqa: E402

# Llama-3.1-8B's layer as the throughput benchmark builds it, its vocabulary cut to 1,000
LLAMA_8B = {k: v for k, v in THROUGHPUT_8B.items() if k != "num_hidden_layers"} | {"vocab_size": 1000}
LAYERS = {"1b": (LLAMA_1B, 4), "8b": (LLAMA_8B, 2)}  # the layer's config, rows of 2048 in its throughput case

_ATTN_FWD = "_scaled_dot_product_flash_attention_for_cpu.default"


def _attention_flops_as_on_gpu() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op.default not in flop_registry and op not in flop_registry:
        @register_flop_formula(op)
        def _flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query_shape, key_shape, value_shape)


def partition(budget: float, rows: int, seq: int, accumulate: str = "addmm", lora_dropout: float = 0.0,
              shape: str = "1b", group: bool = False) -> dict:
    """Compile one layer at `budget` and read the partitioner's forward and backward graphs."""
    import torch._functorch.config as functorch
    import torch._functorch.partitioners as partitioners
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as inductor
    import transformers
    from peft import LoraConfig, get_peft_model

    from align import fused_lora, grouped_lora, speed

    graphs = []
    original = partitioners.min_cut_rematerialization_partition

    def spy(joint, inputs, **kwargs):
        fw, bw = original(joint, inputs, **kwargs)
        graphs.append((fw, bw))
        return fw, bw

    torch._dynamo.reset()
    inductor.fx_graph_cache, functorch.enable_autograd_cache = False, False  # partition afresh for each budget
    before = fused_lora.COMPILED_ACCUMULATE
    homes = [m for m in (partitioners, compile_fx) if hasattr(m, "min_cut_rematerialization_partition")]
    for m in homes:  # inductor calls it from its own namespace
        m.min_cut_rematerialization_partition = spy
    try:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(num_hidden_layers=1, **LAYERS[shape][0])
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules="all-linear"))
        fused_lora.use_fused_lora(model)
        fused_lora.COMPILED_ACCUMULATE = accumulate
        if group:  # q/k/v and gate/up as one op each (`group_lora`, in a GPU's auto)
            grouped_lora.group_lora(model)
        speed.compile_layers(model.get_base_model(), memory_budget=budget)
        model.train()
        ids = torch.randint(0, 1000, (rows, seq), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        fused_lora.COMPILED_ACCUMULATE = before
        for m in homes:
            m.min_cut_rematerialization_partition = original
    fw, bw = graphs[-1]

    def count(graph, *names):
        return sum(1 for n in graph.graph.nodes if n.op == "call_function"
                   and any(str(n.target).endswith(x) for x in names))

    out = next(n for n in fw.graph.nodes if n.op == "output").args[0]
    params = {n.name for n in fw.graph.nodes if n.op == "placeholder"} - {"primals_1"}  # weights; primals_1: x
    saved = {}
    for a in out[1:]:
        val = getattr(a, "meta", {}).get("val")
        if isinstance(val, torch.Tensor) and a.name not in params and val.numel() >= seq:
            saved[a.name] = [list(val.shape), round(val.numel() * val.element_size() / 2**20, 2)]
    return dict(budget=budget, bw_gemms=count(bw, "mm.default", "addmm.default", "lora_linear.default",
                                              "lora_linear_ab.default", "lora_linear_ab_backward.default"),
                bw_attention_forwards=count(bw, _ATTN_FWD), saved_mib=round(sum(v[1] for v in saved.values()), 1),
                saved=saved)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(LAYERS), default="1b")
    p.add_argument("--rows", type=int, default=None, help="rows of --seq tokens (default: the shape's case)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--budgets", default="0.5,0.55,0.65,0.8,1.0")
    p.add_argument("--accumulate", default="addmm", choices=("addmm", "op", "op_ab"),
                   help="fused_lora.COMPILED_ACCUMULATE: how the compiled layer adds the LoRA product")
    p.add_argument("--lora_dropout", type=float, default=0.0,
                   help="LoRA dropout (the shipped recipes' 0.05): its keep-masks are saved, one byte an element")
    p.add_argument("--group_lora", action="store_true",
                   help="q/k/v and gate/up LoRA layers as one op each (align/grouped_lora.py; a GPU's auto)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    _attention_flops_as_on_gpu()
    rows = args.rows or LAYERS[args.shape][1]
    runs = []
    for b in (float(x) for x in args.budgets.split(",")):
        t0 = time.time()
        runs.append(dict(partition(b, rows, args.seq, args.accumulate, args.lora_dropout, args.shape,
                                   args.group_lora),
                         accumulate=args.accumulate, group_lora=args.group_lora,
                         lora_dropout=args.lora_dropout))
        r = runs[-1]
        print(f"budget {b:<5} backward GEMMs {r['bw_gemms']:3d}  attention forwards in the backward "
              f"{r['bw_attention_forwards']}  saved {r['saved_mib']:8.1f} MiB a layer  ({time.time() - t0:.0f} s)",
              flush=True)
    least = min(r["bw_gemms"] for r in runs)
    for r in runs:
        r["recomputed_gemms"] = r["bw_gemms"] - least
    model = {"1b": "Llama-3.2-1B", "8b": "Llama-3.1-8B"}[args.shape]
    result = {"meta": {"shape": f"one {model} decoder layer, LoRA r16 all-linear, fused_lora, compiled",
                       "tokens": f"{rows} x {args.seq}", "torch": torch.__version__,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "note": "recomputed_gemms: backward GEMMs beyond the fewest over the budgets (the backward's "
                               "own); attention given the GPU kernels' flop formula"},
              "runs": runs}
    name = "lean_recompute" + ("" if args.shape == "1b" else "_" + args.shape) + (
        "" if args.accumulate == "addmm" else "_" + args.accumulate)
    name += ("_grouped" if args.group_lora else "") + (f"_dropout{args.lora_dropout:g}" if args.lora_dropout else "")
    path = os.path.join(args.out, name + "_cpu.json")
    write_json_atomic(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
