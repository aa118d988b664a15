"""A training batch through forward and backward in a few passes, the gradients summed before the one optimizer
step (recipe key `passes_per_batch`).

`BatchPasses` is the trainer mixin; `collate_in_passes` is the training collator that cuts a batch's examples
into the passes' sub-batches, each collated (and laid out, `speed.plan_in_collator`) as a batch of its own."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

logger = logging.getLogger("align")

PASSES_KEY = "align_passes"  # the batch's passes, in a training batch collated in passes


class BatchPasses:
    """Trainer mixin for the SFT, DPO and reward trainers: each training batch goes through forward and backward
    in `passes_per_batch` passes over parts of its examples, their gradients summed before the optimizer step, so
    the step holds the activations of one part instead of the whole batch's.

    The update is the batch's: SFT's loss is a sum over the batch's trained tokens divided by their count
    (Trainer's `num_items_in_batch`), so each pass's sum over its tokens, divided by the batch's count, adds up to
    it; DPO's and the reward model's losses are means over pairs of a term per pair (DPO's `-logsigmoid(beta *
    margin)`, the reward model's `-logsigmoid(r_chosen - r_rejected)` and its centring term), so each pass's loss
    weighted by its share of the pairs does. Unlike `gradient_accumulation_steps`, the optimizer step, the
    learning-rate schedule and what a logged step is stay those of the recipe's batch, and the logged metrics are
    the batch's (each pass's, weighted by what it holds). The collator makes each pass's sub-batch from its own
    examples, so padding and packed layouts are the sub-batch's. Set by `speed.finish` (the recipe's value, else 2
    for DPO with `lean`, else 1: off); not under DeepSpeed, whose engine steps at every backward of a step without
    accumulation; evaluation batches go in one pass."""

    passes_per_batch: int = 1
    pass_loss = "pair_mean"  # DPO, RM: a pass's loss weighs its share of the pairs; SFT sets "token_sum"

    def uses_passes(self) -> bool:
        if self.passes_per_batch <= 1:
            return False
        if self.is_deepspeed_enabled:
            if not self.__dict__.get("_passes_refused"):
                self._passes_refused = True
                logger.warning("passes_per_batch: not under DeepSpeed; each batch goes through in one pass")
            return False
        return True

    def get_train_dataloader(self):
        if not self.uses_passes():
            return super().get_train_dataloader()
        collate = self.data_collator
        self.data_collator = functools.partial(collate_in_passes, collate=collate, passes=self.passes_per_batch,
                                               balance="tokens" if self.pass_loss == "token_sum" else "examples")
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def training_step(self, model, inputs, num_items_in_batch=None):
        parts = inputs.pop(PASSES_KEY, None) if isinstance(inputs, dict) else None
        if not parts:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.pass_loss == "token_sum" and num_items_in_batch is None:  # each pass divides by the batch's count
            num_items_in_batch = (inputs["labels"][..., 1:] != -100).sum()
        rows = [part["input_ids"].shape[0] for part in parts]
        losses = []
        try:
            for i, part in enumerate(parts):
                self._pass_share = rows[i] / sum(rows) if self.pass_loss == "pair_mean" else None
                # gradients are reduced across processes once, at the last pass (an outer no_sync stays in force)
                last = i == len(parts) - 1
                sync = (contextlib.nullcontext() if last or self.accelerator.num_processes == 1
                        else self.accelerator.no_sync(model))
                with sync:
                    losses.append(super().training_step(model, part, num_items_in_batch))
        finally:
            self._pass_share = None
        return torch.stack(losses).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        share = self.__dict__.get("_pass_share")
        if share is None:
            return out
        return (out[0] * share, *out[1:]) if return_outputs else out * share


def split_examples(examples: list, passes: int, balance: str = "examples") -> list[list]:
    """`examples` in at most `passes` runs of consecutive examples: as many examples each (`balance="examples"`),
    or about as many tokens (`"tokens"`: by `len(example["input_ids"])`), none empty."""
    passes = max(1, min(passes, len(examples)))
    if balance == "tokens":
        sizes = [len(e["input_ids"]) for e in examples]
    else:
        sizes = [1] * len(examples)
    total, cuts, seen = sum(sizes), [0], 0
    for i, size in enumerate(sizes):
        seen += size
        # cut after example i when the running total reaches the next pass's share, leaving an example for each
        # pass still to come
        if len(cuts) < passes and seen >= total * len(cuts) / passes and len(examples) - (i + 1) >= passes - len(cuts):
            cuts.append(i + 1)
    cuts.append(len(examples))
    return [examples[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def collate_in_passes(examples: list, collate, passes: int, balance: str = "examples") -> dict:
    """The training batch of `examples` (`collate(examples)`: what Trainer counts the batch's trained tokens from)
    with its passes' sub-batches under `PASSES_KEY`, each `collate` of its own examples."""
    batch = collate(examples)
    groups = split_examples(examples, passes, balance)
    if len(groups) > 1:
        batch[PASSES_KEY] = [collate(group) for group in groups]
    return batch
