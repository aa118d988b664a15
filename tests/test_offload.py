"""Activation offloading (`offload` speedup, align/offload.py): the same gradients, the first activations moved,
weights never, prefetched ahead of the backward. On a CPU the "host" copy is a clone (`device_types=("cpu",)`),
which checks the bookkeeping; the CUDA streams are checked in tests/test_speed_cuda.py."""

import pytest
import torch
from torch._dynamo.utils import counters

from align import offload, speed
from align.config import ConfigError, RunArguments
from tests.test_speed import VOCAB, assert_same_grads, grads, tiny_lora_model


def _step(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    out.sum().backward()
    return out.detach(), grads(model)


@pytest.mark.parametrize("compiled", [False, True])
def test_offload_keeps_the_gradients_and_moves_the_first_activations(compiled):
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    try:
        torch._dynamo.reset()
        base, model = tiny_lora_model()
        if compiled:
            speed.compile_layers(base)
        plain = _step(model, ids)
        graphs = dict(counters["stats"])
        assert graphs.get("unique_graphs", 0) >= compiled
        hooks = offload.use_offload(base, max_gib=64 * 2**10 / offload.GIB, min_bytes=4096,
                                    ahead_bytes=128 * 2**10, device_types=("cpu",))
        waiting, unpack = [], hooks._unpack
        hooks._unpack = lambda saved: (unpack(saved), waiting.append(len(hooks._waiting)))[0]
        moved = _step(model, ids)
        hooks._unpack = unpack
        again = _step(model, ids)
        assert dict(counters["stats"]) == graphs  # compiled: the hooks run on the compiled function, no recompile
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(moved[0], plain[0], atol=0, rtol=0)
    assert_same_grads(moved[1], plain[1], tol=0)
    assert_same_grads(again[1], plain[1], tol=0)
    # 64 KiB a forward: some of the first layer's saved activations (2 x 64 tokens x 64 wide fp32 = 32 KiB each)
    assert 32 * 2**10 <= hooks.offloaded_bytes <= 64 * 2**10
    assert hooks.fetched_late == 0  # each came back before its backward asked for it
    # ... but not at the backward's start (the step's peak): only once it was 128 KiB of saved activations short
    assert waiting[0] > 0 and waiting[-1] == 0, waiting
    assert not hooks._waiting and not hooks._live  # every copy back was used and freed


def test_offload_leaves_weights_and_no_grad_forwards_alone():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)  # a 256 KiB weight, saved by the matmul for the input's gradient
    layer.weight.requires_grad_(False)
    hooks = offload.ActivationOffload(layer, max_bytes=2**30, min_bytes=16 * 2**10, device_types=("cpu",))
    x = torch.randn(4, 256, requires_grad=True)
    with hooks.forward():
        layer(x).sum().backward()
    assert hooks.offloaded_bytes == 0  # the weight is large enough, but it is a weight; x (4 KiB) is too small
    big = torch.randn(256, 256, requires_grad=True)
    with hooks.forward():
        out = layer(big * 2)  # a frozen weight: the matmul saves the weight (for the input's gradient), not the input
    assert hooks.offloaded_bytes == 0
    layer.weight.requires_grad_(True)
    layer(big * 2).sum().backward()
    plain, layer.weight.grad = layer.weight.grad, None
    with hooks.forward():
        out = layer(big * 2)
    assert hooks.offloaded_bytes == 256 * 2**10  # the input, saved for the weight's gradient
    out.sum().backward()
    assert torch.equal(layer.weight.grad, plain)
    with torch.no_grad(), hooks.forward():
        layer(big)
    assert hooks.offloaded_bytes == 256 * 2**10  # no forward with grad: the hooks were not installed
    with speed.head_without_grad(), hooks.forward():  # a forward whose result is detached (DPO's reference)
        kept = layer(big * 2)
    assert not hooks._waiting and not hooks._live and kept.requires_grad  # nothing moved for a graph left unused


def test_offload_is_cuda_only_and_its_size_checked():
    if not torch.cuda.is_available():
        assert speed.resolve("offload", "sft") == ()
        assert speed.resolve("auto", "sft").count("offload") == 0
    with pytest.raises(ConfigError, match="offload_gib"):
        RunArguments(offload_gib=0)
    assert RunArguments(offload_gib=2.5).offload_gib == 2.5
