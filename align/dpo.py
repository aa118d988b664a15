"""Direct preference optimisation on adapters, stacked on the SFT adapter.

    accelerate launch align/dpo.py --config recipes/smollm2/dpo_lora.yaml --sft_adapter outputs/smollm2-sft-lora

The base is loaded once and stays frozen. With `--sft_adapter`, the policy is a trainable copy of the SFT adapter
and the reference is the SFT adapter itself, frozen, on the same base (no second copy of the base weights).
Without it, the policy is a fresh LoRA adapter and the reference is the base with the adapter switched off.
With `--merge_sft_adapter true`, the SFT adapter is merged into the base first and a fresh adapter is trained
on the merged weights; the reference is then the merged model (adapter off). See `align.stacking`.

Sections: parse -> logging, seed, resume point -> tokenizer and preference data -> base + policy/reference
adapters -> TRL's DPOTrainer -> train and evaluate (held-out reward accuracy before and after) -> save + run.json.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import contextlib

import torch
from trl import DPOTrainer

from align import batch_passes, config, data, modeling, speed, stacking, training


class ReferenceFirst:
    """DPO's reference log-probabilities before the policy forward, not after it.

    TRL's DPO loss runs the policy forward (which keeps its activations for the backward) and then the reference
    forward under `no_grad`, so the reference's working memory (each layer's hidden states and MLP intermediates,
    the LM head's tiles) comes on top of every activation the policy holds. Here the reference log-probabilities
    are computed first, with TRL's own `compute_ref_log_probs`, and handed to TRL's loss as precomputed ones for
    this batch: the same values (no grad, the same weights and autocast), and the step's peak is the larger of the
    two forwards' needs instead of their sum. On with the `ref_first` speedup (`speed.finish` sets
    `reference_first`); off, TRL's order."""

    reference_first = False

    def reference_model(self):
        """What TRL's reference forward runs: the policy model (its adapter switched) or a separate model."""
        return self.model if self.ref_model is None else self.ref_model

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.reference_first or self.precompute_ref_logps or "ref_chosen_logps" in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        chosen, rejected = self.compute_ref_log_probs(self.reference_model(), inputs)
        self.precompute_ref_logps = True  # read by TRL's loss for this call only
        try:
            return super()._compute_loss(model, dict(inputs, ref_chosen_logps=chosen, ref_rejected_logps=rejected),
                                         return_outputs)
        finally:
            self.precompute_ref_logps = False


class QuickReferenceSwitch:
    """TRL's reference forward, with the policy's adapter switched by `stacking.AdapterSwitch` (the adapter layers
    found once) instead of TRL's `use_adapter`, an unwrap and a gradient-checkpointing query per call: each walks
    every module of the model, ~15 ms of host time per step on a 2-core CPU at the start of the step, while the GPU
    has nothing queued. Same forward, same values; TRL's own method where the switch does not apply (a separate
    reference model, other tuners, length-desensitised `ld_alpha`).

    `reference_in_policy_graph` (set by `speed.finish` with `compile` and `ref_first`): the reference forward runs
    the policy's own forward with the policy adapter carrying the reference's weights (the base's: B = 0;
    `AdapterSwitch.stand_in`), in the caller's grad mode (on in training) and its result detached, so that it runs
    the policy's compiled graph.
    With the adapter switched off under `no_grad` it ran another compiled graph (an inference graph without the
    LoRA ops), whose kernels may round differently: on an H100 at the Llama-3.1-8B shape the first DPO loss, log 2
    when the reference is the policy, came out 0.57-0.67 (benchmarks/README.md, Call27). The autograd graph it
    records is dropped with the detached result, before the policy forward (`ref_first`)."""

    reference_in_policy_graph = False

    def compute_ref_log_probs(self, model, inputs):
        cached = self.__dict__.get("_reference_switch")
        if cached is None:
            from align.stacking import AdapterSwitch

            peft_model = self.accelerator.unwrap_model(self.model)
            switch = AdapterSwitch.for_model(peft_model) if self.ref_model is None else None
            reference = "ref" if switch is not None and "ref" in peft_model.peft_config else None  # TRL's rule
            checkpointing = bool(getattr(peft_model, "is_gradient_checkpointing", False))
            stands_in = switch is not None and switch.can_stand_in(reference)
            cached = self._reference_switch = (switch, reference, checkpointing, stands_in)
        switch, reference, checkpointing, stands_in = cached
        if switch is None or model is not self.model or self.ld_alpha is not None:
            return super().compute_ref_log_probs(model, inputs)
        from trl.models.utils import disable_gradient_checkpointing

        model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                     "ref_rejected_logps")}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        if self.reference_in_policy_graph and stands_in:
            # as the policy's forward (the caller's grad mode, checkpointing as it is): the policy's compiled graph
            with switch.stand_in(reference), speed.head_without_grad(), self.accelerator.autocast():
                per_token = model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs.detach()
        else:
            no_checkpointing = (disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
                                if checkpointing else contextlib.nullcontext())
            with torch.no_grad(), no_checkpointing, switch.use(reference), self.accelerator.autocast():
                per_token = model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
        mask = inputs["completion_mask"][..., 1:]
        return per_token[:, -mask.size(1):].sum(dim=1).chunk(2, dim=0)


