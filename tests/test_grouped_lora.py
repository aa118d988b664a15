"""align/grouped_lora.py (`group_lora`): a block's q/k/v and gate/up LoRA layers as one fused LoRA op each in the
compiled layers: the separate layers' values and gradients, fewer ops, one weight buffer, eager paths untouched."""

import math
import os
import sys

import pytest
import torch

from align import dpo, fused_lora, grouped_lora, speed
from tests import test_dpo
from tests.test_dpo import dpo_argv, losses
from tests.test_speed import REPO, VOCAB, assert_same_grads, grads, tiny_lora_model


def _compiled_step(group: bool, budget=None):
    """One forward and backward of the compiled tiny LoRA model: (log-probs, LoRA grads, inductor's code of the
    forward graphs, groups, model)."""
    from torch._inductor.utils import run_and_get_code

    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    base, model = tiny_lora_model()
    fused_lora.use_fused_lora(model)
    groups = grouped_lora.group_lora(model) if group else 0
    speed.compile_layers(base, memory_budget=budget)

    def step():
        out = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        out.sum().backward()
        return out.detach()

    try:
        out, code = run_and_get_code(step)
    finally:
        import torch._functorch.config as functorch

        functorch.activation_memory_budget = 1.0
        torch._dynamo.reset()
    forward = "\n".join(c for c in code if "_forward']" in c.split("\n", 1)[0])  # the forward graphs' code
    return out, grads(model), forward, groups, model

sft_adapter = test_dpo.sft_adapter  # its module-scoped fixture


@pytest.mark.parametrize("budget", [None, 0.5])  # compile; compile + lean
def test_grouped_layers_give_the_separate_layers_values_and_gradients(budget):
    want, want_grads, want_code, _, _ = _compiled_step(False, budget)
    got, got_grads, code, groups, model = _compiled_step(True, budget)
    assert groups == 4  # 2 layers x (q/k/v, gate/up)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_same_grads(got_grads, want_grads)
    # the forward graphs (one shared by both layers): 7 LoRA ops a layer separately, 4 grouped
    separate, grouped = (c.count("align.lora_linear_ab.default(") for c in (want_code, code))
    assert separate > 0 and grouped * 7 == separate * 4, (separate, grouped)
    # every handed output was taken: nothing left on the members
    assert all(getattr(m, "_align_precomputed", None) is None for m in model.modules())


def test_grouped_outputs_keep_no_buffer_alive_for_one_slice():
    """v goes to attention as it is and the backward keeps it: as a view of the group's output it would keep all of
    q/k/v alive (a Llama-3.2-1B layer at DPO's budget 0.2: 15.1 instead of 12.1 MiB per 1,024 tokens; 1B DPO peak
    6.0 -> 7.2 GiB on an H100). Every storage the compiled grouped layers save from is saved whole (gate and up,
    both kept, may share theirs)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import saved_activations

    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    base, model = tiny_lora_model()
    fused_lora.use_fused_lora(model)
    assert grouped_lora.group_lora(model) == 4
    speed.compile_layers(base)
    try:
        forward = lambda: model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs  # noqa: E731
        forward().sum().backward()  # compiled outside the count
        storages = saved_activations.saved_storages(model, forward)
    finally:
        torch._dynamo.reset()
    assert storages
    partly = {ptr: used for ptr, used in storages.items() if used[1] < used[0]}
    assert not partly, f"saved storages (bytes, bytes saved from them) kept alive for a slice: {partly}"


def test_group_lora_moves_the_base_weights_into_one_buffer_and_leaves_eager_alone():
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    _, model = tiny_lora_model()
    fused_lora.use_fused_lora(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    assert grouped_lora.group_lora(model) == 4
    attn = model.base_model.model.model.layers[0].self_attn
    buffer = attn._align_group_weight_0
    assert buffer.shape[0] == sum(getattr(attn, n).base_layer.weight.shape[0] for n in ("q_proj", "k_proj", "v_proj"))
    for n in ("q_proj", "k_proj", "v_proj"):  # views of the buffer, not copies
        assert getattr(attn, n).base_layer.weight.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert set(model.state_dict()) == keys  # the buffer is not saved; adapters and base keys unchanged
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    with torch.no_grad():  # eager: each layer as before, bit for bit
        assert torch.equal(model(input_ids=ids).logits, before)
    member = attn.k_proj
    x = torch.randn(1, 3, 64)
    member._align_precomputed = (x, torch.zeros(1, 3, 32))
    assert grouped_lora.take_precomputed(member, x.clone()) is None  # another tensor: not this input's output
    assert grouped_lora.take_precomputed(member, x).shape == (1, 3, 32) and member._align_precomputed is None


def test_ddp_leaves_the_group_buffers_alone(tmp_path):
    """DDP broadcasts every module buffer from rank 0 in each forward: the groups' weight buffers (every q/k/v and
    gate/up base weight) are on its ignore list."""
    import torch.distributed as dist

    _, model = tiny_lora_model()
    fused_lora.use_fused_lora(model)
    grouped_lora.group_lora(model)
    names = {n for n, _ in model.named_buffers() if "_align_group_weight_" in n}
    assert len(names) == 4 and set(model._ddp_params_and_buffers_to_ignore) == names
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        kept = {id(b) for b in ddp.modules_buffers}
        assert not any(id(b) in kept for n, b in model.named_buffers() if n in names)
    finally:
        dist.destroy_process_group()


def test_group_lora_needs_compile_and_fused_lora(monkeypatch):
    assert "group_lora" not in speed.resolve("compile,group_lora", "sft")
    assert "group_lora" not in speed.resolve("fused_lora,group_lora", "sft")
    assert speed.resolve("compile,fused_lora,group_lora", "sft")[-1] == "group_lora"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "group_lora" not in speed.resolve("auto", "sft")  # a CPU's auto has no compile (a GPU's: tests/test_speed)


GPU_DPO = "shared_prompt,ref_first,compile,lean,fused_lora,group_lora,head_grad"  # a GPU's auto for DPO (bf16 base)


def test_compiled_dpo_with_grouped_lora_keeps_the_losses(tiny_llama, preference_jsonl, tmp_path, monkeypatch):
    """DPO with the reference through the policy's compiled graph (B = 0 in the grouped op too), with the rest of a
    GPU's `auto` (lean, the head's gradient built in its forward): first loss log 2, the eager run's losses."""
    made = []
    real = grouped_lora.group_lora
    monkeypatch.setattr(grouped_lora, "group_lora", lambda m: made.append(real(m)) or made[-1])
    runs = {}
    for spec in ("ref_first", GPU_DPO):
        runs[spec] = speed_run = dpo.main(
            dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / spec.replace(",", "_")), max_steps=3,
                     speedups=spec, eval_split_size=0, learning_rate=1e-2))
        assert speed_run.align_speedups == tuple(spec.split(","))
    assert made and made[0] > 0
    want, got = losses(runs["ref_first"]), losses(runs[GPU_DPO])
    assert got[0] == pytest.approx(math.log(2), abs=1e-6)
    assert got == pytest.approx(want, abs=1e-4) and len(set(got)) == 3


