"""The reward of a (prompt, response) pair, from one of three sources; each is called as
`reward(prompts: list of message lists, responses: list[str]) -> tensor of floats`.

    AdapterReward    the reward adapter and score head of align/rm.py on the shared base (no second base copy);
                     pairs rendered exactly as `align.reward.RewardScorer` renders them
    RewardScorer     `--reward_model DIR`: a separate reward model, loaded on its own
    FunctionReward   `--reward_fn module:function`: fn(prompts: list[str], responses: list[str]) -> list[float]
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from types import SimpleNamespace

import torch
import transformers
from torch import nn

from align import config, data, modeling
from align.reward import RewardScorer, model_args_for


class _SharedBaseScoreModel(nn.Module):
    """The reward role as a sequence-classification model: forward(input_ids, attention_mask).logits [B, 1]."""

    def __init__(self, roles, pad_token_id: int):
        super().__init__()
        self.roles = roles
        self.pad_token_id = pad_token_id

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.roles.reward_scores(input_ids, attention_mask, self.pad_token_id)[:, None])


class AdapterReward:
    """The reward adapter on the shared base, scored through `RewardScorer` with the reward model's tokenizer."""

    def __init__(self, roles, reward_adapter: str, batch_size: int = 8):
        tokenizer = modeling.load_tokenizer(model_args_for(reward_adapter))
        self.scorer = RewardScorer(_SharedBaseScoreModel(roles, tokenizer.pad_token_id), tokenizer, batch_size)

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        return self.scorer.score(prompts, responses)


class FunctionReward:
    """A Python reward function; prompts are passed as the chat-template text the policy saw."""

    def __init__(self, fn, tokenizer, name: str = "reward_fn"):
        self.fn, self.tokenizer, self.name = fn, tokenizer, name

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        texts = [data.render(self.tokenizer, p, add_generation_prompt=True) for p in prompts]
        scores = [float(s) for s in self.fn(texts, list(responses))]
        if len(scores) != len(responses) or not all(math.isfinite(s) for s in scores):
            raise ValueError(f"{self.name} must return one finite float per response; got {scores[:8]} for "
                             f"{len(responses)} responses")
        return torch.tensor(scores)


def load_reward_fn(spec: str):
    """`module:function` -> the function (the module is imported; the current directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise config.ConfigError(f"reward_fn {spec!r}: expected module:function, e.g. my_rewards:length_penalty")
    if os.getcwd() not in sys.path:  # a script's sys.path holds its own folder, not the directory it runs in
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise config.ConfigError(f"reward_fn {spec!r}: {err}") from err
    if not callable(fn):
        raise config.ConfigError(f"reward_fn {spec!r} is not callable")
    return fn


def separate_reward_model(path: str, device, batch_size: int = 8) -> RewardScorer:
    """A reward model with its own weights: an align/rm.py output (its own copy of the base), or a full
    sequence-classification model directory or hub name."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        scorer = RewardScorer.from_pretrained(path, batch_size=batch_size)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        scorer = RewardScorer(model, tokenizer, batch_size=batch_size)
    scorer.model.to(device)
    return scorer


def build_reward(args, roles, tokenizer, device):
    """The reward source the recipe names (exactly one of reward_adapter, reward_model, reward_fn)."""
    if args.reward_adapter:
        return AdapterReward(roles, args.reward_adapter, args.reward_batch_size)
    if args.reward_model:
        return separate_reward_model(args.reward_model, device, args.reward_batch_size).score
    if args.reward_fn:
        return FunctionReward(load_reward_fn(args.reward_fn), tokenizer, args.reward_fn)
    raise config.ConfigError("no reward: set reward_adapter, reward_model or reward_fn")
