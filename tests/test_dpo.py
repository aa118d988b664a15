"""DPO stage on tiny random models: the SFT adapter is the reference, on one shared base."""

import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from align import dpo, fused_lora, sft, stacking
from align.manifest import read_json

from .test_sft import base_state, losses, sft_argv


def dpo_argv(model, data, out, **overrides):
    args = dict(beta="0.1", max_length="128", learning_rate="5e-3", max_steps="12", eval_split_size="8")
    args.update(overrides)
    return sft_argv(model, data, out, **args)


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama, chat_jsonl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "sft")
    sft.main(sft_argv(tiny_llama, chat_jsonl, out, max_steps=10))
    return out


def first_logged(trainer, key):
    return next(h[key] for h in trainer.state.log_history if key in h)


def test_logged_reward_metrics_weigh_every_pair_alike(tiny_llama, sft_adapter, preference_jsonl, tmp_path):
    """5 held-out pairs in eval batches of 2 (2, 2, 1): the logged reward accuracy and margin are the per-pair
    means that align/evaluate.py computes, not TRL's mean of batch means (where the lone pair weighs a third)."""
    from align.eval import models, preference

    out = str(tmp_path / "dpo")
    dpo.main(dpo_argv(tiny_llama, preference_jsonl, out, sft_adapter=sft_adapter, max_steps=2, learning_rate=2e-3,
                      eval_split_size=5, per_device_eval_batch_size=2))
    m = read_json(os.path.join(out, "run.json"))["metrics"]
    model, tok = models.load_causal_lm(models.resolve_model("dpo", out), with_reference=True)
    pairs, _ = preference.load_pairs(os.path.join(out, "heldout_pairs.jsonl"))
    assert len(pairs) == 5
    each = [preference.implicit_reward_accuracy(model, tok, [p], beta=0.1) for p in pairs]
    margins = [e["reward_margin"] for e in each]
    assert m["eval_rewards/margins"] == pytest.approx(sum(margins) / 5, abs=1e-5)
    assert m["eval_rewards/accuracies"] == pytest.approx(sum(e["implicit_reward_accuracy"] for e in each) / 5)
    batch_means = [sum(b) / len(b) for b in (margins[0:2], margins[2:4], margins[4:])]
    assert abs(sum(batch_means) / 3 - sum(margins) / 5) > 1e-4  # what TRL alone would have logged differs


def test_dpo_from_sft_adapter(tiny_llama, sft_adapter, preference_jsonl, tmp_path):
    sft_weights = load_file(os.path.join(sft_adapter, "adapter_model.safetensors"))
    out = str(tmp_path / "dpo")
    trainer = dpo.main(dpo_argv(tiny_llama, preference_jsonl, out, sft_adapter=sft_adapter))

    # step 0: policy == reference (the SFT adapter), so the sigmoid loss is exactly log 2 and rewards are 0.
    # With the bare base as reference the SFT-trained policy would differ from it and the loss would not be log 2.
    assert first_logged(trainer, "loss") == pytest.approx(math.log(2), abs=1e-4)
    assert abs(first_logged(trainer, "rewards/chosen")) < 1e-4
    import json
    manifest = json.load(open(os.path.join(out, "run.json")))
    m = manifest["metrics"]
    assert m["before_eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert m["before_eval_loss"] == pytest.approx(math.log(2), abs=1e-4)

    # after training the margin and the reward accuracy rise, on held-out pairs too
    assert m["eval_rewards/margins"] > 0.5
    assert m["eval_rewards/accuracies"] >= 0.9
    train_eval = trainer.evaluate(trainer.train_dataset, metric_key_prefix="train_pairs")
    assert train_eval["eval_rewards/accuracies"] >= 0.9 and train_eval["eval_rewards/margins"] > 0.5

    # the reference adapter never moved and equals the SFT adapter on disk; the SFT files are untouched
    seen_ref = {n: p for n, p in trainer.model.named_parameters() if ".ref." in n}
    assert len(seen_ref) == len(sft_weights), "no reference adapter was used"
    for name, p in seen_ref.items():
        assert not p.requires_grad
        assert torch.equal(p, sft_weights[name.replace(".ref.", ".")]), name
    assert all(torch.equal(v, load_file(os.path.join(sft_adapter, "adapter_model.safetensors"))[k])
               for k, v in sft_weights.items())

    # base weights unchanged, one copy of the base in memory, no reference model
    base = base_state(tiny_llama)
    model = trainer.model
    base_params = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().state_dict().items()
                   if "lora_" not in n}
    for k, v in base.items():
        assert torch.equal(base_params[k], v), k
    assert trainer.ref_model is None
    loaded = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)  # every weight of the model
    assert loaded == sum(v.numel() for v in base.values())

    # lineage: the parent SFT adapter and the reference used; the saved adapter names the right base
    assert manifest["lineage"]["reference"] == "sft_adapter"
    assert manifest["lineage"]["parent_adapter"]["path"] == os.path.abspath(sft_adapter)
    assert stacking.adapter_base(out) == os.path.abspath(tiny_llama) or stacking.adapter_base(out) == tiny_llama
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert saved.keys() == sft_weights.keys()  # the policy only, not TRL's "ref" copy
    assert not os.path.isdir(os.path.join(out, "ref"))
    heldout = [json.loads(line) for line in open(os.path.join(out, "heldout_pairs.jsonl"))]
    assert len(heldout) == 8 and heldout[0]["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_loss_types_fall(loss_type, tiny_llama, preference_jsonl, tmp_path):
    extra = {"label_smoothing": "0.1"} if loss_type == "robust" else {}
    trainer = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / loss_type), loss_type=loss_type,
                                eval_split_size="0", **extra))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] * 0.9, losses


