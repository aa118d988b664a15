"""align/fp8.py: FP8 (e4m3, row-wise scales) matmuls for the frozen base layers of a LoRA model, on the CPU
(`torch._scaled_mm` runs there too; the speed is a GPU matter, measured in benchmarks/)."""

import math

import pytest
import torch
import torch.nn.functional as F

from align import config, fp8, fused_lora, speed

from .test_speed import VOCAB, tiny_lora_model

# row-wise FP8 matmuls on this machine's CPU (the tiny models' device) and on the stages' device
on_cpu = pytest.mark.skipif(fp8.device_supports_fp8("cpu") is not None, reason=str(fp8.device_supports_fp8("cpu")))
STAGE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_stage_device = pytest.mark.skipif(fp8.device_supports_fp8(STAGE_DEVICE) is not None,
                                     reason=str(fp8.device_supports_fp8(STAGE_DEVICE)))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@on_cpu
def test_fp8_linear_is_close_to_the_bf16_matmul_in_the_fp8_kernels_layouts(monkeypatch):
    """Forward and input gradient within FP8 rounding of bf16 (measured 3.7% relative, e4m3 has 3 mantissa bits);
    every `_scaled_mm` gets what the CUDA kernels require (a row-major e4m3 left operand, a column-major right one,
    sizes divisible by 16, row-wise fp32 scales of shape (M, 1) and (1, N)); the weight is quantized once."""
    calls = []
    real = torch._scaled_mm

    def checked(a, b, scale_a, scale_b, **kw):
        assert a.dtype == b.dtype == fp8.E4M3 and kw["out_dtype"] == torch.bfloat16
        assert a.stride(1) == 1 and a.stride(0) == a.shape[1], "left operand must be row-major"
        assert b.stride(0) == 1 and b.stride(1) == b.shape[0], "right operand must be column-major"
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
        assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.is_contiguous() and scale_b.is_contiguous()
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16).requires_grad_(False)
    w = lin.weight.detach().clone()
    x = torch.randn(4, 33, 256, dtype=torch.bfloat16, requires_grad=True)  # 132 tokens: M need not divide by 16
    want = F.linear(x, w)
    g = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, x, g)
    assert fp8.convertible(lin) is None
    fp8.to_fp8(lin)
    assert lin.weight.dtype == fp8.E4M3 and not lin.weight.requires_grad
    assert _rel(fp8.dequantized_weight(lin), w) < 0.03
    got = lin(x)
    (got_grad,) = torch.autograd.grad(got, x, g)
    assert got.dtype == got_grad.dtype == torch.bfloat16 and got.shape == want.shape
    assert _rel(got, want) < 0.05 and _rel(got_grad, want_grad) < 0.05
    assert 0.01 < _rel(got, want)  # it did run in FP8 (bf16 alone would be ~0.3%)
    assert calls == [((132, 256), (256, 512)), ((132, 512), (512, 256))]


def _benchmark(name: str):
    """A module of benchmarks/ (its scripts import each other by name)."""
    import importlib
    import os
    import sys

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def test_gradient_cosines_name_the_worst_parameter_and_count_a_missing_one_as_zero():
    """benchmarks/fp8_numerics.py's comparison of two runs' LoRA gradients (also fp8_grad_drift.py's)."""
    gradient_cosines = _benchmark("fp8_numerics").gradient_cosines
    g = torch.arange(1.0, 7.0).view(2, 3)
    want = {"a": g, "b": g, "c": g, "d": g}
    got = {"a": g * 3, "b": -g, "c": g + torch.tensor([[0.0, 0, 0], [0, 0, 10]])}
    out = gradient_cosines(got, want)
    assert out["parameters"] == 4 and out["min"] == -1.0 and out["min_parameter"] == "b"
    cos_c = F.cosine_similarity(got["c"].flatten(), g.flatten(), dim=0).item()
    assert out["median"] == pytest.approx((0.0 + cos_c) / 2, abs=1e-4)  # sorted: -1, 0 (d missing), cos_c, 1


