"""align/head_grad.py: TRL's fused-head outputs with the hidden-state gradient built in the forward, against TRL's
own `ChunkedLogProbFunction` (fp32 on the CPU, several vocabulary and token tiles)."""

import os
import sys

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels import chunked_logprob as trl_kernel

from align import head_grad

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import head_grad as head_grad_benchmark  # noqa: E402

OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
N, H, V, CHUNK = 37, 16, 300, 64  # 5 vocabulary tiles, the last one partial


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="TRL's Triton kernels need a CUDA GPU"))]


def _inputs(dtype=torch.float32, bias=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).to(device, dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g)
    # the largest logits late in the vocabulary, so the running maximum grows tile by tile and rescales
    weight[V - 40:] *= 3
    b = torch.randn(V, generator=g).to(device, dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    weights = torch.randn(N, generator=g).to(device)  # a loss that weighs every token's log-probability differently
    return hidden, weight.to(device, dtype), b, targets, weights


def _run(fn, hidden, weight, b, targets, weights):
    hidden.grad = None
    out = fn(hidden, weight, b, targets)
    (out[0].float() * weights).sum().backward()
    return [None if x is None else x.detach() for x in out], hidden.grad.clone()


def trl(hidden, weight, b, targets):
    return ChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, CHUNK, None, 1.0, ("log_probs",) + OUTPUTS)


def ours(hidden, weight, b, targets):
    return head_grad.log_probs(hidden, weight, b, targets, CHUNK, ("log_probs",) + OUTPUTS)


@pytest.mark.parametrize("device", DEVICES)  # torch tiles on the CPU, TRL's Triton kernels on a GPU
@pytest.mark.parametrize("token_chunk", [4096, 16])  # one token tile; three (the last one partial)
@pytest.mark.parametrize("bias", [False, True])
def test_outputs_and_hidden_gradient_are_trls(token_chunk, bias, device, monkeypatch):
    monkeypatch.setattr(trl_kernel, "TOKEN_CHUNK_SIZE", token_chunk)
    args = _inputs(bias=bias, device=device)
    want, want_grad = _run(trl, *args)
    got, got_grad = _run(ours, *args)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    assert want_grad.abs().max() > 0.1  # a real gradient, not zeros on both sides


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_gradient_is_as_close_to_fp32_as_trls(device):
    """In bf16 (the GPU dtype) both heads round the logits tiles; the gradient built in the forward is no further
    from the fp32 one than TRL's recomputed gradient is."""
    exact = _run(trl, *_inputs(device=device))[1]
    trl_bf16 = _run(trl, *_inputs(torch.bfloat16, device=device))[1].float()
    ours_bf16 = _run(ours, *_inputs(torch.bfloat16, device=device))[1].float()
    err = lambda g: ((g - exact).norm() / exact.norm()).item()
    assert err(ours_bf16) < max(1.5 * err(trl_bf16), 1e-2), (err(ours_bf16), err(trl_bf16))


def _matmul_flops(fn, args, backward=True):
    hidden, weight, b, targets, weights = args
    with head_grad_benchmark.MatmulFlops() as counter:
        out = fn(hidden, weight, b, targets)
        if backward:
            (out[0] * weights).sum().backward()
    return counter.flops


def test_a_training_step_projects_twice_instead_of_three_times():
    args = _inputs()
    projection = 2 * N * V * H
    assert _matmul_flops(trl, args) == 3 * projection
    assert _matmul_flops(ours, args) == 2 * projection
    with torch.no_grad():  # a reference forward: no gradient work, the same single projection as TRL's
        assert _matmul_flops(ours, args, backward=False) == projection == _matmul_flops(trl, args, backward=False)


def test_what_it_does_not_compute_is_refused():
    hidden, weight, b, targets, _ = _inputs()
    with pytest.raises(ValueError, match="frozen LM head"):
        head_grad.log_probs(hidden, weight.requires_grad_(), b, targets, CHUNK, ("entropy",))
    out = head_grad.log_probs(hidden, weight.detach(), b, targets, CHUNK, ("entropy",))
    with pytest.raises(RuntimeError, match="entropy"):
        (out[0].sum() + out[1].sum()).backward()


def test_fused_head_keeps_trls_kernel_for_a_trained_head(monkeypatch):
    """`speed.fused_head(head_grad=True)` on a head that trains (lm_head in modules_to_save, full fine-tuning) runs
    TRL's function, which gives the weight its gradient; on a frozen head it builds the gradient in the forward."""
    from types import SimpleNamespace

    from align import speed

    hidden, weight, _, targets, _ = _inputs()
    rows = torch.arange(N)
    mask = torch.ones(1, N, dtype=torch.bool)
    real = head_grad.LogProbHeadGradInForward.apply
    for trained in (True, False):
        head = torch.nn.Linear(H, V, bias=False)
        head.weight.data.copy_(weight)
        head.weight.requires_grad_(trained)
        model = SimpleNamespace(get_output_embeddings=lambda head=head: head)
        calls = []
        monkeypatch.setattr(head_grad.LogProbHeadGradInForward, "apply",
                            lambda *a, calls=calls, real=real: calls.append(1) or real(*a))
        hidden.grad = None
        speed.fused_head(model, hidden, rows, targets, rows, mask, ("log_probs",), head_grad=True).loss.backward()
        monkeypatch.undo()
        assert (calls == []) is trained and hidden.grad.abs().sum() > 0
        assert (head.weight.grad is not None and bool(head.weight.grad.abs().sum() > 0)) is trained
