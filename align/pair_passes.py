"""A training batch of pairs (DPO, reward model) through forward and backward a few pairs at a time.

`PairPasses` is the trainer mixin (recipe key `pairs_per_pass`); `pair_rows` cuts a batch's pairs out of it;
`PassPlans` carries the host layout plans (`speed.HostPlan`) the collator made for each pass."""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger("align")


class PairPasses:
    """Trainer mixin for DPO and reward trainers: a training batch's pairs go through forward and backward
    `pairs_per_pass` at a time, their gradients summed before the optimizer step, so the step holds the activations
    of `pairs_per_pass` pairs instead of the whole batch's (a DPO row carries prompt, chosen and rejected: at the
    same length its step holds more activations than an SFT step of as many rows).

    Both losses are means over the batch's pairs of a term per pair (DPO's `-logsigmoid(beta * margin)`, the reward
    model's `-logsigmoid(r_chosen - r_rejected)` and its centring term), so each pass's loss weighted by its share of
    the pairs adds up to the batch's loss, and the passes' gradients to its gradient: the same update, up to the
    order of the sums. Unlike `gradient_accumulation_steps`, the optimizer step, the learning-rate schedule and
    what a logged step is stay those of the recipe's batch. The logged metrics are each pass's, weighted by its pairs
    (`training.PairWeightedMetrics`). Off (`None`) by default; not under DeepSpeed, whose engine steps at every
    backward of a step without accumulation."""

    pairs_per_pass: int | None = None

    def pair_passes(self, n: int) -> list[tuple[int, int]] | None:
        """The (start, stop) pair ranges of a training batch of `n` pairs, or None for one pass."""
        k = self.pairs_per_pass
        if not k or k >= n:
            return None
        if self.is_deepspeed_enabled:
            if not self.__dict__.get("_pair_passes_refused"):
                self._pair_passes_refused = True
                logger.warning("pairs_per_pass: not under DeepSpeed; each batch goes through in one pass")
            return None
        return [(start, min(start + k, n)) for start in range(0, n, k)]

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.get("input_ids")
        n = 0 if ids is None else ids.shape[0] // 2
        parts = self.pair_passes(n)
        if parts is None:
            return super().training_step(model, inputs, num_items_in_batch)
        losses = []
        try:
            for i, (start, stop) in enumerate(parts):
                self._pair_share = (stop - start) / n
                last = i == len(parts) - 1
                # gradients are reduced across processes once, at the last pass (an outer no_sync stays in force)
                sync = (contextlib.nullcontext() if last or self.accelerator.num_processes == 1
                        else self.accelerator.no_sync(model))
                with sync:
                    losses.append(super().training_step(model, pair_rows(inputs, start, stop, n),
                                                        num_items_in_batch))
        finally:
            self._pair_share = None
        return torch.stack(losses).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        share = self.__dict__.get("_pair_share")
        if share is None:
            return out
        return (out[0] * share, *out[1:]) if return_outputs else out * share


class PassPlans:
    """What the collator plans for a batch that goes through in passes: each pass's own plan (or None), by its
    (start, stop) pair range. A forward that receives it whole (an evaluation batch, which goes through in one
    pass) finds no plan and lays the batch out itself."""

    def __init__(self, plans: dict):
        self.plans = plans

    def for_pairs(self, start: int, stop: int):
        return self.plans[start, stop]

    def _map(self, fn):
        return PassPlans({k: None if p is None else fn(p) for k, p in self.plans.items()})

    def pin_memory(self, device=None):
        return self._map(lambda p: p.pin_memory())

    def to(self, device, non_blocking=False):
        return self._map(lambda p: p.to(device, non_blocking=non_blocking))


def pair_rows(inputs: dict, start: int, stop: int, n: int) -> dict:
    """Pairs `start:stop` of a batch of `n` pairs: rows `start:stop` and `n + start:n + stop` of each tensor of `2n`
    rows (chosen first, rejected second), rows `start:stop` of each of `n` rows (per-pair values such as
    precomputed reference log-probabilities), a pass's own plan from `PassPlans`. Anything else is an error naming
    the key; a key whose value is None stays None."""
    out = {}
    for key, value in inputs.items():
        rows = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
        if isinstance(value, PassPlans):
            plan = value.for_pairs(start, stop)
            if plan is not None:
                out[key] = plan
        elif value is None:
            out[key] = None
        elif rows == 2 * n:
            out[key] = torch.cat([value[start:stop], value[n + start:n + stop]])
        elif rows == n:
            out[key] = value[start:stop]
        else:
            raise ValueError(f"pairs_per_pass: batch key {key!r} is not one row per pair or per pair side "
                             f"({n} pairs; got {type(value).__name__}"
                             f"{'' if rows is None else f' of {rows} rows'}); set pairs_per_pass: null")
    return out


def plan_passes(trainer, planner, batch):
    """`planner(batch)`, or a `PassPlans` of `planner` on each pass's pairs when the trainer runs the batch in
    passes (`PairPasses.pair_passes`)."""
    ids = batch.get("input_ids")
    passes = trainer.pair_passes(ids.shape[0] // 2) if ids is not None and hasattr(trainer, "pair_passes") else None
    if passes is None:
        return planner(batch)
    n = ids.shape[0] // 2
    return PassPlans({(a, b): planner(pair_rows(batch, a, b, n)) for a, b in passes})