def test_dpo_qlora_runs(tiny_llama, preference_jsonl, tmp_path):
    out = str(tmp_path / "qlora")
    trainer = dpo.main(dpo_argv(tiny_llama, preference_jsonl, out, load_in_4bit="true", dtype="bfloat16",
                                max_steps="4", eval_split_size="0"))
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_dpo_refuses_an_adapter_for_another_base(tiny_model_factory, sft_adapter, preference_jsonl, tmp_path):
    with pytest.raises(stacking.AdapterError, match="was trained on"):
        dpo.main(dpo_argv(tiny_model_factory("qwen2"), preference_jsonl, str(tmp_path / "x"), sft_adapter=sft_adapter))


def test_dpo_merged_sft_and_precomputed_reference(tiny_llama, sft_adapter, preference_jsonl, tmp_path):
    """Both options keep the SFT policy as the reference: the step-0 loss is log 2 either way."""
    import json

    merged = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / "merged"), sft_adapter=sft_adapter,
                               merge_sft_adapter="true", max_steps="3", eval_split_size="0"))
    assert first_logged(merged, "loss") == pytest.approx(math.log(2), abs=1e-4)
    run = json.load(open(tmp_path / "merged" / "run.json"))
    assert run["lineage"]["reference"] == "merged_sft"

    pre = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / "pre"), sft_adapter=sft_adapter,
                            precompute_ref_log_probs="true", max_steps="3", eval_split_size="0"))
    assert first_logged(pre, "loss") == pytest.approx(math.log(2), abs=1e-4)
    assert "ref_chosen_logps" in pre.train_dataset.column_names