def test_compiled_reward_stage_with_grouped_lora_keeps_the_losses(tiny_llama, preference_jsonl, tmp_path,
                                                                  monkeypatch):
    """The reward model (a sequence classifier) with a GPU's `auto` for RM on a bf16 base: its decoder blocks
    grouped, the per-step losses of the same compiled set without grouping (both differ from eager's by ~2e-4 at
    step 2 after a 1e-2 update: compiled fp32 rounding)."""
    from align import rm
    from tests.test_rm import rm_argv

    made = []
    real = grouped_lora.group_lora
    monkeypatch.setattr(grouped_lora, "group_lora", lambda m: made.append(real(m)) or made[-1])
    runs = {spec: rm.main(rm_argv(tiny_llama, preference_jsonl, str(tmp_path / spec.replace(",", "_")), max_steps=3,
                                  eval_split_size=0, speedups=spec, learning_rate=1e-2))
            for spec in ("shared_prompt,compile,lean,fused_lora", "shared_prompt,compile,lean,fused_lora,group_lora")}
    assert made and made[0] > 0
    want, got = (losses(runs[k]) for k in runs)
    assert got == pytest.approx(want, abs=1e-4) and len(set(got)) == 3


def test_compiled_dpo_from_an_sft_adapter_with_grouped_lora(tiny_llama, sft_adapter, preference_jsonl, tmp_path):
    """The SFT adapter as DPO's reference, carried by the policy adapter through the grouped op
    (`AdapterSwitch.stand_in("ref")`: A and B swapped under the group's concatenation): first loss log 2 (the policy
    starts as the SFT adapter) and the eager run's losses."""
    runs = {}
    for spec in ("ref_first", "shared_prompt,ref_first,compile,fused_lora,group_lora"):
        runs[spec] = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / spec.replace(",", "_")),
                                       sft_adapter=sft_adapter, max_steps=3, speedups=spec, eval_split_size=0,
                                       learning_rate=1e-2))
    assert runs["shared_prompt,ref_first,compile,fused_lora,group_lora"].reference_in_policy_graph
    want, got = losses(runs["ref_first"]), losses(runs["shared_prompt,ref_first,compile,fused_lora,group_lora"])
    assert got[0] == pytest.approx(math.log(2), abs=1e-6)
    assert got == pytest.approx(want, abs=1e-4) and len(set(got)) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_layers_on_cuda_in_bf16():
    """On a GPU: a bf16 model under autocast, compiled with and without the grouping: the same log-probs and LoRA
    gradients to bf16's rounding (cuBLAS takes other kernels for the wider GEMMs)."""
    outs = []
    ids = torch.randint(0, VOCAB, (2, 256), generator=torch.Generator().manual_seed(1)).cuda()
    for group in (False, True):
        torch._dynamo.reset()
        base, model = tiny_lora_model()
        base.to("cuda", torch.bfloat16)
        fused_lora.use_fused_lora(model)
        if group:
            assert grouped_lora.group_lora(model) == 4
        speed.compile_layers(base)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        out.float().sum().backward()
        outs.append((out.detach().float(), grads(model)))
    torch._dynamo.reset()
    (want, want_grads), (got, got_grads) = outs
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    for k in want_grads:
        assert ((got_grads[k].float() - want_grads[k].float()).norm() / want_grads[k].float().norm()).item() < 5e-2, k
