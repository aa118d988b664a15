"""Reward model stage: learns a synthetic rule, head saved with the adapter, scoring API survives reload."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from align import rm
from align.reward import RewardScorer

from .test_sft import sft_argv


def rm_argv(model, data, out, **overrides):
    args = dict(max_length="128", learning_rate="1e-2", max_steps="30", eval_split_size="12",
                per_device_train_batch_size="8", center_rewards_coefficient="0.01")
    args.update(overrides)
    return sft_argv(model, data, out, **args)


def test_reward_model_learns_and_scores_after_reload(tiny_llama, preference_jsonl, tmp_path):
    out = str(tmp_path / "rm")
    trainer = rm.main(rm_argv(tiny_llama, preference_jsonl, out))
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["stage"] == "rm"
    assert run["metrics"]["eval_accuracy"] > 0.9
    assert run["data"]["eval"] == 12

    # the score head is saved with the adapter; base weights are not
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("score" in k for k in saved)
    assert all("lora_" in k or "score" in k for k in saved)

    # the scoring API: same scores as the trained model, after a reload from disk
    prompts = ["Reverse: red green blue lamp", "Reverse: tiger music stone river"]
    chosen = ["Sure: lamp blue green red", "Sure: river stone music tiger"]
    rejected = ["No: red green blue lamp", "No: tiger music stone river"]
    live = RewardScorer(trainer.model, trainer.processing_class)
    want = live.score(prompts + prompts, chosen + rejected)
    scorer = RewardScorer.from_pretrained(out)
    got = scorer.score(prompts + prompts, chosen + rejected)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got[:2] > got[2:]).all()
    # batching does not change scores (padding is masked)
    one_by_one = RewardScorer(scorer.model, scorer.tokenizer, batch_size=1).score(prompts, chosen)
    torch.testing.assert_close(one_by_one, got[:2], atol=1e-4, rtol=1e-4)


def test_rm_refuses_an_sft_adapter(tiny_llama, preference_jsonl, tmp_path):
    from align.config import ConfigError

    with pytest.raises(ConfigError, match="sft_adapter is not used"):
        rm.main(rm_argv(tiny_llama, preference_jsonl, str(tmp_path / "x"), sft_adapter=str(tmp_path)))


def test_logged_accuracy_and_margin_weigh_every_pair_alike(tiny_llama, preference_jsonl, tmp_path):
    """5 held-out pairs in eval batches of 2 (2, 2, 1): the logged accuracy and margin are per-pair means."""
    from align.eval.preference import load_pairs

    out = str(tmp_path / "rm")
    rm.main(rm_argv(tiny_llama, preference_jsonl, out, max_steps=3, eval_split_size=5, per_device_eval_batch_size=2))
    m = json.load(open(os.path.join(out, "run.json")))["metrics"]
    pairs, _ = load_pairs(os.path.join(out, "heldout_pairs.jsonl"))
    scorer = RewardScorer.from_pretrained(out)
    chosen = scorer.score_ids([scorer._ids(p["prompt"], p["chosen"]) for p in pairs])
    rejected = scorer.score_ids([scorer._ids(p["prompt"], p["rejected"]) for p in pairs])
    margins = (chosen - rejected).tolist()
    assert len(margins) == 5
    assert m["eval_margin"] == pytest.approx(sum(margins) / 5, abs=1e-4)
    assert m["eval_accuracy"] == pytest.approx(sum(x > 0 for x in margins) / 5)
    batch_means = [sum(b) / len(b) for b in (margins[0:2], margins[2:4], margins[4:])]
    assert abs(sum(batch_means) / 3 - sum(margins) / 5) > 1e-4  # what TRL alone would have logged differs


def test_reward_stage_takes_speedups_and_keeps_the_losses(tiny_llama, preference_jsonl, tmp_path, monkeypatch):
    """`speedups` reaches the reward stage: fused LoRA and the packed pair rows (`shared_prompt`: each pair's common
    prefix once, no padding) give the plain per-step losses and held-out metrics; an option of another stage
    (padding_free) does not apply. The packed layouts are planned in the collator, none in a forward."""
    from align import speed

    calls = {"layout": 0, "plan": 0, "packed": 0}
    real_forward = speed._reward_pair_forward
    monkeypatch.setattr(speed, "_reward_pair_forward", lambda *a, **k: (lambda out: calls.__setitem__(
        "packed", calls["packed"] + (out is not None)) or out)(real_forward(*a, **k)))
    for name, key in (("reward_pair_layout", "layout"), ("reward_host_plan", "plan")):
        real = getattr(speed, name)
        monkeypatch.setattr(speed, name, lambda *a, _real=real, _key=key, **k: calls.__setitem__(
            _key, calls[_key] + 1) or _real(*a, **k))
    runs = [rm.main(rm_argv(tiny_llama, preference_jsonl, str(tmp_path / s.replace(",", "_")), max_steps=4,
                            eval_split_size=8, speedups=s)) for s in ("none", "fused_lora,padding_free",
                                                                      "shared_prompt")]
    assert runs[0].align_speedups == () and runs[1].align_speedups == ("fused_lora",)
    assert runs[2].align_speedups == ("shared_prompt",)
    fused = [m for m in runs[1].model.modules() if "forward" in vars(m)]  # LoRA layers given the fused forward
    assert len(fused) == 14 and not any("forward" in vars(m) for m in runs[0].model.modules())
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in runs]
    assert len(losses[0]) == 4 and len(set(losses[0])) > 1
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)
    evals = [json.load(open(os.path.join(t.args.output_dir, "run.json")))["metrics"] for t in runs]
    for key in ("eval_loss", "eval_accuracy", "eval_margin"):
        assert evals[2][key] == pytest.approx(evals[0][key], abs=1e-5), key
    # train batches (4, or 5 with the loader's one ahead) and eval batches, each planned once in the collator
    assert calls["plan"] >= 4 + 2 and calls["layout"] == calls["plan"]
    assert calls["packed"] >= 4 + 2  # and every forward of the shared_prompt run was a packed one


def test_scorer_batches_similar_lengths_and_keeps_the_input_order():
    """score_ids forms batches of similar lengths (less padding computed) and returns scores in input order."""
    from types import SimpleNamespace

    class SumOfTokens(torch.nn.Module):  # a stand-in reward model: score = sum of unmasked ids; records widths
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.shapes = []

        def forward(self, input_ids, attention_mask):
            self.shapes.append(tuple(input_ids.shape))
            return SimpleNamespace(logits=(input_ids * attention_mask).sum(1, keepdim=True).float())

    seqs = [[1] * 2, [2] * 9, [3] * 3, [4] * 8, [5] * 1, [6] * 7]
    model = SumOfTokens()
    scores = RewardScorer(model, SimpleNamespace(pad_token_id=0), batch_size=2).score_ids(seqs)
    assert scores.tolist() == [float(sum(s)) for s in seqs]
    assert model.shapes == [(2, 9), (2, 7), (2, 2)]  # in input order the batches would be 2x9, 2x8, 2x7



def test_passes_per_batch_give_the_reward_model_s_one_pass_update(tiny_llama, preference_jsonl, tmp_path):
    """8 pairs per batch in 3 passes (3, 3 and 2 pairs), with and without the packed pair rows: the losses and
    gradient norms of one pass, and the same trained weights (plain SGD: Adam's first steps, about lr x sign(gradient),
    would turn rounding-level gradient differences of near-zero entries into lr-sized weight differences)."""
    for speedups in ("none", "shared_prompt"):
        runs = [rm.main(rm_argv(tiny_llama, preference_jsonl, str(tmp_path / f"{speedups}_{p}"), max_steps=3,
                                eval_split_size=0, speedups=speedups, optim="sgd", learning_rate=0.1,
                                passes_per_batch=p))
                for p in (1, 3)]
        logged = [[h[k] for h in r.state.log_history if "loss" in h for k in ("loss", "grad_norm")] for r in runs]
        assert len(logged[0]) == 6 and len(set(logged[0][::2])) > 1
        assert logged[1] == pytest.approx(logged[0], rel=1e-4), speedups
        a, b = (load_file(os.path.join(str(tmp_path / f"{speedups}_{p}"), "adapter_model.safetensors"))
                for p in (1, 3))
        assert a.keys() == b.keys() and max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
