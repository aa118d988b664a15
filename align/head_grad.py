"""The LM head's per-token log-probabilities with the hidden-state gradient computed in the forward (`head_grad`).

TRL's fused head (`trl.kernels.ChunkedLogProbFunction`) runs the `(tokens x vocab)` projection three times per
training step: once in the forward, and twice in the backward (the logits again, then their gradient times the
weight). For a frozen head the gradient of a token's log-probability with respect to its hidden state,

    d log p(target_t) / d h_t = W[target_t] - sum_v p_v(t) W_v,

does not depend on the loss, so it can be built in the forward from the same logits tiles: each tile's
`exp(logit - running max)` goes through one GEMM into an fp32 accumulator rescaled as the maximum grows (the online
softmax of flash attention), and the backward only scales the saved `(tokens x hidden)` rows by the incoming
per-token gradient. Two projections per step instead of three; the outputs are TRL's (the same kernels fold the
statistics), and the gradient matches TRL's to fp32 rounding (tests/test_head_grad.py).

Limits, each routed to TRL's function by `speed.fused_head` or refused here: a trained head (lm_head in
`modules_to_save`, full fine-tuning) needs the weight gradient, which this does not compute; temperature, logit
scaling and softcapping are not applied (segment attention admits no model with them); a gradient through the
entropy output (TRL logs it detached) raises.
"""

from __future__ import annotations

import torch


class LogProbHeadGradInForward(torch.autograd.Function):
    """`ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, chunk_size, None, 1.0, outputs)` for a
    frozen `weight` / `bias`, with the gradient for `hidden` computed in the forward when `with_grad`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, outputs, with_grad):
        from trl.kernels import chunked_logprob as k

        ctx.set_materialize_grads(False)
        device, n_tokens, vocab = hidden.device, hidden.shape[0], weight.shape[0]
        compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else hidden.dtype
        kernel_args = {"logit_scale": 1.0, "softcap": 1.0, "inv_t": 1.0, "HAS_SOFTCAP": False}
        flags = {f"HAS_{name.upper()}": name in outputs for name in k.OPTIONAL_OUTPUTS}
        stats = {name: torch.zeros(n_tokens, device=device, dtype=torch.float32)
                 for name in ("sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "target_logit")}
        running_max = torch.full((n_tokens,), float("-inf"), device=device, dtype=torch.float32)
        max_before_target = torch.full_like(running_max, float("-inf"))
        # the expected head row under the softmax, unnormalised: sum_v exp(z_v - running max) W_v
        acc = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if with_grad else None
        minus_one = torch.full((min(n_tokens, k.TOKEN_CHUNK_SIZE),), -1.0, device=device, dtype=torch.float32)
        no_target = torch.full(minus_one.shape, -1, device=device, dtype=targets.dtype)
        mm_buf = torch.empty((min(n_tokens, k.TOKEN_CHUNK_SIZE), chunk_size), device=device, dtype=compute_dtype)
        triton = k._use_triton(device)

        for t0 in range(0, n_tokens, k.TOKEN_CHUNK_SIZE):
            t1 = min(t0 + k.TOKEN_CHUNK_SIZE, n_tokens)
            n = t1 - t0
            rows = slice(t0, t1)
            hidden_chunk = hidden[rows].to(compute_dtype)
            for v0 in range(0, vocab, chunk_size):
                v1 = min(v0 + chunk_size, vocab)
                w_chunk = weight[v0:v1].to(compute_dtype)
                tile = mm_buf[:n, : v1 - v0]
                torch.mm(hidden_chunk, w_chunk.t(), out=tile)
                if bias is not None:
                    tile.add_(bias[v0:v1].to(compute_dtype))
                previous_max = running_max[rows].clone() if with_grad else None
                fold = k._forward_kernel[(n,)] if triton else k._forward_tile
                fold(tile, tile.stride(0), targets[rows], running_max[rows], stats["sum_exp"][rows],
                     stats["x_sum_exp"][rows], stats["sq_sum_exp"][rows], stats["z_sum"][rows],
                     max_before_target[rows], stats["target_logit"][rows], v0, v1 - v0, BLOCK_SIZE=k._BLOCK_SIZE,
                     **flags, **kernel_args)
                if not with_grad:
                    continue
                new_max = running_max[rows]
                acc[rows].mul_(torch.exp(previous_max - new_max).unsqueeze(1))
                # the tile becomes exp(z - running max): TRL's backward kernel with gradient -1 and no target in the
                # tile computes -1 * (0 - exp(z - log_z)) in fp32 from the logits, with log_z := the running max
                unfold = k._backward_kernel[(n, -(-(v1 - v0) // k._BLOCK_SIZE))] if triton else k._backward_tile
                unfold(tile, tile.stride(0), no_target[:n], new_max, new_max, minus_one[:n], minus_one[:n], v0,
                       v1 - v0, HAS_LOGPROB_GRAD=True, HAS_ENTROPY_GRAD=False, BLOCK_SIZE=k._BLOCK_SIZE,
                       **kernel_args)
                k._addmm_fp32(acc[rows], tile, w_chunk)

        sum_exp = stats["sum_exp"]
        log_z = running_max + torch.log(sum_exp)
        log_probs = stats["target_logit"] - log_z
        entropy = log_z - stats["x_sum_exp"] / sum_exp if "entropy" in outputs else None
        log_sum_sq_probs = (torch.log(stats["sq_sum_exp"]) - 2 * torch.log(sum_exp)
                            if "log_sum_sq_probs" in outputs else None)
        mean_logits = stats["z_sum"] / vocab if "mean_logits" in outputs else None
        is_top1 = ((stats["target_logit"] >= running_max) & (stats["target_logit"] > max_before_target)
                   if "is_top1" in outputs else None)
        if with_grad:  # d log p_t / d h_t = W[target_t] - (sum_v exp(z_v - m) W_v) / sum_v exp(z_v - m)
            acc.div_(sum_exp.unsqueeze(1)).neg_().add_(weight.index_select(0, targets).float())
            ctx.save_for_backward(acc)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq_probs, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        if grad_entropy is not None:
            raise RuntimeError("head_grad: a gradient flows through the fused head's entropy output; the head computed "
                               "only the log-probability gradient in its forward (turn the head_grad speedup off)")
        if grad_log_probs is None:
            return (None,) * 7
        if not ctx.saved_tensors:
            raise RuntimeError("head_grad: backward through a head run without with_grad")
        (d_log_probs,) = ctx.saved_tensors
        grad_hidden = (d_log_probs * grad_log_probs.float().unsqueeze(1)).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None, None


def frozen(weight, bias) -> bool:
    """Whether the head gets no gradient of its own (what `log_probs` needs)."""
    return not weight.requires_grad and (bias is None or not bias.requires_grad)


def log_probs(hidden, weight, bias, targets, chunk_size, outputs):
    """The per-token outputs of TRL's fused head (see `LogProbHeadGradInForward`), gradient built in the forward
    when autograd will want it."""
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    if not frozen(weight, bias):
        raise ValueError("head_grad needs a frozen LM head (it computes no weight gradient)")
    return LogProbHeadGradInForward.apply(hidden, weight, bias, targets, chunk_size, tuple(outputs), with_grad)