def test_qlora_dpo_from_a_qlora_sft_adapter_starts_at_log2(tiny_llama, chat_jsonl, preference_jsonl, tmp_path):
    """TRL casts a QLoRA policy adapter to bf16 after copying it into the "ref" adapter; align gives the reference
    the policy's dtype, so with fp32 compute the step-0 loss is exactly log 2 (was 0.6925, margins 1.3e-3)."""
    q = dict(load_in_4bit="true", dtype="float32", bnb_4bit_compute_dtype="float32")
    sft_out, out = str(tmp_path / "sft_q"), str(tmp_path / "dpo_q")
    sft.main(sft_argv(tiny_llama, chat_jsonl, sft_out, max_steps=6, **q))
    trainer = dpo.main(dpo_argv(tiny_llama, preference_jsonl, out, max_steps=1, sft_adapter=sft_out, **q))
    params = dict(trainer.model.named_parameters())
    refs = [n for n in params if ".ref." in n]
    assert refs and all(params[n].dtype == params[n.replace(".ref.", ".default.")].dtype for n in refs)
    metrics = read_json(os.path.join(out, "run.json"))["metrics"]
    assert metrics["before_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["before_eval_rewards/margins"] == 0.0


@pytest.mark.parametrize("from_sft", [True, False])  # reference = the SFT adapter's frozen copy; = the base
def test_ref_first_computes_the_reference_before_the_policy_with_trls_losses(
        from_sft, tiny_llama, sft_adapter, preference_jsonl, tmp_path, monkeypatch):
    """`ref_first`: in every training step the reference forward (no grad) runs before the policy forward (grad),
    TRL's order reversed, and the losses are TRL's (to 1e-6, and log 2 at step 0)."""
    import transformers

    calls = []
    real = transformers.LlamaModel.forward  # the decoder, under TRL's and PEFT's forwards
    monkeypatch.setattr(transformers.LlamaModel, "forward",
                        lambda self, *a, **k: calls.append(torch.is_grad_enabled()) or real(self, *a, **k))
    parent = dict(sft_adapter=sft_adapter) if from_sft else {}
    runs = {}
    for spec in ("none", "ref_first"):
        calls.clear()
        runs[spec] = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / spec), max_steps=3,
                                       speedups=spec, eval_split_size=0, learning_rate=1e-2, **parent))
        order = [(calls[i], calls[i + 1]) for i in range(0, len(calls), 2)]
        assert len(calls) == 6 and set(order) == ({(False, True)} if spec == "ref_first" else {(True, False)})
    assert runs["ref_first"].align_speedups == ("ref_first",) and runs["ref_first"].reference_first
    assert not runs["none"].reference_first
    got, want = losses(runs["ref_first"]), losses(runs["none"])
    assert got == pytest.approx(want, abs=1e-6) and got[0] == pytest.approx(math.log(2), abs=1e-6)
    assert len(set(want)) == 3  # the policy moved


@pytest.mark.parametrize("speedups", ["none", "ref_first", "shared_prompt,ref_first"])
def test_deferred_training_metrics_log_what_trl_logs(tiny_llama, sft_adapter, preference_jsonl, tmp_path,
                                                     monkeypatch, speedups):
    """DPO training steps compute TRL's loss and queue its metrics on the device, read once per log line: the
    losses, rewards, margins, accuracies, log-probs, mean logits, entropy, token accuracy and token counts logged
    (windows of 3 steps, evaluations in between) are those of TRL's own `_compute_loss`, and no training step
    reads a number on the host."""
    from align.dpo import DeferredDPOMetrics

    real = DeferredDPOMetrics._deferred_dpo_applies
    used, reads, stepping = [], [], []

    def counted(self, return_outputs):
        used.append(real(self, return_outputs))
        return used[-1]

    def run(name):
        trainer = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / name), sft_adapter=sft_adapter,
                                    max_steps=6, logging_steps=3, eval_strategy="steps", eval_steps=2,
                                    eval_split_size=6, learning_rate=1e-2, speedups=speedups))
        return trainer, [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]

    # host reads of a tensor during a training step's loss (item / tolist / bool / boolean index)
    def watch(name):
        real_read = getattr(torch.Tensor, name)

        def read(t):
            if stepping and stepping[-1]:
                caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
                reads.append(f"{name} in {'/'.join(caller.split('/')[-2:])}")
            return real_read(t)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__"):
        watch(name)
    loss_of = DeferredDPOMetrics._compute_loss

    def watched(self, model, inputs, return_outputs):
        stepping.append(self.model.training)
        try:
            return loss_of(self, model, inputs, return_outputs)
        finally:
            stepping.clear()

    monkeypatch.setattr(DeferredDPOMetrics, "_compute_loss", watched)
    monkeypatch.setattr(DeferredDPOMetrics, "_deferred_dpo_applies", counted)
    trainer, deferred = run("deferred")
    assert used.count(True) == 6 and not trainer._metrics["train"]
    train_reads = list(reads)
    monkeypatch.setattr(DeferredDPOMetrics, "_deferred_dpo_applies", lambda self, return_outputs: False)
    reads.clear()
    _, stock = run("stock")
    assert len(reads) > 6 * 10, len(reads)  # TRL: a dozen host reads per training step (and in evaluation)
    assert [sorted(h) for h in deferred] == [sorted(h) for h in stock]
    assert sum("loss" in h for h in deferred) == 2 and sum("eval_loss" in h for h in deferred) >= 3
    for d, s in zip(deferred, stock):
        for key in (k for k in d if not any(t in k for t in ("runtime", "per_second", "_time"))):
            assert d[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    train = [h for h in deferred if "loss" in h]
    assert train[0]["num_tokens"] > 0 and train[1]["num_tokens"] > train[0]["num_tokens"]
    assert train[0]["rewards/margins"] != 0.0 and 0.0 <= train[1]["rewards/accuracies"] <= 1.0
    # none at all with the shared-prompt row; else transformers' attention-mask checks in the model's forward
    assert not [r for r in train_reads if "shared_prompt" in speedups or "masking_utils" not in r], train_reads


@pytest.mark.parametrize("from_sft", [True, False])  # reference = the SFT adapter's frozen copy; = the base
def test_quick_reference_switch_gives_trls_reference_without_walking_the_model(
        from_sft, tiny_llama, sft_adapter, preference_jsonl, tmp_path, monkeypatch):
    """`QuickReferenceSwitch`: after training moved the policy away from its reference, the reference
    log-probabilities of a batch are TRL's own (`use_adapter`), they differ from the policy's, the adapter state
    (active adapter, disabled flags, requires_grad) is as before, and the switch walks no module of the model."""
    from trl import DPOTrainer

    parent = dict(sft_adapter=sft_adapter) if from_sft else {}
    trainer = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / "run"), max_steps=3, speedups="none",
                                eval_split_size=0, learning_rate=1e-2, **parent))
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    state = lambda: ([(m._active_adapter, m._disable_adapters) for m in model.modules() if hasattr(m, "lora_A")],
                     [p.requires_grad for p in model.parameters()], model.active_adapter)
    before = state()
    model.eval()
    want = DPOTrainer.compute_ref_log_probs(trainer, model, batch)  # TRL's
    trainer.compute_ref_log_probs(model, batch)  # finds the adapter layers once
    walks = []
    real = torch.nn.Module.named_modules
    monkeypatch.setattr(torch.nn.Module, "named_modules", lambda self, *a, **k: walks.append(1) or real(self, *a, **k))
    got = trainer.compute_ref_log_probs(model, batch)
    monkeypatch.undo()
    assert walks == []
    switch, reference, _, stands_in = trainer._reference_switch  # TRL copies any adapter it gets into "ref" (a fresh one: the base)
    assert switch is not None and reference == ("ref" if "ref" in model.peft_config else None) and stands_in
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert state() == before
    with torch.no_grad():  # the policy is not the reference any more: the switch did switch
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False).log_probs
    policy = out[:, -(batch["completion_mask"].size(1) - 1):].sum(dim=1).chunk(2, dim=0)
    assert not torch.allclose(policy[0], got[0], atol=1e-4)


