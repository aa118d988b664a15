"""Segment attention: causal attention inside the segments of one packed row (`padding_free` SFT rows,
`shared_prompt` DPO and reward-model pair rows), registered with transformers as the `ATTENTION` implementation
(SDPA whenever no layout is set). On a GPU a row is one flash-varlen call per layer; equal samples are one batched
SDPA call. See `align.speed` for the packed forwards that set the layout."""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F

ATTENTION = "align_segments"  # the attention implementation registered for padding_free / shared_prompt


_layout: list | None = None  # [(q_start, q_end, [(kv_start, kv_end), ...]), ...] of the current packed row
_layout_len: int = -1
_layout_equal: bool = False
_layout_pairs: tuple | None = None  # (pairs, prompt, completion): shared-prompt pairs all of one shape
_varlen_plan: dict = {}  # per device: the layout as flash-varlen arguments, built once per forward for all layers
_pairs_plan: dict = {}  # per device: `DENSE_PAIRS`' plan (gather indices, kernel choice), built once per forward
# Set by `speed.finish` from the `dense_pairs` option (in `auto` on a GPU): a row of equal shared-prompt pairs runs
# as stock's dense layout ([prompt | chosen] and [prompt | rejected] gathered into 2 x pairs causal sequences) in one
# batched SDPA call, which a Hopper GPU runs with cuDNN's kernel, instead of one flash-varlen (FlashAttention-2)
# call: 14% more attention flops at a higher rate. Whole DPO steps +4.0% (1B) / +3.9% (8B) on an H200, +3.1-3.2%
# with the key heads repeated on an H100 (benchmarks/README.md, Call32). Rows of unequal pairs keep flash varlen.
DENSE_PAIRS = False


def set_layout(segments: list | None, length: int = -1) -> None:
    """Set the segments of the packed row that the next forward (and its backward recompute) attends within.

    The layout stays set after the forward on purpose: gradient checkpointing recomputes attention in the backward.
    The next forward of a wrapped model replaces it; a call with another sequence length ignores it."""
    global _layout, _layout_len, _layout_equal, _layout_pairs
    _layout, _layout_len = segments, length
    _varlen_plan.clear()
    _pairs_plan.clear()
    # equal samples, each attending to itself: one batched causal call (decided once, not in every layer)
    _layout_equal = bool(segments) and len({q1 - q0 for q0, q1, _ in segments}) == 1 and all(
        len(kv) == 1 and kv[0] == (q0, q1) for q0, q1, kv in segments)
    pairs = _equal_pairs(segments) if DENSE_PAIRS else None
    _layout_pairs = pairs if pairs and pairs[0] * (pairs[1] + 2 * pairs[2]) == length else None  # the whole row


def pair_segments(pairs: int, prompt: int, completion: int) -> list:
    """The layout of `pairs` shared-prompt rows of one shape, back to back: prompt + chosen attending to itself,
    then the rejected completion attending to the prompt and itself."""
    p, c, out = prompt, completion, []
    for i in range(pairs):
        o = i * (p + 2 * c)
        out += [(o, o + p + c, [(o, o + p + c)]), (o + p + c, o + p + 2 * c, [(o, o + p), (o + p + c, o + p + 2 * c)])]
    return out


