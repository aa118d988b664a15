"""One PPO step: collect experience with the current policy, then several epochs of clipped updates on it.

    exp = collect_experience(roles, reward, tokenizer, prompts, args, kl_coef, gen_config)   # no gradients
    stats = ppo_update(model, optimizer, accelerator, exp, args)                            # optimizer steps

Every forward pass runs in eval mode (no dropout), so the first update of each step starts from a ratio of 1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from align.rl import advantages as adv
from align.rl import losses, rollout
from align.rl.roles import POLICY, SharedBaseRoles
from align.training import NonFiniteLossError


@dataclass
class Experience:
    """A rollout batch and what PPO needs from it, each [batch, response_length] (scores: [batch])."""

    rollout: rollout.Rollout
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask.float()

    def select(self, index: torch.Tensor) -> Experience:
        picked = {k: getattr(self, k)[index] for k in ("logprobs", "ref_logprobs", "values", "scores", "kl",
                                                        "advantages", "returns")}
        return Experience(rollout=self.rollout.select(index), **picked)


def response_logprobs(roles: SharedBaseRoles, adapter, ro: rollout.Rollout, temperature: float):
    """log p(response token) under the `adapter` role, with logits divided by the sampling temperature."""
    logits = roles.logits(adapter, ro.input_ids, ro.attention_mask, ro.position_ids, ro.response_length)
    return losses.logprobs_from_logits(logits / temperature, ro.response_ids)


@torch.no_grad()
def sample_and_score(roles: SharedBaseRoles, reward, tokenizer, prompts, args, gen_config):
    """Responses from the policy, their rewards, and policy/reference log-probs: (rollout, scores, logp, ref)."""
    with roles.role(POLICY):
        ro = rollout.generate(roles.model, tokenizer, [p.input_ids for p in prompts], gen_config)
    responses = rollout.decode_responses(tokenizer, ro)
    scores = reward([p.messages for p in prompts], responses).to(ro.response_ids.device).float()
    logprobs = response_logprobs(roles, POLICY, ro, args.temperature)
    ref_logprobs = response_logprobs(roles, roles.reference, ro, args.temperature)
    return ro, scores, logprobs, ref_logprobs


@torch.no_grad()
def collect_experience(roles: SharedBaseRoles, reward, tokenizer, prompts, args, kl_coef: float, gen_config):
    """Rollout -> scores -> per-token KL penalty -> GAE advantages (whitened) and returns. Returns
    (Experience, stats) where stats are this process's means over the batch."""
    ro, scores, logprobs, ref_logprobs = sample_and_score(roles, reward, tokenizer, prompts, args, gen_config)
    mask = ro.response_mask.float()
    values = roles.values(ro.input_ids, ro.attention_mask, ro.position_ids, ro.response_length).float() * mask
    kl = adv.per_token_kl(logprobs, ref_logprobs, mask)
    rewards = adv.per_token_rewards(scores, kl, mask, kl_coef)
    if args.whiten_rewards:
        rewards = adv.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = adv.gae(rewards, values, mask, args.gamma, args.lam)
    advantages = adv.masked_whiten(advantages, mask)
    exp = Experience(ro, logprobs, ref_logprobs, values, scores, kl, advantages, returns)
    stats = {
        "reward/score": scores.mean().item(),
        "reward/total": rewards.sum(1).mean().item(),
        "objective/kl": kl.sum(1).mean().item(),
        "objective/kl_coef": kl_coef,
        "response/length": mask.sum(1).mean().item(),
        "value/mean": adv.masked_mean(values, mask).item(),
        "value/returns": adv.masked_mean(returns, mask).item(),
    }
    return exp, stats


def minibatch_loss(model, mb: Experience, args) -> tuple[torch.Tensor, dict]:
    """The PPO loss of one mini-batch: policy loss + vf_coef * value loss - ent_coef * entropy."""
    ro, mask = mb.rollout, mb.mask
    logits, values = model(ro.input_ids, ro.attention_mask, ro.position_ids, ro.response_length)
    logits = logits / args.temperature
    # the entropy is a statistic unless the loss has an entropy bonus: then no backward through it
    logprobs, token_entropy = losses.logprobs_and_entropy(logits, ro.response_ids, entropy_grad=args.ent_coef != 0)
    entropy = adv.masked_mean(token_entropy, mask)
    pg_loss, clip_frac, approx_kl = losses.policy_loss(logprobs, mb.logprobs, mb.advantages, mask, args.cliprange)
    vf_loss, vf_clip_frac = losses.value_loss(values.float(), mb.values, mb.returns, mask, args.cliprange_value)
    loss = pg_loss + args.vf_coef * vf_loss - args.ent_coef * entropy
    stats = {"loss/total": loss, "loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy": entropy,
             "policy/clipfrac": clip_frac, "policy/approx_kl": approx_kl, "value/clipfrac": vf_clip_frac}
    return loss, {k: v.item() for k, v in stats.items()}


def ppo_update(model, optimizer, accelerator, exp: Experience, args, stop_on_nonfinite: bool = True) -> dict:
    """`ppo_epochs` passes over the experience in shuffled mini-batches, one clipped optimizer step each.

    `model` is the (accelerate-prepared) `SharedBaseRoles`; under DDP its gradients are all-reduced in backward.
    A NaN/inf loss raises `NonFiniteLossError` unless `stop_on_nonfinite` is off. Returns the mean of each
    statistic over the mini-batches.
    """
    totals = defaultdict(float)
    n = 0
    size = len(exp.scores)
    trained = [p for group in optimizer.param_groups for p in group["params"]]  # the gradients to clip: no walk
    for _ in range(args.ppo_epochs):
        order = torch.randperm(size)
        for start in range(0, size, args.mini_batch_size):
            index = order[start : start + args.mini_batch_size].to(exp.scores.device)
            with accelerator.autocast():
                loss, stats = minibatch_loss(model, exp.select(index), args)
            if stop_on_nonfinite and not math.isfinite(stats["loss/total"]):
                raise NonFiniteLossError(f"PPO loss is {stats['loss/total']} ({stats}); lower learning_rate, "
                                         "raise kl_coef or check the reward")
            accelerator.backward(loss)
            if args.max_grad_norm:
                stats["policy/grad_norm"] = float(accelerator.clip_grad_norm_(trained, args.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in stats.items():
                totals[k] += v
            n += 1
    return {k: v / n for k, v in totals.items()}


@torch.no_grad()
def evaluate(roles: SharedBaseRoles, reward, tokenizer, prompts, args, gen_config, seed: int) -> dict:
    """Mean reward, sequence KL to the reference and response length of the policy on `prompts`, sampled under
    a fixed seed in a forked RNG (the training random stream is left as it was). Sums and counts, for reduction
    across processes."""
    sums = defaultdict(float)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), args.per_device_train_batch_size):
            batch = prompts[start : start + args.per_device_train_batch_size]
            ro, scores, logprobs, ref_logprobs = sample_and_score(roles, reward, tokenizer, batch, args, gen_config)
            mask = ro.response_mask.float()
            sums["reward"] += scores.sum().item()
            sums["kl"] += adv.per_token_kl(logprobs, ref_logprobs, mask).sum().item()
            sums["response_length"] += mask.sum().item()
            sums["count"] += len(batch)
    return dict(sums)