@on_cpu
def test_fp8_gradients_drift_more_than_bf16_ones_on_a_random_model():
    """benchmarks/fp8_grad_drift.py on a 2-layer, 128-wide random Llama: bf16's first-step LoRA gradients within
    rounding of fp32's, FP8's further off but still the same direction."""
    out = _benchmark("fp8_grad_drift").drift(2, 128, 256, 32, torch.device("cpu"))
    assert out["bf16_vs_fp32"]["parameters"] == out["fp8_vs_fp32"]["parameters"] == 14  # LoRA B of 7 layers x 2
    assert out["bf16_vs_fp32"]["min"] > 0.99
    assert 0.5 < out["fp8_vs_fp32"]["min"] < out["bf16_vs_fp32"]["min"]
    assert out["fp8_vs_fp32"]["median"] < out["bf16_vs_fp32"]["median"]


def test_layers_that_cannot_take_fp8_are_named():
    assert "divide by 16" in fp8.convertible(torch.nn.Linear(64, 40).requires_grad_(False))
    assert "trained weight" in fp8.convertible(torch.nn.Linear(64, 64))
    assert "plain nn.Linear" in fp8.convertible(torch.nn.Embedding(64, 64))


def _batch():
    return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))


@on_cpu
def test_fp8_base_trains_only_the_adapter_and_keeps_the_loss():
    """On a tiny LoRA Llama: all 14 base layers go to FP8 and hold 2 bytes per weight (the two e4m3 copies) with no
    floating-point copy of the weight left; the loss is within 1% of the fp32 model's and the LoRA gradients point
    the same way (cosine > 0.99); Adam steps lower the loss, change the adapter only, and leave the FP8 weights
    bit for bit."""
    ids = _batch()
    _, plain = tiny_lora_model()
    want = plain(input_ids=ids, labels=ids).loss
    want.backward()
    _, model = tiny_lora_model()
    assert fp8.use_fp8(model) == 14
    bases = [m for m in model.modules() if fp8.is_fp8(m)]
    assert len(bases) == 14 and all(b.weight.dtype == fp8.E4M3 and b.fp8_weight_t.dtype == fp8.E4M3 for b in bases)
    assert all(b.weight.nbytes + b.fp8_weight_t.nbytes == 2 * b.weight.numel() for b in bases)
    assert not any(p.requires_grad for b in bases for p in b.parameters())
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-2) and loss.item() != want.item()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys() and all("lora_" in n for n in grads)
    for n in grads:
        assert F.cosine_similarity(grads[n].flatten(), want_grads[n].flatten(), dim=0) > 0.99, n

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_fp8 = [(b.weight.detach().clone(), b.fp8_weight_t.clone()) for b in bases]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(b.weight.view(torch.uint8).equal(w.view(torch.uint8)) and b.fp8_weight_t.view(torch.uint8).equal(
        t.view(torch.uint8)) for b, (w, t) in zip(bases, before_fp8))


@on_cpu
def test_fp8_layers_save_no_more_activations_than_bf16_ones():
    """The FP8 base matmul keeps nothing of `x` for its backward (only the resident weight copies): a compiled
    tiny bf16 LoRA model with `fused_lora` saves the same activation bytes with and without `fp8`."""
    import os
    import sys

    import torch._dynamo

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import saved_activations

    ids = _batch()
    saved = []
    try:
        for use in (False, True):
            torch._dynamo.reset()
            base, model = tiny_lora_model(outputs=("log_probs",))
            base.to(torch.bfloat16)
            if use:
                fp8.use_fp8(model)
            fused_lora.use_fused_lora(model)
            speed.compile_layers(base)
            forward = lambda m=model: m(input_ids=ids, labels=ids, fused_lm_head=True).log_probs  # noqa: E731
            forward().sum().backward()
            saved.append(saved_activations.saved_activation_mib(model, forward))
    finally:
        torch._dynamo.reset()
    assert saved[0] > 0 and saved[1] <= saved[0], saved