def _equal_pairs(segments) -> tuple | None:
    """(pairs, prompt, completion) when `segments` is `pair_segments` of some shape (chosen and rejected of equal
    length), else None."""
    if not segments or len(segments) % 2 or len(segments[1][2]) != 2:
        return None
    (_, prompt_end), _ = segments[1][2]
    shape = (len(segments) // 2, prompt_end - segments[0][0], segments[1][1] - segments[1][0])
    return shape if shape[1] > 0 and shape[2] > 0 and segments == pair_segments(*shape) else None


def pair_indices(pairs: int, prompt: int, completion: int, device=None) -> tuple:
    """For `DENSE_PAIRS`: the row positions of stock's 2 x pairs sequences (pairs x 2, prompt + completion) and, for
    each row position in order, the flat index of its output among those sequences' outputs."""
    p, c, seqs, keep = prompt, completion, [], []
    length = p + c
    for i in range(pairs):
        o = i * (p + 2 * c)
        seqs += [torch.arange(o, o + p + c), torch.cat([torch.arange(o, o + p), torch.arange(o + p + c, o + p + 2 * c)])]
        keep += [torch.arange(2 * i * length, (2 * i + 1) * length),  # prompt + chosen from the chosen sequence
                 torch.arange((2 * i + 1) * length + p, (2 * i + 2) * length)]  # rejected from the rejected one
    device = device or "cpu"
    return torch.stack(seqs).to(device, non_blocking=True), torch.cat(keep).to(device, non_blocking=True)


def _pairs_args(device) -> tuple:
    """`pair_indices` of the current layout on `device`, and whether SDPA has a fused kernel there that takes
    `enable_gqa` (`_gqa_kernels`): decided on the host, once per forward, for every layer."""
    plan = _pairs_plan.get(device)
    if plan is None:
        plan = _pairs_plan[device] = (*pair_indices(*_layout_pairs, device=device), _gqa_kernels(device))
    return plan


def _gqa_kernels(device) -> bool:
    """SDPA's flash and cuDNN kernels take `enable_gqa` (half precision, a CUDA GPU of compute capability 8.0 or
    newer). Elsewhere the memory-efficient kernel, which does not, would be passed over for the math one, which
    builds the whole score matrix: there the key heads are repeated instead."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _pairs_attention(query, key, value, scaling, plan, repeat_heads: bool | None = None):
    """`DENSE_PAIRS`: the row's equal pairs as stock's 2 x pairs causal sequences in one batched SDPA call, the key
    heads through `enable_gqa` where a fused kernel takes it (`plan`'s third item, for half-precision inputs),
    else repeated to the query heads (`repeat_heads` forces either; repeated ran 0.7% slower in whole H200 steps).
    (1, heads, T, dim) in, (1, T, heads, dim) out, the rejected sequences' prompt outputs dropped."""
    seqs, keep, *gqa_kernels = plan
    if repeat_heads is None:
        repeat_heads = not (gqa_kernels and gqa_kernels[0] and query.dtype in _VARLEN_DTYPES)
    heads, dim = query.shape[1], query.shape[3]
    gather = lambda x: x[0][:, seqs].transpose(0, 1)  # (1, H, T, D) -> (2 x pairs, H, prompt + completion, D)
    q, k, v = gather(query), gather(key), gather(value)
    gqa = k.shape[1] != heads
    if gqa and repeat_heads:
        k, v = (x.repeat_interleave(heads // k.shape[1], dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa and not repeat_heads)
    return out.transpose(1, 2).reshape(-1, heads, dim)[keep][None]


_VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # flash attention's


def _varlen():
    """torch's flash-attention varlen entry (torch >= 2.9), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_args(device):
    """(cu_seq_q, cu_seq_k, max_q, max_k, key_index) of the current layout: queries are the packed row in order
    (segments are consecutive), keys are each segment's key ranges back to back (`key_index` None when every
    segment attends to its own range)."""
    plan = _varlen_plan.get(device)
    if plan is None:
        q_lens = [q1 - q0 for q0, q1, _ in _layout]
        k_lens = [sum(b - a for a, b in kv) for _, _, kv in _layout]
        own = all(len(kv) == 1 and kv[0] == (q0, q1) for q0, q1, kv in _layout)
        cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32).to(device, non_blocking=True)
        index = None if own else torch.cat([torch.arange(a, b) for _, _, kv in _layout for a, b in kv]).to(
            device, non_blocking=True)
        plan = _varlen_plan[device] = (cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), index)
    return plan


def _varlen_attention(query, key, value, scaling, varlen):
    """All segments of a layout in one flash-varlen call (`varlen`: `_varlen_args`): (1, heads, T, dim) in,
    (1, T, heads, dim) out. Causal masks are lower-right aligned (a rejected completion's queries are the last of
    its prompt+own keys)."""
    varlen_attn, causal, has_gqa = _varlen_call()
    cu_q, cu_k, max_q, max_k, index = varlen
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, dim)
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
    kwargs = dict(scale=scaling, **causal)
    if q.shape[1] != k.shape[1]:
        if has_gqa:
            kwargs["enable_gqa"] = True
        else:  # releases without the flag: repeat the key/value heads
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)[None]


_varlen_fns: tuple | None = None


def _varlen_call():
    """varlen_attn, its causal keyword (`is_causal` in torch 2.9-2.11, `window_size=(-1, 0)` later) and whether it
    takes `enable_gqa`. Looked up once (on the host, by `packed_attention_kwargs`, before any traced call reads it)."""
    global _varlen_fns
    if _varlen_fns is None:
        import inspect

        varlen_attn = _varlen()
        params = inspect.signature(varlen_attn).parameters
        causal = dict(is_causal=True) if "is_causal" in params else dict(window_size=(-1, 0))
        _varlen_fns = (varlen_attn, causal, "enable_gqa" in params)
    return _varlen_fns


def use_varlen(query, dropout) -> bool:
    """Flash varlen applies: CUDA, half precision, no attention dropout, torch has it."""
    return (query.is_cuda and query.dtype in _VARLEN_DTYPES and not dropout
            and _varlen() is not None)


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for `ATTENTION`: query/key/value (1, heads, tokens, dim) of one packed row. Each segment's queries
    attend causally (lower-right aligned) to the concatenation of its key ranges: a sample to itself, a rejected
    completion to its prompt and itself. Without a layout for this forward: transformers' SDPA attention.

    The packed forwards hand every layer the layout as tensors and ints (`packed_attention_kwargs`, key
    `SEGMENTS_KEY`): read here, attention is traced inside a compiled decoder layer (one compiled region per layer,
    no graph break). Otherwise the layout set by `set_layout` is read on the host (`_segment_attention_eager`)."""
    packed = kwargs.pop(SEGMENTS_KEY, None)
    if packed is not None and query.shape[0] == 1:
        equal, varlen, pairs = packed
        if equal:
            return _equal_attention(query, key, value, equal, dropout, scaling), None
        if pairs is not None and not dropout:
            return _pairs_attention(query, key, value, scaling, pairs), None
        if varlen is not None and not dropout and query.dtype in _VARLEN_DTYPES:
            return _varlen_attention(query, key, value, scaling, varlen), None
    return _segment_attention_eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)


def _equal_attention(query, key, value, n, dropout, scaling):
    """`n` equal-length samples of one packed row, each causal on itself: one batched SDPA call (GQA without
    repeating the keys). (1, heads, T, dim) in, (1, T, heads, dim) out."""
    heads, dim, t = query.shape[1], query.shape[3], query.shape[2]
    split = lambda x: x[0].unflatten(1, (n, t // n)).transpose(0, 1)
    out = F.scaled_dot_product_attention(split(query), split(key), split(value), dropout_p=dropout, is_causal=True,
                                         scale=scaling, enable_gqa=heads != key.shape[1])
    return out.permute(0, 2, 1, 3).reshape(1, t, heads, dim)


SEGMENTS_KEY = "align_segments"


def _varlen_device(device) -> bool:
    """Flash varlen runs on CUDA devices (tests put a CPU stand-in behind `_varlen`)."""
    return device.type == "cuda"


def packed_attention_kwargs(device) -> dict:
    """The current layout for the layers of a packed forward, as keyword arguments transformers passes down to
    every attention call: `{SEGMENTS_KEY: (n, varlen, pairs)}` with `n` the number of equal samples (0 otherwise),
    `varlen` the flash-varlen arguments (`_varlen_args`, CUDA) or None and `pairs` `DENSE_PAIRS`' plan (gather
    indices and the kernel choice, `_pairs_args`) or None. Empty when the attention cannot run from them (no layout; unequal segments without flash varlen: the
    host-side per-segment calls then)."""
    if _layout is None:
        return {}
    if _layout_equal:
        return {SEGMENTS_KEY: (len(_layout), None, None)}
    if DENSE_PAIRS and _layout_pairs is not None:
        return {SEGMENTS_KEY: (0, None, _pairs_args(device))}
    if _varlen_device(device) and _use_varlen and _varlen() is not None:
        _varlen_call()
        return {SEGMENTS_KEY: (0, _varlen_args(device), None)}
    return {}


@torch.compiler.disable
def _segment_attention_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """`segment_attention` from the layout set by `set_layout` (a graph break under torch.compile: it reads the
    layout on the host). Without a layout for this length: transformers' SDPA attention.

    Samples run as SDPA's causal flash kernel (GQA without repeating the keys; equal-length samples in one batched
    call); a rejected completion runs lower-right causal flash on its prompt+own keys, repeated to the query heads
    (the lower-right path has no GQA)."""
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if _layout is None or query.shape[2] != _layout_len or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = heads != kv_heads
    if _layout_equal:  # equal samples: one batched causal call
        return _equal_attention(query, key, value, len(_layout), dropout, scaling), None
    if DENSE_PAIRS and _layout_pairs is not None and not dropout:  # equal pairs as stock's sequences
        return _pairs_attention(query, key, value, scaling, _pairs_args(query.device)), None
    if _use_varlen and use_varlen(query, dropout):  # every other layout: one flash-varlen call for all segments
        return _varlen_attention(query, key, value, scaling, _varlen_args(query.device)), None
    outs = []
    for q0, q1, kv in _layout:
        q = query[:, :, q0:q1]
        if len(kv) == 1 and kv[0] == (q0, q1):
            outs.append(F.scaled_dot_product_attention(q, key[:, :, q0:q1], value[:, :, q0:q1], dropout_p=dropout,
                                                       is_causal=True, scale=scaling, enable_gqa=gqa))
            continue
        k = repeat_kv(torch.cat([key[:, :, a:b] for a, b in kv], dim=2), heads // kv_heads)
        v = repeat_kv(torch.cat([value[:, :, a:b] for a, b in kv], dim=2), heads // kv_heads)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q1 - q0, k.shape[2]),
                                                   dropout_p=dropout, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


_use_varlen = True  # tests switch it off to compare against the per-segment calls


def _segment_mask(*args, **kwargs):
    """Mask function for `ATTENTION`: no mask while a layout is set (segment attention needs none), else SDPA's."""
    from transformers.masking_utils import sdpa_mask

    if _layout is not None and kwargs.get("q_length", -2) == _layout_len:
        return None
    return sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def no_mask_building():
    """For the packed forwards: transformers builds no mask for an attention implementation that has no mask
    function, so `ATTENTION`'s is taken out of the registry for the call. Segment attention needs no mask while a
    layout is set, and on the way to the mask function transformers looks for packed sequences in the position ids
    (`find_packed_sequence_indices`), a host read of a device tensor: a GPU sync in every forward."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as registry

    taken = [(m, m.pop(ATTENTION)) for m in (registry._global_mapping, getattr(registry, "_local_mapping", None))
             if isinstance(m, dict) and ATTENTION in m]
    try:
        yield
    finally:
        for mapping, fn in taken:
            mapping[ATTENTION] = fn


def supports_segment_attention(config) -> bool:
    """Plain causal self-attention only: no sliding window in use, no attention softcap, no MoE routing."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "use_sliding_window", True) and getattr(text, "sliding_window", None) is not None:
        return False
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "final_logit_softcapping", None):
        return False
    scales = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")  # TRL's head applies them
    return all(getattr(text, k, None) in (None, 1.0) for k in scales) and not hasattr(text, "num_experts_per_tok")


def segment_attention_blocker(model, kinds=("sdpa", "eager")) -> str | None:
    """Why `model` (a transformers causal LM) cannot switch to segment attention, or None when it can: its
    attention must be one of `kinds` (or segment attention already) and plain causal (`supports_segment_attention`)."""
    impl = model.config._attn_implementation
    if impl == ATTENTION:
        return None
    if impl not in kinds:
        return f"{impl} attention kept"
    if not supports_segment_attention(model.config):
        return "sliding window, softcap or MoE"
    return None


def use_segment_attention(model) -> None:
    """Register `ATTENTION` with transformers and switch `model` to it (SDPA whenever no layout is set)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, segment_attention)
    AttentionMaskInterface.register(ATTENTION, _segment_mask)
    model.set_attn_implementation(ATTENTION)