def test_adapter_switch_leaves_auxiliary_modules_to_peft(tiny_llama):
    """Adapters with trained auxiliary modules (`modules_to_save`) keep TRL's own switch."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert stacking.AdapterSwitch.for_model(plain) is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    aux = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert stacking.AdapterSwitch.for_model(aux) is None
    assert stacking.AdapterSwitch.for_model(model) is None  # not a PEFT model


def test_adapter_switch_to_none_is_the_base(tiny_llama):
    """`AdapterSwitch.use(None)` (DPO without TRL's "ref" copy) disables the adapter layers: the base's logits, as
    PEFT's `disable_adapter`, and the adapter is back on (and trainable) after."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        switch = stacking.AdapterSwitch.for_model(model)
        with switch.use(None):
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, base, rtol=0, atol=0)
    assert not torch.allclose(policy, base, atol=1e-3)
    torch.testing.assert_close(after, policy, rtol=0, atol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_adapter_switch_to_another_adapter_is_peft_set_adapter(tiny_llama):
    """`AdapterSwitch.use(name)` gives PEFT's `set_adapter(name)` logits, leaves every `requires_grad` flag as it
    was (PEFT's call re-flags them) and puts the active adapter back; an unknown name is an error."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear"))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fewer layers than default
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.arange(3, 19)[None]
    switch = stacking.AdapterSwitch.for_model(model)
    with torch.no_grad():
        default = model(input_ids=ids).logits
        with switch.use("other"):
            got = model(input_ids=ids).logits
            assert model.active_adapter == "other"
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.active_adapter == "default"
        torch.testing.assert_close(model(input_ids=ids).logits, default, rtol=0, atol=0)
        model.set_adapter("other")
        want = model(input_ids=ids).logits
        model.set_adapter("default")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, default, atol=1e-3)
    with pytest.raises(ValueError, match="no adapter 'missing'"):
        with switch.use("missing"):
            pass


def test_adapter_switch_stand_in_carries_the_reference_through_the_policy_adapter(tiny_llama):
    """`AdapterSwitch.stand_in(None)` gives the base's logits and `stand_in(name)` that adapter's, both through the
    active adapter's own parameters (the same objects, their data swapped), which are back as they were after;
    `can_stand_in` refuses an adapter of another rank, an unknown one and DoRA, and takes a dropout (with B = 0 in
    training mode, the base's logits still)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear"))
    model.add_adapter("ref", LoraConfig(r=4, target_modules="all-linear"))
    model.add_adapter("wide", LoraConfig(r=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    params = dict(model.named_parameters())
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in params.items()}
    ids = torch.arange(3, 19)[None]
    switch = stacking.AdapterSwitch.for_model(model)
    assert switch.can_stand_in(None) and switch.can_stand_in("ref")
    assert not switch.can_stand_in("wide") and not switch.can_stand_in("missing")
    with torch.no_grad():
        policy = model(input_ids=ids).logits
        for adapter in (None, "ref"):
            with switch.use(adapter):
                want = model(input_ids=ids).logits
            with switch.stand_in(adapter):
                got = model(input_ids=ids).logits
                assert model.active_adapter == "default"
                assert fused_lora._b_is_zero == (adapter is None)  # the fused op skips its zero LoRA product
            assert not fused_lora._b_is_zero
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert not torch.allclose(got, policy, atol=1e-3)
    after = dict(model.named_parameters())
    for n, (p, data, flag) in before.items():
        assert after[n] is p and p.requires_grad == flag and p.grad is None
        torch.testing.assert_close(p.detach(), data, rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), policy, rtol=0, atol=0)
    dora = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama),
                          LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert not stacking.AdapterSwitch.for_model(dora).can_stand_in(None)
    dropped = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama),
                             LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5))
    for name, p in dropped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    switch = stacking.AdapterSwitch.for_model(dropped)
    assert switch.can_stand_in(None)
    dropped.train()
    with torch.no_grad():
        with dropped.disable_adapter():
            base = dropped(input_ids=ids).logits
        with switch.stand_in(None):
            torch.testing.assert_close(dropped(input_ids=ids).logits, base, rtol=0, atol=0)