@on_cpu
def test_compiled_fp8_layers_match_eager_fp8_without_graph_breaks():
    """`compile` + `fused_lora` + `fp8` (inductor on the CPU): the eager FP8 model's log-probs (measured equal to
    1e-6) and LoRA gradients (0.3% apart: the compiled quantization rounds in another order), no graph break. The
    FP8 matmuls stay ATen calls (cuBLAS on a GPU): inductor's GEMM backends are ATen only once FP8 layers compile."""
    import torch._dynamo
    import torch._inductor.config as inductor

    backends, inductor.max_autotune_gemm_backends = inductor.max_autotune_gemm_backends, "ATEN,TRITON"
    ids = _batch()
    results = []
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            base, model = tiny_lora_model(outputs=("log_probs",))
            assert fp8.use_fp8(model) == 14 and fused_lora.use_fused_lora(model) == 14
            if compiled:
                speed.compile_layers(base)
                assert inductor.max_autotune_gemm_backends == "ATEN"
            out = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
            out.sum().backward()
            results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        assert not torch._dynamo.utils.counters["graph_break"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()
        inductor.max_autotune_gemm_backends = backends
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    for n, g in results[0][1].items():
        assert _rel(results[1][1][n], g) < 2e-2, n


def _dequantized_mm(a_q, a_scale, b_q, b_scale, out_dtype, fast_accum):
    """`fp8._mm` as a plain matmul of the dequantized operands: the FP8 layers' autograd on any torch and device."""
    return ((a_q.float() * a_scale) @ (b_q.float() * b_scale.view(-1, 1)).t()).to(out_dtype)


def test_compiled_bf16_fp8_layers_keep_their_input_gradients(monkeypatch):
    """A bf16 LoRA model (the GPU's dtype) whose FP8 layers' matmuls are emulated: compiled layers give eager's LoRA
    gradients in every layer (cosine > 0.99). torch 2.11 dropped the base layers' input gradients here while the
    FP8 layer returned `out.to(x.dtype)`, a no-op alias for bf16 (earlier layers at cosine 0.17-0.66, as on the
    H100 / H200 in calls 18 and 19); `fp8.cast` returns `out` itself."""
    import torch._dynamo

    monkeypatch.setattr(fp8, "_mm", _dequantized_mm)
    ids = _batch()
    grads = []
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            base, model = tiny_lora_model(outputs=("log_probs",))
            model = model.to(torch.bfloat16)
            assert fp8.use_fp8(model) == 14 and fused_lora.use_fused_lora(model) == 14
            if compiled:
                speed.compile_layers(base)
            (-model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.float().mean()).backward()
            grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        torch._dynamo.reset()
    assert grads[1].keys() == grads[0].keys() and len(grads[0]) == 28
    cos = {n: F.cosine_similarity(grads[1][n].flatten(), g.flatten(), dim=0).item() for n, g in grads[0].items()}
    assert min(cos.values()) > 0.99, {n: round(c, 3) for n, c in cos.items() if c <= 0.99}


def test_cast_never_returns_the_no_op_alias():
    t = torch.ones(2, dtype=torch.bfloat16)
    assert fp8.cast(t, torch.bfloat16) is t
    assert fp8.cast(t, torch.float32).dtype == torch.float32


def test_resolve_leaves_fp8_out_where_it_does_not_apply(monkeypatch):
    lora = config.ModelArguments(model_name_or_path="m", use_peft=True)
    monkeypatch.setattr(fp8, "device_supports_fp8", lambda device: "no FP8 here")
    assert speed.resolve("fp8", "sft", lora) == ()  # a device without (row-wise) FP8 matmuls
    monkeypatch.setattr(fp8, "device_supports_fp8", lambda device: None)
    monkeypatch.setattr(speed, "_torch_version", lambda: (2, 13))  # torch_nf4 on this CPU (test_speed.py)
    assert "fp8" in speed.resolve("fp8", "sft", lora)
    assert "fp8" not in speed.resolve("auto", "sft", lora)  # opt-in: it changes the numerics
    for kbit in ({"load_in_4bit": True}, {"load_in_8bit": True}, {"use_peft": False}):
        args = config.ModelArguments(model_name_or_path="m", **{"use_peft": True, **kbit})
        assert speed.resolve("fp8", "dpo", args) == ()
    qlora = config.ModelArguments(model_name_or_path="m", use_peft=True, load_in_4bit=True)
    assert speed.resolve("compile,torch_nf4,fp8", "sft", qlora) == ("compile", "torch_nf4", "fp8")


@on_stage_device
def test_stages_with_fp8_keep_the_losses_and_dpo_starts_at_log2(tiny_llama, chat_jsonl, preference_jsonl, tmp_path):
    """SFT with the FP8 base: the first loss within 1% of the plain run's, the mean over 6 steps at learning rate
    3e-2 within 2% (the two runs' paths drift apart step by step: measured 0.7% and 0.1%, last step 3%), falling as
    fast. DPO from that
    adapter: the reference (adapter off) runs through the same FP8 base, so the first loss is log 2 exactly."""
    from align import dpo, sft

    from .test_dpo import dpo_argv
    from .test_sft import losses, sft_argv

    runs = [sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / s), max_steps=6, speedups=s,
                              eval_split_size=0)) for s in ("none", "fp8")]
    assert runs[1].align_speedups == ("fp8",)
    assert sum(fp8.is_fp8(m) for m in runs[1].model.modules()) == 14
    got, want = losses(runs[1]), losses(runs[0])
    assert got[0] == pytest.approx(want[0], rel=1e-2) and got[0] != want[0]
    assert sum(got) / 6 == pytest.approx(sum(want) / 6, rel=2e-2)
    assert got[-1] < got[0] - 1.5 and want[-1] < want[0] - 1.5
    run = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / "dpo"), max_steps=3, speedups="fp8",
                            eval_split_size=0, sft_adapter=str(tmp_path / "fp8"), learning_rate=1e-3))
    assert run.align_speedups == ("fp8",)
    assert losses(run)[0] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY,
                    reason="FP8 tensor cores: CUDA compute capability 8.9+")
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_on_a_gpu_runs_the_fp8_kernels_close_to_bf16(compiled):
    """On an FP8 GPU (cuBLASLt's row-wise FP8, under inductor when compiled): a bf16 LoRA model with `fp8` gives
    the bf16 model's loss within 1% and LoRA gradients at cosine > 0.99."""
    import torch._dynamo

    ids = _batch().cuda()
    out = []
    try:
        for use in (False, True):
            torch._dynamo.reset()
            base, model = tiny_lora_model(outputs=("log_probs",))
            model = model.cuda().to(torch.bfloat16)
            if use:
                assert fp8.use_fp8(model) == 14
            fused_lora.use_fused_lora(model)
            if compiled:
                speed.compile_layers(base)
            loss = -model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.float().mean()
            loss.backward()
            out.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    finally:
        torch._dynamo.reset()
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-2)
    cos = {n: F.cosine_similarity(out[1][1][n].flatten(), g.flatten(), dim=0).item() for n, g in out[0][1].items()}
    assert min(cos.values()) > 0.99, {n: round(c, 3) for n, c in cos.items() if c <= 0.99}


