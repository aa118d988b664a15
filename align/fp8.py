"""FP8 matmuls for the frozen base linear layers of a LoRA run (the `fp8` speedup).

A LoRA step multiplies by each frozen base weight twice: `x @ W.T` in the forward and `grad @ W` for the input's
gradient (no weight gradient). On FP8 GPUs (compute capability 8.9+: Ada, Hopper and later) an FP8 (e4m3) matmul
has twice the bf16 rate, so both are done in FP8 with row-wise scales (`torch._scaled_mm`):

- the weight is quantized once, to two e4m3 copies: `W` (N, K) with one scale per output row for the forward, and
  `W.T` (K, N) with one scale per input column for the backward (the layouts the FP8 kernels take: a row-major
  left operand and a column-major right one). Together they hold as many bytes as the bf16 weight, which is freed;
- the activations (forward) and the output gradient (backward) are quantized per row (one scale per token) as they
  come, in the compiled layer fused into the kernel that produces them;
- the products come out in bf16; the LoRA adapters, norms, attention and LM head stay in bf16 / fp32.

Nothing of `x` is saved for the base matmul's backward (only the weight copies are used there). The loss moves from
the bf16 run's by FP8 rounding (3 mantissa bits before the matmul sums over K): tests/test_fp8.py bounds it on a tiny
model; on SmolLM2-135M-Instruct the assistant-token loss moves 1.2%, a tenth of what an NF4 (QLoRA) base does
(benchmarks/fp8_numerics.py); benchmarks/throughput.py reports the first-step loss against stock TRL + PEFT's. The DPO reference (the
adapter switched off) runs through the same FP8 base, so the policy and the reference still agree at step 0.
"""

from __future__ import annotations

import functools
import logging
import types

import torch

logger = logging.getLogger("align")

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later: FP8 tensor cores


def to_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scale, as e4m3 (saturating: a plain cast turns the out-of-range into NaN)."""
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (M, K) as e4m3 values (M, K), row-major, and one fp32 scale per row (M, 1): x ~ values * scale."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return to_e4m3(x.float() / scale), scale


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`, but a new tensor or `t` itself, never the no-op `.to` alias: an autograd.Function returning
    `t.to(t.dtype)` loses its input gradient under torch.compile in torch 2.11, the eager backend included (the LoRA
    gradients of earlier layers came out at cosine 0.17-0.66 of eager's; 2.13 gets it right; `test_fp8.py`)."""
    return t if t.dtype == dtype else t.to(dtype)


