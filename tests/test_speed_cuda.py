"""GPU-only checks of align/speed.py's attention paths (skipped without CUDA; run on the device machine with
`python3 -m pytest -q tests/test_speed_cuda.py`). Reference: dense attention in fp32 with the layout's mask."""

import pytest
import torch

from align import packed_attention, speed

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dense_reference(q, k, v, layout):
    """fp32 attention over the whole row with a boolean mask built from the layout (lower-right causal)."""
    t = q.shape[2]
    mask = torch.zeros(t, t, dtype=torch.bool, device=q.device)
    for q0, q1, kv in layout:
        keys = torch.cat([torch.arange(a, b, device=q.device) for a, b in kv])
        n_q, n_k = q1 - q0, len(keys)
        allowed = torch.arange(n_k, device=q.device)[None] <= (torch.arange(n_q, device=q.device)[:, None] + n_k - n_q)
        rows = torch.arange(q0, q1, device=q.device)
        mask[rows[:, None], keys[None]] = allowed
    rep = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(rep, dim=1) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask)
    return out.transpose(1, 2)


def layouts():
    sft = [(0, 300, [(0, 300)]), (300, 1000, [(300, 1000)]), (1000, 1017, [(1000, 1017)]), (1017, 1500, [(1017, 1500)])]
    dpo, o = [], 0
    for p, c, r in ((200, 300, 100), (50, 600, 700), (400, 5, 3)):  # prompt | chosen | rejected
        dpo += [(o, o + p + c, [(o, o + p + c)]), (o + p + c, o + p + c + r, [(o, o + p), (o + p + c, o + p + c + r)])]
        o += p + c + r
    # reward-model pairs: shared prefix 200, the same sequence twice, nothing shared (rejected attends to itself)
    g = torch.Generator().manual_seed(0)
    pairs = [(500, 200, 350), (300, 300, 300), (100, 0, 120)]  # chosen length, common prefix, rejected length
    chosen = [torch.randint(3, 1000, (c,), generator=g) for c, _, _ in pairs]
    rejected = [torch.cat([ch[:p], torch.randint(1000, 2000, (r - p,), generator=g)]) for ch, (_, p, r) in
                zip(chosen, pairs)]
    rows = chosen + rejected
    ids = torch.zeros(len(rows), max(len(x) for x in rows), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, :len(x)] = x
    packed, _, rm, _ = speed.reward_pair_layout(ids, (ids != 0).long(), 0)
    return {"sft": (sft, 1500), "dpo": (dpo, o), "rm": (rm, len(packed))}


@cuda
@pytest.mark.parametrize("name", ["sft", "dpo", "rm"])
def test_varlen_attention_equals_dense_masked_attention_and_the_per_segment_calls(name):
    layout, t = layouts()[name]
    torch.manual_seed(0)
    q = torch.randn(1, 32, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, t, 32, 64, device="cuda", dtype=torch.bfloat16)
    results = {}
    for use in (True, False):
        packed_attention._use_varlen = use
        packed_attention.set_layout(layout, t)
        out, _ = packed_attention.segment_attention(None, q, k, v, None, scaling=64 ** -0.5)
        grads = torch.autograd.grad(out, (q, k, v), g)
        results[use] = (out.float(), [x.float() for x in grads])
    packed_attention._use_varlen = True
    packed_attention.set_layout(None)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = dense_reference(q32, k32, v32, layout)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g.float())
    for out, grads in results.values():
        assert (out - ref).abs().max().item() < 2e-2
        for a, b in zip(grads, ref_grads):
            assert (a - b).abs().max().item() < 5e-2 * max(1.0, b.abs().max().item())
    assert (results[True][0] - results[False][0]).abs().max().item() < 2e-2


@cuda
def test_dense_pairs_equal_the_dense_masked_attention():
    """`dense_pairs` on a GPU: a row of equal pairs through the layers' arguments (enable_gqa where flash / cuDNN
    take it) and with the key heads repeated gives the layout's masked fp32 attention and its gradients."""
    pairs, prompt, completion = 3, 200, 150
    layout, t = packed_attention.pair_segments(pairs, prompt, completion), pairs * (prompt + 2 * completion)
    torch.manual_seed(0)
    q = torch.randn(1, 32, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, t, 32, 64, device="cuda", dtype=torch.bfloat16)
    before = packed_attention.DENSE_PAIRS
    packed_attention.DENSE_PAIRS = True
    try:
        packed_attention.set_layout(layout, t)
        kwargs = packed_attention.packed_attention_kwargs(q.device)
        plan = kwargs[packed_attention.SEGMENTS_KEY][2]
        assert plan is not None and plan[2] == (torch.cuda.get_device_capability() >= (8, 0))
        outs = [packed_attention.segment_attention(None, q, k, v, None, scaling=64 ** -0.5, **kwargs)[0],
                packed_attention._pairs_attention(q, k, v, 64 ** -0.5, plan, repeat_heads=True)]
        results = [(o.float(), [x.float() for x in torch.autograd.grad(o, (q, k, v), g)]) for o in outs]
    finally:
        packed_attention.DENSE_PAIRS = before
        packed_attention.set_layout(None)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = dense_reference(q32, k32, v32, layout)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g.float())
    for out, grads in results:
        assert (out - ref).abs().max().item() < 2e-2
        for a, b in zip(grads, ref_grads):
            assert (a - b).abs().max().item() < 5e-2 * max(1.0, b.abs().max().item())