def test_compiled_dpo_reference_runs_the_policy_s_graph(tiny_llama, preference_jsonl, tmp_path, monkeypatch):
    """`compile` with `ref_first`: the reference forward runs the policy's compiled graph (grad on, the adapter
    carrying B = 0; `QuickReferenceSwitch.reference_in_policy_graph`), not a no-grad graph of its own; the first loss
    is log 2 and the losses are the eager run's. With `head_grad` the reference's LM head runs without grad (it
    builds no hidden-state gradient) and the policy's with it."""
    import transformers

    from align import head_grad

    calls, heads = [], []
    real, real_head = transformers.LlamaModel.forward, head_grad.log_probs
    monkeypatch.setattr(transformers.LlamaModel, "forward",
                        lambda self, *a, **k: calls.append(torch.is_grad_enabled()) or real(self, *a, **k))
    monkeypatch.setattr(head_grad, "log_probs",
                        lambda *a, **k: heads.append(torch.is_grad_enabled()) or real_head(*a, **k))
    runs = {}
    for spec in ("ref_first", "ref_first,compile", "shared_prompt,ref_first,compile,fused_lora,head_grad"):
        calls.clear()
        runs[spec] = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / spec.replace(",", "_")),
                                       max_steps=3, speedups=spec, eval_split_size=0, learning_rate=1e-2))
        assert runs[spec].align_speedups == tuple(spec.split(","))
        assert runs[spec].reference_in_policy_graph == ("compile" in spec)
        assert calls == ([False, True] * 3 if spec == "ref_first" else [True, True] * 3)
    assert heads == [False, True] * 3
    want = losses(runs["ref_first"])
    for spec in ("ref_first,compile", "shared_prompt,ref_first,compile,fused_lora,head_grad"):
        got = losses(runs[spec])
        assert got[0] == pytest.approx(math.log(2), abs=1e-6)
        assert got == pytest.approx(want, abs=1e-4) and len(set(got)) == 3



