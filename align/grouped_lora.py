"""Sibling LoRA layers as one op (the `group_lora` speedup; in `auto` on a GPU).

An attention block's q/k/v projections and an MLP's gate/up projections read the same input, so in the compiled
layers each group runs as one fused LoRA op (`align::lora_linear_ab`) over the group's concatenated weights instead
of one op per projection.

Why: on an H100 a LoRA projection costs a near-fixed ~0.14 ms over its base GEMM however narrow (its rank-16
GEMMs; benchmarks/README.md, Call27), and the narrow k/v base GEMMs run at 384-526 TFLOP/s alone against ~665 for
the wide ones. One op per group runs one base GEMM over [Wq; Wk; Wv] (or [Wgate; Wup]), one down-projection over
[Aq; Ak; Av] and one up-projection over the block-diagonal of the scaled Bs (its zero blocks cost a few percent of
the base GEMM's flops), so a Llama layer runs four LoRA ops instead of seven. H100 (against `auto` in the
same call): 1B SFT +3.8%, 8B SFT +2.3% tokens/s, the same peak and losses (call29); 1B DPO +2.7%, 8B DPO +2.0%,
1B reward model +2.7% (call30) with v copied out of the group's buffer (`COPIED`), which took the 1B DPO peak's
1.2 GiB rise of call29 down to 0.2 GiB.

How: `group_lora` stores each group's base weights in one buffer (the parent's non-persistent buffer) and points
every member's weight at its rows of it (views, no second copy), then wraps the parent's forward: under
`torch.compile`, when every member would run fused LoRA's whole-layer op (a plain base linear, one active adapter,
no dropout in training, no DoRA or LoRA bias), the wrapper computes the group's outputs from the parent's input and
hands each member its slice; a member called with that same input returns it (`take_precomputed`). Any other call
(eager, another input, a member that does not qualify) runs each layer as before. A full-model `save_pretrained`
of the trained model itself would see the shared storage; align's merges and exports load the base afresh. DDP
leaves the buffers alone (they are on its ignore list: its per-forward buffer broadcast would copy every base
weight again); the members' weights, the same memory, are synchronised once as DDP's parameters.
"""

from __future__ import annotations

import logging
import types

import torch

from align import fused_lora

logger = logging.getLogger("align")

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# members whose output leaves the group's buffer as a copy: v goes to attention as it is and is what the backward
# keeps of it, and as a view it would keep the whole q/k/v output alive (q and k become new tensors through RoPE).
# A Llama-3.2-1B layer at DPO's memory budget 0.2 saved 15.1 MiB per 1,024 tokens instead of 12.1 without grouping
# (`benchmarks/saved_activations.py --lean_budgets 0.2 --group_lora`), the 1B DPO peak 6.0 -> 7.2 GiB (H100 call29).
COPIED = ("v_proj",)
_BUFFER = "_align_group_weight_{}"  # the parent's buffer of group i's concatenated base weights
_PRECOMPUTED = "_align_precomputed"  # on a member: (input, output) handed to it by the parent's wrapper


def _member(module) -> bool:
    """A PEFT LoRA linear layer with fused LoRA's forward on a plain linear base."""
    return (getattr(getattr(module, "forward", None), "__func__", None) is fused_lora._fused_lora_forward
            and fused_lora._plain_linear(module.base_layer))


def _compatible(members) -> bool:
    bases = [m.base_layer for m in members]
    w = bases[0].weight
    return (all(b.in_features == bases[0].in_features and b.weight.dtype == w.dtype and b.weight.device == w.device
                and (b.bias is None) == (bases[0].bias is None) for b in bases)
            and all(set(m.lora_A) == set(members[0].lora_A) for m in members))


def group_lora(model) -> int:
    """Group the q/k/v and gate/up LoRA layers of every block of `model` (after `fused_lora.use_fused_lora`, with
    the model on its device and in its dtype: a later `.to()` would copy the members' weights apart from the
    group's buffer); returns how many groups."""
    count, buffers = 0, []
    for name, parent in list(model.named_modules()):
        groups = []
        for i, names in enumerate(GROUPS):
            members = [getattr(parent, n, None) for n in names]
            if not all(m is not None and _member(m) for m in members) or not _compatible(members):
                continue
            with torch.no_grad():
                weight = torch.cat([m.base_layer.weight for m in members])
            start = 0
            for m in members:
                rows = m.base_layer.weight.shape[0]
                m.base_layer.weight.data = weight[start:start + rows]
                start += rows
                setattr(m, _PRECOMPUTED, None)
            parent.register_buffer(_BUFFER.format(i), weight, persistent=False)
            buffers.append(f"{name}.{_BUFFER.format(i)}" if name else _BUFFER.format(i))
            groups.append((i, names))
        if groups:
            parent._align_lora_groups = tuple(groups)
            parent.forward = types.MethodType(_grouped_forward, parent)
            count += len(groups)
    if buffers:  # DDP would broadcast every buffer from rank 0 in each forward: ~9 GiB a step at 8B, for nothing
        ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored + buffers)
    logger.info("speedups: %d LoRA layer groups (q/k/v, gate/up) run as one op each", count)
    return count


def group_outputs(parent, i: int, members, x) -> list | None:
    """The members' outputs on `x` as one op, or None when some member would not run the op."""
    if any(fused_lora.keeps_peft_forward(m) or not fused_lora.runs_whole_layer_op(m, x) for m in members):
        return None
    name = members[0].active_adapters[0]
    if any(m.active_adapters[0] != name for m in members):
        return None
    weight = getattr(parent, _BUFFER.format(i))
    dtype = weight.dtype
    a = torch.cat([m.lora_A[name].weight for m in members]).to(dtype)
    b = torch.block_diag(*[m.lora_B[name].weight * m.scaling[name] for m in members]).to(dtype)
    biases = [m.base_layer.bias for m in members]
    bias = None if biases[0] is None else torch.cat(biases).to(dtype)
    out, _ = torch.ops.align.lora_linear_ab(x.reshape(-1, x.shape[-1]).to(dtype), weight, bias, a, b)
    sizes = [m.base_layer.weight.shape[0] for m in members]
    outs = [o.view(*x.shape[:-1], n) for o, n in zip(out.split(sizes, dim=1), sizes)]
    return [o.contiguous() if name in COPIED else o for o, name in zip(outs, GROUPS[i])]


def _grouped_forward(self, *args, **kwargs):
    """A block's forward (bound by `group_lora`): under `torch.compile`, each group's outputs computed as one op
    from the block's input (its first argument, or `hidden_states` / `x` by keyword) and handed to its members,
    then the block's own forward."""
    handed = []
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    if torch.compiler.is_compiling() and isinstance(x, torch.Tensor):
        for i, names in self._align_lora_groups:
            members = [getattr(self, n) for n in names]
            outs = group_outputs(self, i, members, x)
            if outs is not None:
                for m, o in zip(members, outs):
                    setattr(m, _PRECOMPUTED, (x, o))
                handed += members
    out = type(self).forward(self, *args, **kwargs)
    for m in handed:  # not taken (the block passed its projections another tensor): nothing kept alive
        setattr(m, _PRECOMPUTED, None)
    return out


def take_precomputed(member, x):
    """The output the block's wrapper computed for `member` on this very input `x`, or None (cleared once taken)."""
    pre = getattr(member, _PRECOMPUTED, None)
    if pre is None or pre[0] is not x:
        return None
    setattr(member, _PRECOMPUTED, None)
    return pre[1]
