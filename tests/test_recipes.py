"""Every recipe in recipes/ runs for 2 steps with a tiny random model of its family's architecture."""

import glob
import json
import os

import pytest

from align import config, dpo, ppo, rm, sft

from .conftest import REPO

FAMILY_ARCH = {"smollm2": "llama", "llama3": "llama", "mistral": "mistral", "qwen2.5": "qwen2",
               "gemma2": "gemma2", "phi3": "phi3"}
NOT_STAGES = {"accelerate", "eval"}  # launch configs and evaluation suites, tested elsewhere
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "recipes", "*", "*.yaml"))
                 if os.path.basename(os.path.dirname(p)) not in NOT_STAGES)
STAGES = {"sft": sft.main, "dpo": dpo.main, "rm": rm.main, "ppo": ppo.main}
PREFERENCE_STAGES = {"dpo", "rm", "ppo"}
# PPO has no Trainer: its own keys instead of these, and a rule-based reward (tests/test_ppo.py) for the reward model
TRAINER_KEYS = {"--save_strategy", "--eval_strategy", "--gradient_accumulation_steps", "--max_length"}
PPO_ARGV = ["--mini_batch_size", "1", "--max_new_tokens", "4", "--save_steps", "0",
            "--reward_fn", "tests.test_ppo:vowel_reward", "--value_init", "sft"]


def test_every_family_has_a_tiny_architecture():
    fams = {os.path.basename(os.path.dirname(p)) for p in RECIPES}
    assert fams and fams <= set(FAMILY_ARCH), fams - set(FAMILY_ARCH)


@pytest.mark.parametrize("recipe", RECIPES,
                         ids=lambda p: os.path.relpath(p, os.path.join(REPO, "recipes")))
def test_recipe_runs_two_steps(recipe, tiny_model_factory, chat_jsonl, preference_jsonl, tmp_path):
    family = os.path.basename(os.path.dirname(recipe))
    stage = os.path.basename(recipe).split("_")[0]
    values = config.load_yaml(recipe)
    assert values["output_dir"].startswith("outputs/")
    out = str(tmp_path / "out")
    # only what a CPU test must change: the model (tiny, same architecture), data size, steps, and the family's
    # end-of-turn token, which the shared test tokenizer (ChatML) spells <|im_end|>; and bf16 autocast, which on
    # CPU breaks bitsandbytes' 4-bit layers with biases (Qwen2) and is not what a GPU run does anyway
    argv = ["--config", recipe, "--model_name_or_path", tiny_model_factory(FAMILY_ARCH[family]),
            "--dataset_name", preference_jsonl if stage in PREFERENCE_STAGES else chat_jsonl, "--output_dir", out, "--max_steps", "2", "--save_strategy", "no",
            "--eval_strategy", "no", "--report_to", "none", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--max_length", "128", "--bf16", "false",
            "--eval_split_size", "0.1"]
    if stage == "ppo":
        argv = [x for k, v in zip(argv[::2], argv[1::2]) if k not in TRAINER_KEYS for x in (k, v)] + PPO_ARGV
    if "eval_dataset_name" in values:
        argv += ["--eval_dataset_name", preference_jsonl if stage in PREFERENCE_STAGES else chat_jsonl]
    if "eos_token" in values:
        argv += ["--eos_token", "<|im_end|>"]
    STAGES[stage](argv)
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["metrics"]["train_value_loss" if stage == "ppo" else "train_loss"] > 0
    assert run["config"]["ModelArguments"]["load_in_4bit"] == bool(values.get("load_in_4bit", False))
    assert os.path.isfile(os.path.join(out, "adapter_config.json")) == bool(values.get("use_peft", False))