class DeferredDPOMetrics(training.DeferredTokenCount):
    """DPOTrainer mixin: a training step's loss as TRL computes it, its logged metrics kept on the device and read
    once per log line.

    TRL's `_compute_loss` reads about a dozen numbers on the host after the policy forward (`.item()` per metric,
    a boolean index for the mean logits, `if count > 0`), each a wait for the GPU: the host cannot queue the
    backward while the forward runs. Here, for TRL's default loss (`sigmoid`, reverse KL, no length weighting,
    `ld_alpha` or MoE aux loss), the same loss is computed (the reference first or after the policy forward, as
    `ReferenceFirst` says) and each metric is appended as a device scalar; `log` reads them all in one transfer
    before TRL averages them. Evaluation, other loss types and `return_outputs` go to TRL's own `_compute_loss`."""

    def _deferred_dpo_applies(self, return_outputs) -> bool:
        return (self.model.training and not return_outputs and list(self.loss_types) == ["sigmoid"]
                and self.f_divergence_type == "reverse_kl" and self.ld_alpha is None and not self.use_weighting
                and not self.aux_loss_enabled)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._deferred_dpo_applies(return_outputs):
            return super()._compute_loss(model, inputs, return_outputs)
        reference, first = self.reference_model(), self.reference_first  # ReferenceFirst's
        given = self.precompute_ref_logps or "ref_chosen_logps" in inputs
        if given:
            ref = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif first:
            ref = self.compute_ref_log_probs(reference, inputs)
        model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                                      "ref_rejected_logps")}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        if not given and not first:  # TRL's order: the reference after
            ref = self.compute_ref_log_probs(reference, inputs)
        mask = completion_mask[..., 1:]
        seq_len = mask.size(1)  # prompt-learning PEFT prepends virtual tokens: keep the real tokens' positions
        chosen_logps, rejected_logps = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        chosen_logratios, rejected_logratios = chosen_logps - ref[0], rejected_logps - ref[1]
        loss = -torch.nn.functional.logsigmoid(self.beta * (chosen_logratios - rejected_logratios)).mean()
        loss = loss * self.loss_weights[0]
        with torch.no_grad():
            self._defer_dpo_metrics(inputs, outputs, mask, chosen_logps, rejected_logps,
                                    self.beta * chosen_logratios, self.beta * rejected_logratios)
        return loss

    def _defer_dpo_metrics(self, inputs, outputs, mask, chosen_logps, rejected_logps, chosen_rewards,
                           rejected_rewards) -> None:
        """TRL's training metrics of one batch (same keys and formulas, gathered the same way), as device scalars."""
        seq_len = mask.size(1)
        gather, summed = self.accelerator.gather, (lambda x: self.accelerator.gather_for_metrics(x).sum())

        def ratio(num, den):  # TRL: num / den if den > 0 else 0.0
            return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

        metrics = self._metrics["train"]
        entropy = outputs.entropy[:, -seq_len:].detach()
        metrics["entropy"].append(ratio(summed((entropy * mask).sum()).float(), summed(mask.sum())))
        self._queue_tokens(device_count=inputs["attention_mask"].sum())  # summed over processes when counted
        chosen_mask, rejected_mask = mask.bool().chunk(2, dim=0)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for key, logits, m in (("logits/chosen", chosen_logits, chosen_mask),
                               ("logits/rejected", rejected_logits, rejected_mask)):
            total = torch.where(m, logits, torch.zeros_like(logits)).sum()  # TRL: logits[m].sum(), a host wait
            metrics[key].append(ratio(summed(total).float(), summed(m.sum())))
        chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
        metrics["mean_token_accuracy"].append(ratio(summed((chosen_top1 & chosen_mask).sum()).float(),
                                                    summed(chosen_mask.sum())))
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean())
        metrics["logps/chosen"].append(gather(chosen_logps).mean())
        metrics["logps/rejected"].append(gather(rejected_logps).mean())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        queued = [(key, i) for key, values in metrics.items() for i, v in enumerate(values)
                  if isinstance(v, torch.Tensor)]
        if queued:  # one read for every queued metric of the logging window
            values = torch.stack([metrics[k][i].detach().float().reshape(()) for k, i in queued]).tolist()
            for (key, i), value in zip(queued, values):
                metrics[key][i] = value
        if self.model.training:
            self._count_deferred_tokens()
            if "num_tokens" in metrics or queued:
                metrics["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


class AlignDPOTrainer(training.NonFiniteLossGuard, training.CachedParameterScans, batch_passes.BatchPasses,
                     training.PairWeightedMetrics, DeferredDPOMetrics, ReferenceFirst, QuickReferenceSwitch, DPOTrainer):
    """TRL's DPOTrainer that stops on a NaN/inf loss, weights its logged metrics by pairs, reads its training
    metrics once per log line, computes the reference log-probabilities before the policy forward, switches to the
    reference adapter without walking the model and lists its trained parameters once."""


def main(argv=None):
    # 1. Recipe, logging, seed, resume point. The SFT run fixes the base and the chat template.
    (model_args, data_args, train_args, run_args), run = training.begin(
        "dpo", (config.ModelArguments, config.DataArguments, config.DPOArguments, config.RunArguments), argv
    )
    if run_args.sft_adapter:
        stacking.check_same_base(run_args.sft_adapter, model_args)
        model_args.tokenizer_name_or_path = model_args.tokenizer_name_or_path or run_args.sft_adapter

    # 2. Tokenizer and preference pairs (prompt / chosen / rejected as chat messages).
    tokenizer = modeling.load_tokenizer(model_args)
    template_sha = data.ensure_chat_template(tokenizer, data_args.chat_template)
    train_ds, eval_ds, report = data.build_preference_datasets(
        data_args, tokenizer, max_length=train_args.max_length, seed=train_args.seed
    )

    # 3. One frozen base; the policy adapter on it; the reference is an adapter switch, not a second model.
    # Speedups (align/speed.py): one shared-prompt row per pair, compiled layers, bf16 4-bit layout.
    speedups = speed.resolve(run_args.speedups, "dpo", model_args, train_args)
    speed.prepare_args(train_args, speedups, "dpo")
    model = speed.prepare_model(modeling.load_model(model_args, training=True), speedups)
    model, reference = stacking.policy_for_preference_training(model, model_args, run_args)
    training.mark_base_frozen(model)

    # 4. Trainer. TRL copies a pretrained adapter into a frozen "ref" adapter and uses it as the reference.
    trainer = AlignDPOTrainer(
        model=model, ref_model=None, args=train_args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    trainer.stop_on_nonfinite_loss = run_args.stop_on_nonfinite_loss
    stacking.match_reference_to_policy(trainer.model, reference)  # TRL casts a QLoRA policy to bf16, not "ref"
    stacking.check_reference(trainer.model, reference)
    speed.finish(trainer, speedups, run_args.lean_memory_budget, run_args.offload_gib, run_args.passes_per_batch)

    # 5. Train, with held-out reward accuracy and margin before and after.
    metrics = training.train_and_evaluate(trainer, run, has_eval=eval_ds is not None,
                                          logged_keys=("rewards/", "logps/", "loss"))

    # 6. Save the policy adapter (not TRL's "ref" copy), the held-out pairs, trainer state and run.json.
    training.finish(trainer, run, model_args, report=report, metrics=metrics, lineage=dict(
        chat_template_sha256=template_sha, parent_adapter=stacking.parent_lineage(run_args.sft_adapter),
        reference=reference, adapter=True,
    ))
    if trainer.is_world_process_zero():
        stacking.remove_saved_reference(train_args.output_dir)
        training.save_heldout_pairs(eval_ds, train_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
