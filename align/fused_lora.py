"""Fused LoRA (the `fused_lora` speedup): PEFT's LoRA linear layers computed in the activations' dtype, the scaling
folded into B and B's product accumulated into the base output by one GEMM (in place on a plain `nn.Linear` base
outside compiled code; inside it, `COMPILED_ACCUMULATE`: by default the whole layer as one op, the base GEMM
accumulating into the LoRA product); with LoRA dropout, a one-byte
keep-mask saved per adapter instead of its own dropped copy of the input. See `align.speed` for when it is used."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("align")


# How a compiled layer adds the LoRA product to a bf16 base GEMM's output (`nn.Linear` bases): "addmm" (one
# `addmm(base_out, h, B)`: inductor first copies base_out into a new buffer, H100 call22: 105 device copies, 3.6 ms
# of a 1B SFT step), "op" (`align::lora_linear`, base GEMM and an in-place accumulate as one op: no copy) or "op_ab"
# (`align::lora_linear_ab`, the whole layer as one op taking A and B: the small LoRA product is written first and
# the base GEMM accumulates into it with beta 1, where its extra read hides under its arithmetic, instead of a
# memory-bound accumulate that reads and writes the (tokens x out) output; likewise in the backward, the input
# gradient starts as the LoRA part and the base GEMM adds into it, so no separate sum of the two; used without
# LoRA dropout). With either op `speed.compile_layers` has the partitioner weigh custom ops by their flops
# (`is_non_builtin_to_include`), without which `lean` recomputed the MLP GEMMs at budgets up to 0.65; with it each
# budget saves what "addmm" saves ("op_ab": what "addmm" saves at 0.5 at 0.58, `speed.LEAN_BUDGET_ONE_OP`;
# benchmarks/lean_recompute.py). H100 call23, same budget against "addmm": "op" +2-8%, "op_ab" +0.5-9% and less memory;
# "op_ab" is the default. A separate product and `+` is no way out: inductor's pattern matcher makes it the same
# addmm. Eager layers accumulate in place. With LoRA dropout (every shipped recipe's 0.05) the compiled layers keep
# "addmm": H100 call24 measured the op with dropout two ways, the keep-mask applied inside the op (eager element-wise
# kernels, 1B SFT 48,519 tokens/s against addmm's 58,280) and the dropped input made in the graph and given to the op
# (61,416 at 0.58 but 11.6 GiB against 8.9, the partitioner then saving the dropped inputs; at addmm's memory,
# budget 0.5, 57,630 against 58,565; 8B alike), so at equal memory it does not pay.
COMPILED_ACCUMULATES = ("addmm", "op", "op_ab")
COMPILED_ACCUMULATE = "op_ab"  # H100 call23: faster than "addmm" at each budget, with less memory (benchmarks/README.md)


def keeps_peft_forward(layer) -> bool:
    """The layer runs PEFT's own forward: adapters disabled or merged, several active, a variant (DoRA, ...) or a
    bias on B."""
    active = layer.active_adapters
    return (layer.disable_adapters or layer.merged or len(active) != 1 or active[0] not in layer.lora_A
            or active[0] in layer.lora_variant or layer.lora_B[active[0]].bias is not None)


def _plain_for(layer, x) -> bool:
    """A plain linear base in the dtype `x` is multiplied in (autocast's, else x's own)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return _plain_linear(layer.base_layer) and layer.base_layer.weight.dtype == dtype


def runs_whole_layer_op(layer, x) -> bool:
    """Under torch.compile the layer (not `keeps_peft_forward`) runs as `align::lora_linear_ab` on `x`: a plain
    base, the "op_ab" form and no dropout dropping now."""
    return (_plain_for(layer, x) and COMPILED_ACCUMULATE == "op_ab"
            and not _dropping(layer.lora_dropout[layer.active_adapters[0]]))


def _fused_lora_forward(self, x, *args, **kwargs):
    """Forward of a PEFT LoRA linear layer (bound to the layer by `use_fused_lora`)."""
    if getattr(self, "_align_precomputed", None) is not None:  # `grouped_lora`: its group's op ran on this input
        from align.grouped_lora import take_precomputed

        out = take_precomputed(self, x)
        if out is not None:
            return out
    if args or kwargs or keeps_peft_forward(self):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own: variants, lora_bias, mixed batches
    name = self.active_adapters[0]
    base = self.base_layer
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    compiling = torch.compiler.is_compiling()
    plain = _plain_for(self, x)
    b = self.lora_B[name].weight * self.scaling[name]
    if compiling and runs_whole_layer_op(self, x):
        dtype = base.weight.dtype
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        out, _ = torch.ops.align.lora_linear_ab(x2d, base.weight, bias, self.lora_A[name].weight.to(dtype),
                                                b.to(dtype))
        return out.view(*x.shape[:-1], out.shape[-1])
    h = _lora_down(self, name, x)
    if plain and (not compiling or COMPILED_ACCUMULATE == "op"):
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
    if _dropping(drop):
        return _DropoutLinear.apply(x, a, drop.p)
    return F.linear(drop(x), a)


def _has_dropout(drop) -> bool:
    """The adapter has a dropout that drops elements in training (`nn.Dropout` with p > 0; PEFT's p = 0 is Identity)."""
    return isinstance(drop, torch.nn.Dropout) and drop.p > 0


