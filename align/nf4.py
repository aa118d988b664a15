"""bitsandbytes NF4 linear layers computed with torch ops, for decoder layers under `torch.compile`.

bitsandbytes dequantizes a 4-bit weight through its own ops (Python and ctypes per call: the nested absmax first,
then the weight), in the forward and again in the backward of every 4-bit linear layer. Inside a compiled layer
those calls stay opaque, and on an H200 the 8B QLoRA step waited for them (benchmarks/README.md). Written as torch
ops, the dequantization is fused by inductor into one kernel per weight, launched from the compiled code.

`dequantize` gives bitsandbytes' `dequantize_4bit` bit for bit (CPU test); `NF4Linear` saves only the packed
weight and its statistics for the backward and dequantizes again there, as bitsandbytes does, so no bf16 copy of a
weight is kept between forward and backward.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _blockwise(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """`values` (flat) times the scale of its block of `blocksize` consecutive elements."""
    n = values.numel()
    if n % blocksize == 0:
        return (values.view(-1, blocksize) * scale[:, None]).flatten()
    return values * scale[torch.arange(n, device=values.device) // blocksize]


def dequantize(packed, code, absmax, blocksize: int, shape, dtype, nested=None) -> torch.Tensor:
    """The weight of a bitsandbytes 4-bit tensor: `packed` (uint8, two 4-bit indices per byte, high nibble first),
    `code` its 16 values, `absmax` one scale per `blocksize` elements; `nested` = (absmax_code, absmax_scale,
    absmax_blocksize, offset) when the scales are themselves 8-bit quantized (double quantization)."""
    if nested is not None:
        absmax_code, absmax_scale, absmax_blocksize, offset = nested
        absmax = _blockwise(absmax_code[absmax.long()], absmax_scale, absmax_blocksize) + offset
    u = packed.flatten()
    idx = torch.stack([u >> 4, u & 15], -1).flatten()
    n = shape[0] * shape[1]
    return _blockwise(code[idx.long()][:n], absmax, blocksize).view(shape).to(dtype)


def _state_args(state):
    nested = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if state.nested else None
    return state.code, state.absmax, state.blocksize, tuple(state.shape), state.dtype, nested


class NF4Linear(torch.autograd.Function):
    """`F.linear(x, dequantize(weight), bias)` for a frozen 4-bit weight; the backward dequantizes again."""

    @staticmethod
    def forward(ctx, x, packed, bias, code, absmax, blocksize, shape, dtype, nested):
        if nested is None:
            ctx.save_for_backward(packed, code, absmax)
        else:  # the 8-bit scales' code, their scales and offset
            ctx.save_for_backward(packed, code, absmax, nested[0], nested[1], nested[3])
        ctx.meta = (blocksize, shape, dtype, None if nested is None else nested[2])
        return F.linear(x, dequantize(packed, code, absmax, blocksize, shape, dtype, nested).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        packed, code, absmax, *rest = ctx.saved_tensors
        blocksize, shape, dtype, absmax_blocksize = ctx.meta
        nested = None if absmax_blocksize is None else (rest[0], rest[1], absmax_blocksize, rest[2])
        grad_x = grad @ dequantize(packed, code, absmax, blocksize, shape, dtype, nested).to(grad.dtype)
        return grad_x, None, None, None, None, None, None, None, None


def supported(module) -> bool:
    """A bitsandbytes NF4 linear layer in its standard packing (not CPU-repacked)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (state is not None and state.quant_type == "nf4" and not getattr(state, "packing_format_for_cpu", False)
            and len(state.shape) == 2 and (not state.nested or state.state2 is not None))


def _forward(self, x):
    """Forward of a bitsandbytes `Linear4bit` (bound by `use_torch_nf4`); other cases go to bitsandbytes."""
    if not supported(self) or self.bias is not None and self.bias.requires_grad:
        return type(self).forward(self, x)
    code, absmax, blocksize, shape, dtype, nested = _state_args(self.weight.quant_state)
    compute = getattr(self, "compute_dtype", None) or x.dtype
    bias = None if self.bias is None else self.bias.to(compute)
    out = NF4Linear.apply(x.to(compute), self.weight.data, bias, code, absmax, blocksize, shape, dtype, nested)
    return out.to(x.dtype)


def use_torch_nf4(model) -> int:
    """Give every bitsandbytes NF4 `Linear4bit` of `model` the torch-ops forward; returns how many layers."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and supported(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    logger.info("speedups: NF4 linear layers as torch ops on %d layers", count)
    return count
