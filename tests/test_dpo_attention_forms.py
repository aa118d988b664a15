"""benchmarks/dpo_attention_forms.py: stock's dense layout gathered from the shared-prompt row gives the row's
attention, and the CPU run writes every form."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def row_mask(segments, t):
    """The shared-prompt row's attention as one (T, T) boolean mask: each segment's queries see its key ranges up
    to their own position (lower-right causal over the gathered keys)."""
    mask = torch.zeros(t, t, dtype=torch.bool)
    for q0, q1, kv in segments:
        keys = torch.cat([torch.arange(a, b) for a, b in kv])
        for i, q in enumerate(range(q0, q1)):
            mask[q, keys[: len(keys) - (q1 - q0) + i + 1]] = True
    return mask


def test_dense_and_varlen_forms_give_the_rows_attention(monkeypatch):
    import dpo_attention_forms as daf

    from align import packed_attention, testing

    testing.use_cpu_varlen(monkeypatch.setattr)
    shape, prompt, completion = daf.SHAPES["tiny"], 5, 3
    q, k, v = daf.make(shape, prompt, completion, "cpu", torch.float64, seed=3)
    segments = packed_attention.pair_segments(shape["pairs"], prompt, completion)
    assert segments[1] == (8, 11, [(0, 5), (8, 11)])  # the first rejected piece: the prompt's keys and its own
    seqs, keep = plan = packed_attention.pair_indices(shape["pairs"], prompt, completion)
    assert seqs[1].tolist() == [0, 1, 2, 3, 4, 8, 9, 10] and len(keep) == q.shape[2]
    group = shape["heads"] // shape["kv_heads"]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
        attn_mask=row_mask(segments, q.shape[2])).transpose(1, 2)
    torch.testing.assert_close(daf.dense_form(q, k, v, plan, None), expected)
    torch.testing.assert_close(daf.dense_form(q, k, v, plan, None, repeat_heads=True), expected)
    torch.testing.assert_close(daf.varlen_form(q, k, v, segments), expected)
    # the dense layout computes more pairs: the prompt's queries twice
    assert daf.visible_pairs(segments) < 2 * shape["pairs"] * (prompt + completion) * (prompt + completion + 1) // 2


def test_dense_pairs_attention_in_a_layer_gives_the_segments_outputs_and_gradients(monkeypatch):
    """`packed_attention.DENSE_PAIRS` (the `dense_pairs` option): a row of equal pairs through the layers' arguments
    gives the per-segment attention's outputs and q / k / v gradients; rows of unequal pairs (or not the whole row)
    keep the other paths."""
    from align import packed_attention

    monkeypatch.setattr(packed_attention, "_use_varlen", False)  # the reference: per-segment SDPA calls
    g = torch.Generator().manual_seed(4)
    prompt, completion, pairs = 6, 4, 3
    t = pairs * (prompt + 2 * completion)
    q, k, v = (torch.randn(1, h, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn(1, t, 4, 8, generator=g, dtype=torch.float64)
    segments = packed_attention.pair_segments(pairs, prompt, completion)
    packed_attention.set_layout(segments, t)
    try:
        ref, _ = packed_attention.segment_attention(None, q, k, v, None)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        assert packed_attention.packed_attention_kwargs(q.device) == {}  # off: nothing for the layers on a CPU
        monkeypatch.setattr(packed_attention, "DENSE_PAIRS", True)
        packed_attention.set_layout(segments, t)  # read when a layout is set
        kwargs = packed_attention.packed_attention_kwargs(q.device)
        assert kwargs[packed_attention.SEGMENTS_KEY][2] is not None
        for form in ("layers", "enable_gqa"):  # as the layers run it (a CPU: key heads repeated), and through gqa
            out, _ = packed_attention.segment_attention(None, q, k, v, None, **kwargs) if form == "layers" else (
                packed_attention._pairs_attention(q, k, v, 8 ** -0.5, kwargs[packed_attention.SEGMENTS_KEY][2],
                                                  repeat_heads=False), None)
            torch.testing.assert_close(out, ref)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
                torch.testing.assert_close(a, b)
        packed_attention.set_layout(segments[:-1] + [(segments[-1][0], segments[-1][1] - 1, segments[-1][2])], t)
        assert packed_attention._layout_pairs is None  # a shorter last rejected piece: not equal pairs
        packed_attention.set_layout(segments, t + 1)
        assert packed_attention._layout_pairs is None  # the segments do not cover the row
    finally:
        packed_attention.set_layout(None)


def test_cpu_run_writes_every_form(tmp_path, monkeypatch):
    import dpo_attention_forms as daf

    from align import packed_attention

    for name in ("_varlen", "_varlen_device", "_VARLEN_DTYPES", "_varlen_fns"):  # main routes them to the stand-in
        monkeypatch.setattr(packed_attention, name, getattr(packed_attention, name))
    assert daf.main(["--shapes", "tiny", "--prompt", "6", "--completion", "4", "--reps", "1",
                     "--out", str(tmp_path)]) == 0
    (tiny,) = json.loads((tmp_path / "dpo_attention_forms_cpu.json").read_text())["shapes"]
    assert set(tiny["forms"]) == {"varlen", "dense_math", "dense_math_repeat"}
    assert all(f["ms"] > 0 for f in tiny["forms"].values())
    assert tiny["forms"]["dense_math"]["max_abs_diff_from_varlen"] < 1e-5
    assert tiny["forms"]["dense_math_repeat"]["max_abs_diff_from_varlen"] < 1e-5
    assert tiny["visible_pairs"]["varlen"] < tiny["visible_pairs"]["dense"]


def test_dense_pairs_repeats_the_key_heads_where_no_fused_kernel_takes_gqa(monkeypatch):
    """`enable_gqa` only where flash / cuDNN run it (a CUDA GPU of compute capability 8.0+, half precision):
    elsewhere SDPA would fall past the memory-efficient kernel to the math one, so the key heads are repeated."""
    from align import packed_attention

    for capability, want in (((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert packed_attention._gqa_kernels(torch.device("cuda")) is want
    assert packed_attention._gqa_kernels(torch.device("cpu")) is False
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.shape[1], kw["enable_gqa"])) or sdpa(q, k, v, **kw))
    plan = packed_attention.pair_indices(2, 3, 2)
    for dtype, kernels, want in ((torch.bfloat16, True, (2, True)), (torch.float32, True, (4, False)),
                                 (torch.bfloat16, False, (4, False))):
        q, k, v = (torch.randn(1, h, 14, 8, dtype=dtype) for h in (4, 2, 2))
        packed_attention._pairs_attention(q, k, v, 8 ** -0.5, (*plan, kernels))
        assert seen.pop() == want  # (key heads SDPA got, enable_gqa)
