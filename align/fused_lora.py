"""Fused LoRA (the `fused_lora` speedup): PEFT's LoRA linear layers computed in the activations' dtype, the scaling
folded into B and B's product accumulated into the base output by one GEMM (in place on a plain `nn.Linear` base
outside compiled code, `COMPILED_ACCUMULATE` inside it); with LoRA dropout, a one-byte
keep-mask saved per adapter instead of its own dropped copy of the input. See `align.speed` for when it is used."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("align")


# How a compiled layer adds the LoRA product to a bf16 base GEMM's output (`nn.Linear` bases): "addmm" (one
# `addmm(base_out, h, B)`: inductor first copies base_out into a new buffer, H100 call22: 105 device copies, 3.6 ms
# of a 1B SFT step) or "op" (`align::lora_linear`, base GEMM and an in-place accumulate as one op: no copy; with it
# `speed.compile_layers` has the partitioner weigh custom ops by their flops, `is_non_builtin_to_include`, without
# which `lean` recomputed the MLP GEMMs at budgets up to 0.65; with it each budget saves what "addmm" saves,
# benchmarks/lean_recompute.py). Opt-in until a GPU has measured it. A separate product and `+` is no way out:
# inductor's pattern matcher makes it the same addmm. Eager layers accumulate in place.
COMPILED_ACCUMULATE = "addmm"


def _fused_lora_forward(self, x, *args, **kwargs):
    """Forward of a PEFT LoRA linear layer (bound to the layer by `use_fused_lora`)."""
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A
            or active[0] in self.lora_variant or self.lora_B[active[0]].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own: variants, lora_bias, mixed batches
    name = active[0]
    base = self.base_layer
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    compiling = torch.compiler.is_compiling()
    h, b = _lora_down(self, name, x), self.lora_B[name].weight * self.scaling[name]
    if (_plain_linear(base) and base.weight.dtype == (torch.get_autocast_dtype(device) if autocast else x.dtype)
            and (not compiling or COMPILED_ACCUMULATE == "op")):
        dtype = base.weight.dtype
        x2d, h2d, b = x.reshape(-1, x.shape[-1]).to(dtype), h.to(dtype).reshape(-1, h.shape[-1]), b.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        if compiling:  # one op: inductor would copy the base output before an addmm into it
            out = torch.ops.align.lora_linear(x2d, base.weight, bias, h2d, b)
        else:  # the LoRA product into the base output in place (no autograd node saves that output)
            out = F.linear(x2d, base.weight, bias).addmm_(h2d, b.t())
        return out.view(*x.shape[:-1], out.shape[-1])
    result = base(x)
    dtype = result.dtype
    if autocast and dtype != torch.get_autocast_dtype(device):
        # a base output above the autocast dtype (fp32 residual stream of a k-bit base without kbit_bf16): an addmm
        # would be autocast down to bf16 with it; add the bf16 LoRA product to it instead, as PEFT does
        return result + F.linear(h, b)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.to(dtype).reshape(-1, h.shape[-1]), b.to(dtype).t())
    return out.view(result.shape)


def _lora_down(self, name, x):
    """x (through the adapter's dropout) times A, in the activations' dtype."""
    drop, a = self.lora_dropout[name], self.lora_A[name].weight.to(x.dtype)
    if isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0:
        return _DropoutLinear.apply(x, a, drop.p)
    return F.linear(drop(x), a)


def _plain_linear(layer) -> bool:
    """A bf16/fp16/fp32 `nn.Linear` itself (not a k-bit, FP8 or NF4 subclass) without hooks (ZeRO-3, offload)."""
    return type(layer) is torch.nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)


@torch.library.custom_op("align::lora_linear", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor h, Tensor b) -> Tensor")
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T (+ bias) + h @ b.T` for 2-D `x` and `h`: the base GEMM into a new buffer, then the LoRA product
    accumulated into that buffer in place (one GEMM with beta 1). Inductor compiles `addmm(base_out, h, b.T)` as a
    copy of the base output into a new buffer before the GEMM (H100 call22: 105 device copies, 3.6 ms of a 1B SFT
    step); as an op of its own the layer makes no copy."""
    out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return out.addmm_(h, b.t())


@lora_linear.register_fake
def _lora_linear_fake(x, weight, bias, h, b):
    return x.new_empty(x.shape[0], weight.shape[0])


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, h, b = inputs
    ctx.save_for_backward(x if weight.requires_grad else None, weight, h, b)


def _lora_linear_backward(ctx, grad):
    x, weight, h, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (grad @ weight if need[0] else None, grad.t() @ x if need[1] else None,
            grad.sum(0) if need[2] else None, grad @ b if need[3] else None, grad.t() @ h if need[4] else None)


lora_linear.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup)


def _register_lora_linear_flops():
    """The op's flops for the partitioner's cost model (`lean`): without a formula it counts as free, and the memory
    budget would recompute these GEMMs before anything else."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.align.lora_linear)
    def _flops(x_shape, w_shape, bias_shape, h_shape, b_shape, *args, out_shape=None, **kwargs):
        return 2 * x_shape[0] * x_shape[1] * w_shape[0] + 2 * h_shape[0] * h_shape[1] * b_shape[0]


_register_lora_linear_flops()


class _DropoutLinear(torch.autograd.Function):
    """`F.linear(F.dropout(x, p), weight)` that saves the input and a one-byte keep-mask for the backward instead
    of the dropped copy of the input: PEFT's dropout gives every adapter its own dropped copy (saved for the
    weight gradient) plus the mask, while `x` itself is shared by the adapters of q/k/v/gate/up and often saved
    anyway. The dropped input is recomputed in the backward (one element-wise pass)."""

    @staticmethod
    def forward(ctx, x, weight, p):
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        scale = 1.0 / (1 - p)
        ctx.save_for_backward(x, keep, weight)
        ctx.scale = scale
        return F.linear(x * keep * scale, weight)

    @staticmethod
    def backward(ctx, grad):
        x, keep, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad @ weight.to(grad.dtype)) * keep * ctx.scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).to(grad.dtype)
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None


def use_fused_lora(model) -> int:
    """Give every LoRA linear layer of `model` the fused forward; returns how many layers."""
    import types

    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if (isinstance(module, LoraLayer) and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
                and module.lora_A and all(isinstance(a, torch.nn.Linear) for a in module.lora_A.values())
                and hasattr(module, "base_layer") and not isinstance(module.base_layer, torch.nn.Embedding)):
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    logger.info("speedups: fused LoRA forward on %d layers", count)
    return count