def _mm(a_q, a_scale, b_q, b_scale, out_dtype, fast_accum: bool) -> torch.Tensor:
    """(a_q * a_scale) @ (b_q * b_scale).T for `a_q` (M, K) and `b_q` (N, K) both row-major: `b_q.t()` is the
    column-major right operand the FP8 kernels take."""
    return torch._scaled_mm(a_q, b_q.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


class Fp8Linear(torch.autograd.Function):
    """`F.linear(x, W)` for a frozen weight held as `w` (N, K) with scales (1, N) and `w_t` (K, N) with scales
    (1, K), all e4m3 / fp32. Forward and input gradient are FP8 matmuls with bf16 output."""

    @staticmethod
    def forward(ctx, x, w, w_scale, w_t, w_t_scale):
        lead = x.shape[:-1]
        q, s = quantize_rows(x.reshape(-1, x.shape[-1]))
        out = _mm(q, s, w, w_scale, torch.bfloat16, fast_accum=True)  # fast accumulation: as torchao's forward
        ctx.save_for_backward(w_t, w_t_scale)
        ctx.x_dtype = x.dtype
        return cast(out.view(*lead, out.shape[-1]), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w_t, w_t_scale = ctx.saved_tensors
        lead = grad.shape[:-1]
        q, s = quantize_rows(grad.reshape(-1, grad.shape[-1]))
        grad_x = _mm(q, s, w_t, w_t_scale, torch.bfloat16, fast_accum=False)
        return cast(grad_x.view(*lead, grad_x.shape[-1]), ctx.x_dtype), None, None, None, None


def _forward(self, x):
    """Forward of a frozen `nn.Linear` converted by `to_fp8` (bound to the layer)."""
    out = Fp8Linear.apply(x, self.weight, self.fp8_scale, self.fp8_weight_t, self.fp8_scale_t)
    return out if self.bias is None else out + self.bias.to(out.dtype)


def convertible(module) -> str | None:
    """Why `module` cannot take FP8 matmuls, or None: a plain frozen floating-point `nn.Linear` whose two sizes
    divide by 16 (what the FP8 kernels take)."""
    if type(module) is not torch.nn.Linear:
        return "not a plain nn.Linear (4-bit / 8-bit layers keep their own kernels)"
    w = module.weight
    if w.requires_grad or (module.bias is not None and module.bias.requires_grad):
        return "trained weight"
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"weight dtype {w.dtype}"
    if w.shape[0] % 16 or w.shape[1] % 16:
        return f"sizes {tuple(w.shape)} do not divide by 16"
    return None


@torch.no_grad()
def to_fp8(module: torch.nn.Linear) -> None:
    """Replace the layer's weight by its two e4m3 copies and give it the FP8 forward (in place)."""
    w = module.weight.detach()
    w_q, w_scale = quantize_rows(w)
    w_t_q, w_t_scale = quantize_rows(w.t())
    module.weight = torch.nn.Parameter(w_q, requires_grad=False)  # the bf16 weight is freed
    module.register_buffer("fp8_scale", w_scale.view(1, -1).contiguous(), persistent=False)
    module.register_buffer("fp8_weight_t", w_t_q.contiguous(), persistent=False)
    module.register_buffer("fp8_scale_t", w_t_scale.view(1, -1).contiguous(), persistent=False)
    module.forward = types.MethodType(_forward, module)


def dequantized_weight(module) -> torch.Tensor:
    """The weight an FP8 layer multiplies by, in fp32 (N, K)."""
    return module.weight.float() * module.fp8_scale.view(-1, 1)


def is_fp8(module) -> bool:
    return hasattr(module, "fp8_weight_t")


def device_supports_fp8(device) -> str | None:
    """Why FP8 matmuls do not run (fast) on `device`, or None. On a CPU they run (slowly: for tests) where this
    torch's `_scaled_mm` takes row-wise scales there (torch 2.13 does; 2.11 takes one scale per tensor only)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"compute capability {torch.cuda.get_device_capability(device)} < {MIN_CAPABILITY}"
    if device.type == "cpu":
        return _cpu_rowwise_missing()
    return None


@functools.cache
def _cpu_rowwise_missing() -> str | None:
    a = torch.ones(16, 16).to(E4M3)
    try:
        _mm(a, torch.ones(16, 1), a, torch.ones(1, 16), torch.bfloat16, fast_accum=False)
    except RuntimeError:
        return f"torch {torch.__version__} has no row-wise FP8 matmul on the CPU (one scale per tensor only)"
    return None


def has_fp8_matmuls(model) -> bool:
    """Whether any layer of `model` multiplies in FP8 (`use_fp8`, or NF4 layers with `nf4.use_torch_nf4(fp8=True)`)."""
    return any(is_fp8(m) or getattr(m, "align_fp8", False) for m in model.modules())


def cublas_in_compiled_layers() -> None:
    """Compiled layers run their FP8 matmuls with ATen's `_scaled_mm` (cuBLASLt), the kernel the eager GPU test
    verifies, not inductor's Triton scaled-mm templates, which inductor tries and autotunes even without
    max-autotune (compile time for no measured gain). Inductor's GEMM template backends are ATen only from here on
    (without max-autotune every other matmul is an ATen call anyway). The wrong compiled gradients of calls 18 and
    19 first blamed on the templates were torch 2.11's (`cast`)."""
    import torch._inductor.config as inductor

    if inductor.max_autotune_gemm_backends.upper() != "ATEN":
        logger.info("speedups: fp8 matmuls in compiled layers through ATen (cuBLAS), not inductor's Triton templates "
                    "(max_autotune_gemm_backends %s -> ATEN)", inductor.max_autotune_gemm_backends)
        inductor.max_autotune_gemm_backends = "ATEN"


def use_fp8(model) -> int:
    """Give the frozen base layer of every LoRA linear layer of `model` FP8 matmuls; returns how many layers. Layers
    that cannot take them keep bf16 (counted and logged)."""
    from peft.tuners.lora import LoraLayer

    count, kept = 0, {}
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "base_layer", None), torch.nn.Module):
            base = module.base_layer
            if is_fp8(base) or isinstance(base, torch.nn.Embedding):
                continue
            why = convertible(base)
            if why:
                kept[why] = kept.get(why, 0) + 1
                continue
            to_fp8(base)
            count += 1
    logger.info("speedups: FP8 base matmuls on %d layers%s", count,
                "".join(f"; {n} kept in their dtype ({why})" for why, n in kept.items()))
    return count
