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
    absmax = block_scales(absmax, nested)
    u = packed.flatten()
    idx = torch.stack([u >> 4, u & 15], -1).flatten()
    n = shape[0] * shape[1]
    return _blockwise(code[idx.long()][:n], absmax, blocksize).view(shape).to(dtype)


def block_scales(absmax, nested=None) -> torch.Tensor:
    """One scale per block: `absmax` itself, or dequantized from its 8-bit code (double quantization)."""
    if nested is None:
        return absmax
    absmax_code, absmax_scale, absmax_blocksize, offset = nested
    return _blockwise(absmax_code[absmax.long()], absmax_scale, absmax_blocksize) + offset


def _save_weight(ctx, packed, code, absmax, blocksize, shape, dtype, nested) -> None:
    """Keep a 4-bit weight (packed values and statistics, no dequantized copy) for the backward."""
    if nested is None:
        ctx.save_for_backward(packed, code, absmax)
    else:  # the 8-bit scales' code, their scales and offset
        ctx.save_for_backward(packed, code, absmax, nested[0], nested[1], nested[3])
    ctx.meta = (blocksize, shape, dtype, None if nested is None else nested[2])


def _saved_weight(ctx):
    """What `_save_weight` kept: (packed, code, absmax, blocksize, shape, dtype, nested)."""
    packed, code, absmax, *rest = ctx.saved_tensors
    blocksize, shape, dtype, absmax_blocksize = ctx.meta
    nested = None if absmax_blocksize is None else (rest[0], rest[1], absmax_blocksize, rest[2])
    return packed, code, absmax, blocksize, shape, dtype, nested


def _state_args(state):
    nested = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if state.nested else None
    return state.code, state.absmax, state.blocksize, tuple(state.shape), state.dtype, nested


class NF4Linear(torch.autograd.Function):
    """`F.linear(x, dequantize(weight), bias)` for a frozen 4-bit weight; the backward dequantizes again."""

    @staticmethod
    def forward(ctx, x, packed, bias, code, absmax, blocksize, shape, dtype, nested):
        _save_weight(ctx, packed, code, absmax, blocksize, shape, dtype, nested)
        return F.linear(x, dequantize(packed, code, absmax, blocksize, shape, dtype, nested).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ dequantize(*_saved_weight(ctx)).to(grad.dtype)
        return grad_x, None, None, None, None, None, None, None, None


def _fp8_weight(packed, code, absmax, blocksize, shape, nested, transposed: bool):
    """The 4-bit weight as e4m3 with one scale per output row: (values (N, K), or their transpose (K, N) laid out
    row-major, and the fp32 scales (N,)). NF4's code spans [-1, 1], so a row's largest magnitude is at most the
    largest absmax of its blocks: read from the scales without a pass over the weight when the blocks tile rows."""
    from align import fp8

    w = dequantize(packed, code, absmax, blocksize, shape, torch.float32, nested)
    n, k = shape
    if k % blocksize == 0:
        amax = block_scales(absmax, nested).float().view(n, k // blocksize).amax(-1)
    else:
        amax = w.abs().amax(-1)
    scale = amax.clamp(min=1e-12) / fp8.E4M3_MAX
    q = w / scale[:, None]
    return fp8.to_e4m3(q.t().contiguous() if transposed else q), scale


class NF4Fp8Linear(torch.autograd.Function):
    """`F.linear(x, dequantize(weight))` for a frozen 4-bit weight, the matmuls in FP8 (`align/fp8.py`): the weight
    dequantized straight to e4m3 with row-wise scales (no bf16 copy written), `x` per token; the backward
    dequantizes again, into the transposed layout, and folds the weight's row scales into the output gradient."""

    @staticmethod
    def forward(ctx, x, packed, bias, code, absmax, blocksize, shape, dtype, nested):
        from align import fp8

        w_q, w_scale = _fp8_weight(packed, code, absmax, blocksize, shape, nested, transposed=False)
        _save_weight(ctx, packed, code, absmax, blocksize, shape, dtype, nested)
        lead = x.shape[:-1]
        x_q, x_scale = fp8.quantize_rows(x.reshape(-1, x.shape[-1]))
        out = fp8._mm(x_q, x_scale, w_q, w_scale[None], torch.bfloat16, fast_accum=True).view(*lead, shape[0])
        return fp8.cast(out if bias is None else out + bias.to(out.dtype), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        from align import fp8

        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        packed, code, absmax, blocksize, shape, _, nested = _saved_weight(ctx)
        w_t, w_scale = _fp8_weight(packed, code, absmax, blocksize, shape, nested, transposed=True)
        lead = grad.shape[:-1]
        g_q, g_scale = fp8.quantize_rows(grad.reshape(-1, grad.shape[-1]).float() * w_scale[None])
        ones = torch.ones(1, shape[1], dtype=torch.float32, device=grad.device)
        grad_x = fp8._mm(g_q, g_scale, w_t, ones, torch.bfloat16, fast_accum=False)
        return (fp8.cast(grad_x.view(*lead, shape[1]), grad.dtype),) + (None,) * 8


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
    fn = NF4Fp8Linear if getattr(self, "align_fp8", False) and shape[0] % 16 == 0 and shape[1] % 16 == 0 else NF4Linear
    out = fn.apply(x.to(compute), self.weight.data, bias, code, absmax, blocksize, shape, dtype, nested)
    return out.to(x.dtype)


def use_torch_nf4(model, fp8: bool = False) -> int:
    """Give every bitsandbytes NF4 `Linear4bit` of `model` the torch-ops forward; returns how many layers. `fp8`:
    its matmuls in FP8 (`NF4Fp8Linear`; layers whose sizes do not divide by 16 keep bf16)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and supported(module):
            module.forward = types.MethodType(_forward, module)
            module.align_fp8 = fp8
            count += 1
    logger.info("speedups: NF4 linear layers as torch ops on %d layers%s", count, " (FP8 matmuls)" if fp8 else "")
    return count
