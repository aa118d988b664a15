"""Fused LoRA (the `fused_lora` speedup): PEFT's LoRA linear layers computed in the activations' dtype, the scaling
folded into B and B's product accumulated into the base output by one `addmm`; with LoRA dropout, a one-byte
keep-mask saved per adapter instead of its own dropped copy of the input. See `align.speed` for when it is used."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("align")


def _fused_lora_forward(self, x, *args, **kwargs):
    """Forward of a PEFT LoRA linear layer (bound to the layer by `use_fused_lora`)."""
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A
            or active[0] in self.lora_variant or self.lora_B[active[0]].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own: variants, lora_bias, mixed batches
    name = active[0]
    result = self.base_layer(x)
    dtype = result.dtype
    drop, a = self.lora_dropout[name], self.lora_A[name].weight.to(x.dtype)
    if isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0:
        h = _DropoutLinear.apply(x, a, drop.p)
    else:
        h = F.linear(drop(x), a)
    b = self.lora_B[name].weight * self.scaling[name]
    device = x.device.type
    if torch.is_autocast_enabled(device) and dtype != torch.get_autocast_dtype(device):
        # a base output above the autocast dtype (fp32 residual stream of a k-bit base without kbit_bf16): an addmm
        # would be autocast down to bf16 with it; add the bf16 LoRA product to it instead, as PEFT does
        return result + F.linear(h, b)
    b = b.to(dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.to(dtype).reshape(-1, h.shape[-1]), b.t())
    return out.view(result.shape)


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
