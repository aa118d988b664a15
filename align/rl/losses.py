"""The PPO objective (Schulman et al. 2017) over response tokens: clipped policy loss, clipped value loss, entropy,
approximate KL. Pure functions of tensors shaped [batch, response_length] (logits: [batch, length, vocab]);
averages are over the tokens where `mask` is 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.rl.advantages import masked_mean


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits), per position: [B, T, V] and [B, T] -> [B, T] (computed in fp32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, entropy_grad: bool = True):
    """(log p(token), entropy) per position from one fp32 log-softmax: [B, T, V], [B, T] -> [B, T], [B, T].

    The entropy -sum(p log p) reuses the log-probabilities instead of a second softmax and logsumexp over the
    vocabulary; with `entropy_grad` off (no entropy bonus in the loss) it is a statistic, computed without a graph,
    so the backward pass does not go through it."""
    logp = F.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logsumexp(l) - sum(p * l). [B, T, V] -> [B, T]."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """Clipped surrogate loss. ratio = exp(logp - old_logp);

        loss = mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

    Returns (loss, clip_fraction: share of tokens where the clipped term was the larger one,
    approx_kl: mean of (ratio - 1) - log ratio, the low-variance estimator of KL(old || new)).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss: the new value may move at most `cliprange_value` from the old one before the loss
    stops rewarding it.

        clipped = old + clip(new - old, -eps_v, eps_v)
        loss    = 0.5 * mean( max((new - R)^2, (clipped - R)^2) )

    Returns (loss, clip_fraction: share of tokens where the clipped error was the larger one).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err_unclipped, err_clipped), mask)
    return loss, masked_mean((err_clipped > err_unclipped).float(), mask).detach()
