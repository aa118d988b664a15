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