def _dropping(drop) -> bool:
    """The adapter's dropout drops elements now (it has one and is in training mode)."""
    return _has_dropout(drop) and drop.training


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


@torch.library.custom_op("align::lora_linear_ab", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b) -> (Tensor, Tensor)")
def lora_linear_ab(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x @ weight.T (+ bias) + (x @ a.T) @ b.T, x @ a.T)` for 2-D `x`: the LoRA product (and bias) written first,
    then the base GEMM accumulated into it in place (beta 1). The second output, the down-projection `h`, is what
    the backward keeps for B's gradient (M x r); it carries no gradient of its own."""
    if _b_is_zero:  # the LoRA product is zero: the same buffer and base GEMM without it (`zero_b`)
        h = x.new_zeros(x.shape[0], a.shape[0])
        out = x.new_zeros(x.shape[0], weight.shape[0])
        if bias is not None:
            out.add_(bias)
        return out.addmm_(x, weight.t()), h
    h = torch.mm(x, a.t())
    out = torch.mm(h, b.t()) if bias is None else torch.addmm(bias, h, b.t())
    return out.addmm_(x, weight.t()), h


_b_is_zero = False  # set by `zero_b`


@contextlib.contextmanager
def zero_b():
    """For the block, every B given to `lora_linear_ab` is zero (`stacking.AdapterSwitch.stand_in(None)`: the policy
    adapter carrying the base, DPO's reference run through the policy's compiled graph). The op, run by that graph
    at run time, skips its two LoRA GEMMs and writes the base GEMM into a zero-filled buffer: the bits of its
    product with B = 0, as the same beta-1 GEMM, without the LoRA reads of x."""
    global _b_is_zero
    previous, _b_is_zero = _b_is_zero, True
    try:
        yield
    finally:
        _b_is_zero = previous


@lora_linear_ab.register_fake
def _lora_linear_ab_fake(x, weight, bias, a, b):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a.shape[0])


def _lora_linear_ab_setup(ctx, inputs, output):
    x, weight, bias, a, b = inputs
    ctx.save_for_backward(x, weight, a, b, output[1])
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op("align::lora_linear_ab_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor weight, Tensor a, Tensor b, Tensor h, bool need_x) "
                                "-> (Tensor, Tensor, Tensor)")
def lora_linear_ab_backward(grad, x, weight, a, b, h, need_x):
    """The gradients of `lora_linear_ab`'s x (empty unless `need_x`), A and B. The input gradient starts as the LoRA
    part, `(grad @ b) @ a`, and the base GEMM adds `grad @ weight` into it in place (one buffer, no separate sum; as
    an op of its own, so that inductor does not turn the in-place GEMM into a copy and an addmm)."""
    gh = grad @ b
    gx = (gh @ a).addmm_(grad, weight) if need_x else grad.new_empty(0)
    return gx, gh.t() @ x, grad.t() @ h


@lora_linear_ab_backward.register_fake
def _lora_linear_ab_backward_fake(grad, x, weight, a, b, h, need_x):
    return x.new_empty(x.shape if need_x else (0,)), a.new_empty(a.shape), b.new_empty(b.shape)


def _lora_linear_ab_backward(ctx, grad, _grad_h):
    x, weight, a, b, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, ga, gb = torch.ops.align.lora_linear_ab_backward(grad, x, weight, a, b, h, need[0])
    return (gx if need[0] else None, grad.t() @ x if need[1] else None, grad.sum(0) if need[2] else None,
            ga if need[3] else None, gb if need[4] else None)


lora_linear_ab.register_autograd(_lora_linear_ab_backward, setup_context=_lora_linear_ab_setup)


def _register_lora_linear_flops():
    """The ops' flops for the partitioner's cost model (`lean`): without a formula they count as free, and the
    memory budget would recompute these GEMMs before anything else."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.align.lora_linear)
    def _flops(x_shape, w_shape, bias_shape, h_shape, b_shape, *args, out_shape=None, **kwargs):
        return 2 * x_shape[0] * x_shape[1] * w_shape[0] + 2 * h_shape[0] * h_shape[1] * b_shape[0]

    @register_flop_formula(torch.ops.align.lora_linear_ab)
    def _flops_ab(x_shape, w_shape, bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        m, k = x_shape
        return 2 * m * k * w_shape[0] + 2 * m * k * a_shape[0] + 2 * m * a_shape[0] * b_shape[0]


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


def compiled_accumulate(model) -> str:
    """How the compiled layers of `model` add their LoRA products: `COMPILED_ACCUMULATE` where a fused LoRA layer
    takes it (a plain bf16/fp16/fp32 `nn.Linear` base; for "op_ab" also no LoRA dropout), else "addmm" (k-bit,
    FP8 and NF4 bases, dropout, no fused layer)."""
    if COMPILED_ACCUMULATE not in COMPILED_ACCUMULATES:
        raise ValueError(f"fused_lora.COMPILED_ACCUMULATE is {COMPILED_ACCUMULATE!r}; choose from "
                         f"{', '.join(COMPILED_ACCUMULATES)}")
    for module in model.modules():
        if getattr(module.forward, "__func__", None) is _fused_lora_forward and _plain_linear(module.base_layer):
            # whatever the mode now: a model is set up in eval mode and trained in training mode
            if COMPILED_ACCUMULATE != "op_ab" or not any(_has_dropout(d) for d in module.lora_dropout.values()):
                return COMPILED_ACCUMULATE
    return "addmm"


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