def grad_norms(trainer):
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


@pytest.mark.parametrize("speedups", ["none", "shared_prompt,ref_first,head_grad"])
def test_passes_per_batch_give_the_one_pass_update(speedups, tiny_llama, sft_adapter, preference_jsonl, tmp_path,
                                                   monkeypatch):
    """4 pairs per batch through forward and backward in 3 passes (2 + 1 + 1 pairs): the losses, gradient norms and
    trained adapter of one pass, the logged metrics of the whole batch, and no forward sees the whole batch. With
    `shared_prompt`, each pass's forwards get the layout the collator planned for that pass's pairs."""
    from align import speed

    plans = []  # (pairs in the forward's batch, the plan's batch shape) of every packed pair forward
    real = speed._shared_prompt_forward
    monkeypatch.setattr(speed, "_shared_prompt_forward", lambda inner, model, kwargs, plan=None, **kw: plans.append(
        (kwargs["input_ids"].shape[0] // 2, plan and plan.length)) or real(inner, model, kwargs, plan, **kw))
    runs, tokens = {}, {}
    for passes in (1, 3):
        seen = []  # the token count of every forward (policy and reference)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(args[0].numel()) if isinstance(m, torch.nn.Embedding) else None)
        try:
            runs[passes] = dpo.main(dpo_argv(tiny_llama, preference_jsonl, str(tmp_path / f"dpo_{passes}"),
                                             sft_adapter=sft_adapter, max_steps=3, eval_split_size=0,
                                             speedups=speedups, learning_rate=1e-3, per_device_train_batch_size=4,
                                             passes_per_batch=passes))
        finally:
            hook.remove()
        tokens[passes] = seen
    one, split = runs[1], runs[3]
    assert split.passes_per_batch == 3 and one.passes_per_batch == 1
    assert losses(split) == pytest.approx(losses(one), abs=1e-5) and len(set(losses(one))) > 1
    assert grad_norms(split) == pytest.approx(grad_norms(one), rel=1e-4) and min(grad_norms(one)) > 0
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
        logged = [[h[key] for h in r.state.log_history if key in h] for r in (one, split)]
        assert logged[1] == pytest.approx(logged[0], abs=1e-5), key
    a, b = (load_file(os.path.join(str(tmp_path / f"dpo_{p}"), "adapter_model.safetensors")) for p in (1, 3))
    assert a.keys() == b.keys() and max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
    assert len(tokens[3]) == 3 * len(tokens[1])  # a forward per pass (policy and reference each)
    assert max(tokens[3]) < max(tokens[1])
    if "shared_prompt" in speedups:  # 3 steps x (reference + policy): one pass of 4, then passes of 2, 1 and 1
        assert [p for p, _ in plans] == [4] * 6 + [2, 2, 1, 1, 1, 1] * 3
        assert all(length is not None and length[0] == 2 * p for p, length in plans)
    else:
        assert plans == []
    run = read_json(os.path.join(str(tmp_path / "dpo_3"), "run.json"))
    assert run["lineage"]["speedups"]["passes_per_batch"] == 3


def test_passes_per_batch_are_checked_and_split_the_examples(tiny_llama, preference_jsonl, tmp_path):
    from align import batch_passes, config, ppo

    from .test_ppo import ppo_argv

    with pytest.raises(config.ConfigError, match="passes_per_batch: must be >= 1"):
        config.RunArguments(passes_per_batch=0)
    with pytest.raises(config.ConfigError, match="passes_per_batch: a key of sft.py, dpo.py and rm.py, not of ppo"):
        ppo.main(ppo_argv(tiny_llama, preference_jsonl, str(tmp_path / "ppo"), passes_per_batch=2))
    split = batch_passes.split_examples
    rows = [{"input_ids": [0] * n} for n in (10, 1, 1, 1, 9, 2)]
    assert [len(g) for g in split(rows, 2)] == [3, 3]
    assert [[len(e["input_ids"]) for e in g] for g in split(rows, 2, "tokens")] == [[10, 1, 1], [1, 9, 2]]
    assert [len(g) for g in split(rows, 3, "tokens")] == [1, 4, 1]
    assert [len(g) for g in split(rows[:2], 5)] == [1, 1]  # no empty pass
    assert [len(g) for g in split(rows, 1)] == [6]
