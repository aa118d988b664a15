"""Where DPO's first step stops being log 2: each decoder layer's output in the reference and policy forwards.

At step 1 the policy is its reference (B = 0), so the two forwards of a DPO step must give the same bits and the
loss must be log 2 = 0.6931, as stock TRL + PEFT gives every time. `auto` on an H100 logged 0.57-0.73 at the
Llama-3.1-8B shape in 12-step runs (Call27, Call28) and 0.6931 at 1B; recorded by this script (and by
`throughput.py --step_bits`) the forwards were equal and the loss log 2 every time (Call28). This builds the trainer as `throughput.py` does (the same
worker), takes its first batch and runs the step's loss twice without an update (four forwards: reference,
policy, reference, policy), keeping the embeddings, each decoder layer's output, the final norm's output and the
per-token log-probabilities of every forward. Printed: the loss of each call and, for the pairs (reference,
policy), (reference, reference again), (policy, policy again), the first layer whose output differs and the
largest difference of each recorded tensor.

    python benchmarks/dpo_step_bits.py --shape 8b --path align --out step_bits.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def record_forwards(backbone, speed, limit: int | None = None, light: bool = False):
    """Install recorders on the embeddings, every decoder layer (outside its compiled graph) and the final norm,
    and on align's fused head (`speed`, None: not recorded); returns the list of passes, each a dict name -> tensor
    (a pass begins at the embeddings), the first `limit` passes only when given; `light`: only the packed ids and
    the log-probabilities (a recorder that barely changes the run's memory and timing)."""
    passes = []

    def keep(name, tensor):
        if name == "embed":
            passes.append({})
        wanted = name in ("ids", "log_probs") if light else True
        if wanted and passes and tensor is not None and (limit is None or len(passes) <= limit):
            passes[-1][name] = tensor.detach().float().clone()

    def embed_hook(module, args, out):
        keep("embed", _first(out))
        keep("ids", args[0])

    backbone.embed_tokens.register_forward_hook(embed_hook)
    backbone.norm.register_forward_hook(lambda m, a, o: keep("norm", _first(o)))
    for i, layer in enumerate(backbone.layers):
        compiled = getattr(layer, "_compiled_call_impl", None)
        if compiled is None:  # eager: a hook runs outside any graph
            layer.register_forward_hook(lambda m, a, o, i=i: keep(f"layer{i}", _first(o)))
            continue

        def call(*args, _compiled=compiled, _i=i, **kwargs):  # called by Module._wrapped_call_impl, outside dynamo
            out = _compiled(*args, **kwargs)
            keep(f"layer{_i}", _first(out))
            return out

        layer._compiled_call_impl = call
    if speed is not None:
        head = speed.fused_head

        def fused_head(*args, **kwargs):
            out = head(*args, **kwargs)
            keep("log_probs", out.log_probs)
            return out

        speed.fused_head = fused_head
    return passes


def diff(a: dict, b: dict) -> dict:
    """Two recorded forwards: whether every tensor is the same bits, the first decoder layer whose output is not,
    each tensor's largest difference, and the names whose shapes differ."""
    import torch

    names = [n for n in a if n in b]
    first = next((n for n in names if n.startswith("layer") and not torch.equal(a[n], b[n])), None)
    return {"equal": all(torch.equal(a[n], b[n]) for n in names), "first_layer_differing": first,
            "max_abs_diff": {n: float((a[n] - b[n]).abs().max()) for n in names if a[n].shape == b[n].shape},
            "shapes_differ": [n for n in names if a[n].shape != b[n].shape]}


def recorder(trainer, limit: int = 2, light: bool = False):
    """`record_forwards` on a trainer's model (the first `limit` forwards)."""
    try:
        from align import speed
    except ImportError:
        speed = None
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    return record_forwards(getattr(inner, inner.base_model_prefix), speed, limit, light)


def trace(trainer, torch, train: bool = False) -> dict:
    """Run the first batch's DPO loss twice (no update between) with the forwards recorded; `train`: the trainer's
    own first step instead (`trainer.train()`, one step: its reference and policy forwards)."""
    passes = recorder(trainer, limit=None)
    losses = []
    if train:
        trainer.args.max_steps, trainer.args.logging_steps = 1, 1
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    for _ in range(0 if train else 2):
        inputs = trainer._prepare_inputs(batch)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, inputs)
        losses.append(float(loss.detach()))
        del loss
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    from benchmarks.throughput import _dynamo_counters

    out = {"losses": losses, "passes": len(passes), "names": list(passes[0]) if passes else [],
           "dynamo": _dynamo_counters()}
    if train and len(passes) >= 2:
        out["reference vs policy"] = diff(passes[0], passes[1])
    if len(passes) >= 4 and not train:
        out.update({"reference vs policy": diff(passes[0], passes[1]),
                    "reference vs reference again": diff(passes[0], passes[2]),
                    "policy vs policy again": diff(passes[1], passes[3])})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--path", default="align", help="stock or align")
    ap.add_argument("--align_options", default="auto")
    ap.add_argument("--model_config", default="", help="`key=value,...` over the shape's model config")
    ap.add_argument("--train", action="store_true", help="the trainer's own first step (trainer.train())")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    from benchmarks import throughput

    shape_cfg = dict(throughput.SHAPES[args.shape])
    if args.model_config:
        shape_cfg["config"] = {**shape_cfg["config"], **throughput._model_config(args.model_config)}
    spec = dict(shape=args.shape, case="dpo_lora", path=args.path, shape_cfg=shape_cfg, steps=1, warmup=0,
                rows=shape_cfg["pairs"], align_options=args.align_options, data="fixed", lr=5e-6,
                gradient_checkpointing=False, seed=0, lora_dropout=0.0, step_bits="train" if args.train else "loss")
    result = dict(vars(args), **throughput.worker(spec))
    print(json.dumps(result, indent=1))
    if args.out:
        from align.manifest import write_json_atomic

        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