@on_stage_device
def test_the_gpus_auto_set_with_fp8_runs_the_stages(tiny_llama, chat_jsonl, preference_jsonl, tmp_path):
    """What a GPU user with `auto,fp8` gets, on the CPU: packed rows, reference first, compiled layers with
    recomputation and fused LoRA, plus FP8 base layers. SFT's first loss within 1% of the same set without fp8,
    both falling; DPO from that adapter starts at log 2 and its loss falls."""
    import torch._dynamo

    from align import dpo, sft

    from .test_dpo import dpo_argv
    from .test_sft import losses, sft_argv

    gpu_auto = "padding_free,shared_prompt,ref_first,compile,lean,fused_lora"
    runs = {}
    try:
        for spec in (gpu_auto, gpu_auto + ",fp8"):
            torch._dynamo.reset()
            runs[spec] = sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / f"sft{len(runs)}"), max_steps=4,
                                           speedups=spec, eval_split_size=0))
        torch._dynamo.reset()
        run = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / "dpo"), max_steps=3,
                                speedups=gpu_auto + ",fp8", eval_split_size=0, sft_adapter=str(tmp_path / "sft1"),
                                learning_rate=1e-3))
    finally:
        import torch._functorch.config as functorch

        functorch.activation_memory_budget = 1.0  # lean's budget is process-wide
        torch._dynamo.reset()
    got, want = losses(runs[gpu_auto + ",fp8"]), losses(runs[gpu_auto])
    assert runs[gpu_auto + ",fp8"].align_speedups == ("padding_free", "compile", "lean", "fused_lora", "fp8")
    assert got[0] == pytest.approx(want[0], rel=1e-2) and got[-1] < got[0] - 1 and want[-1] < want[0] - 1
    assert run.align_speedups == ("shared_prompt", "ref_first", "compile", "lean", "fused_lora", "fp8")
    dpo_losses = losses(run)
    assert dpo_losses[0] == pytest.approx(math.log(2), abs=1e-6) and dpo_losses[-1] < dpo_losses[0]