def first_sync(main, argv, monkeypatch):
    """Run a stage with torch's sync debug mode raising from the end of step 2: the steps reached and the traceback
    frames of the first synchronizing call."""
    import traceback

    from transformers import TrainerCallback

    from align import training

    steps = []

    class SyncCheck(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)
            if state.global_step == 2:
                torch.cuda.set_sync_debug_mode("error")

    real = training.train_and_evaluate

    def with_check(trainer, *a, **kw):
        trainer.add_callback(SyncCheck())
        return real(trainer, *a, **kw)

    monkeypatch.setattr(training, "train_and_evaluate", with_check)
    try:
        with pytest.raises(RuntimeError, match="synchronizing CUDA operation") as err:
            main(argv)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    frames = traceback.extract_tb(err.value.__traceback__)
    print("first sync:", " > ".join(f"{f.name} ({f.filename.rsplit('/', 2)[-1]}:{f.lineno})" for f in frames[-8:]))
    return steps, frames


def assert_first_sync_is_the_log_line(steps, frames, step_frames):
    """The first wait `first_sync` found is the log line after step 6, not inside a training step."""
    names = [f.name for f in frames]
    where = f"steps {steps}, first sync in: {' > '.join(names)}"
    assert steps[-1] == 6 and "_maybe_log_save_evaluate" in names, where
    assert not ({"training_step"} | step_frames) & set(names), where


@cuda
def test_no_gpu_sync_between_sft_log_lines(tiny_llama, chat_jsonl, tmp_path, monkeypatch):
    """From the end of step 2 to the log line of step 6, nothing waits for the GPU (batch copy, NaN guard, deferred
    metrics, padding-free layout and LM head, backward, clipping, optimizer): torch's sync debug mode raises at the
    first synchronizing call, and that is the log line reading the loss. Before the host-planned LM head it was
    TRL's fused head picking the trained tokens with a boolean index (`hidden_states[mask]`) in step 3's forward."""
    from align import sft

    from .test_sft import sft_argv

    steps, frames = first_sync(sft.main, sft_argv(
        tiny_llama, chat_jsonl, str(tmp_path / "out"), max_steps=6, logging_steps=6, eval_split_size=0,
        speedups="padding_free,fused_lora,non_blocking"), monkeypatch)
    assert_first_sync_is_the_log_line(steps, frames, {"_packed_sample_forward", "compute_loss"})


@cuda
def test_no_gpu_sync_between_dpo_log_lines(tiny_llama, preference_jsonl, tmp_path, monkeypatch):
    """DPO with the shared-prompt row, reference first and non-blocking batches: from the end of step 2 to the log
    line of step 6 nothing waits for the GPU; the first synchronizing call is the log line reading the queued
    metrics. Until align's `DeferredDPOMetrics`, it was TRL's DPO loss reading its metrics on the host (`.item()`,
    about a dozen per step) in step 3 (measured on an H200, 2026-12-03)."""
    from align import dpo

    from .test_dpo import dpo_argv

    steps, frames = first_sync(dpo.main, dpo_argv(
        tiny_llama, preference_jsonl, str(tmp_path / "out"), max_steps=6, logging_steps=6, eval_split_size=0,
        speedups="shared_prompt,ref_first,fused_lora,non_blocking"), monkeypatch)
    assert_first_sync_is_the_log_line(steps, frames, {"_shared_prompt_forward", "_compute_loss"})


@cuda
def test_offload_keeps_the_gradients_and_frees_what_it_moved():
    """`offload` with its CUDA streams (pinned host copies on a side stream, prefetched back): a compiled bf16 LoRA
    model's log-probs and adapter gradients as without it, each offloaded tensor back before its backward asked for
    it, and, once the copies are done, what the forward holds for the backward lower by what was offloaded."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from align import fused_lora, offload

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=4)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    add_fused_lm_head(base, outputs=("log_probs",))
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    fused_lora.use_fused_lora(model)
    ids = torch.randint(0, 1000, (1, 8192), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator frees blocks whose side-stream copies are done
        held = torch.cuda.memory_allocated() - before
        out.float().sum().backward()
        torch.cuda.synchronize()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, held

    try:
        torch._dynamo.reset()
        speed.compile_layers(base)
        step()
        plain, again = step(), step()
        hooks = offload.use_offload(base, max_gib=0.25)
        step()
        moved = step()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(moved[0], plain[0], atol=0, rtol=0)
    assert moved[1].keys() == plain[1].keys() and plain[1]
    for k in plain[1]:  # attention's backward may add in another order from run to run: that run-to-run spread
        noise = (again[1][k] - plain[1][k]).norm() / plain[1][k].norm()
        diff = (moved[1][k] - plain[1][k]).norm() / plain[1][k].norm()
        assert diff <= max(4 * noise, 1e-5), (k, diff.item(), noise.item())
    assert 0.1 * offload.GIB <= hooks.offloaded_bytes <= 0.25 * offload.GIB  # up to the first tensor that did not fit
    assert hooks.fetched_late == 0
    assert plain[2] - moved[2] >= 0.9 * hooks.offloaded_bytes, (plain[2], moved[2], hooks.offloaded_bytes)
