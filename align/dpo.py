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

from trl import DPOTrainer

from align import config, data, modeling, speed, stacking, training


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

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.reference_first or self.precompute_ref_logps or "ref_chosen_logps" in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        chosen, rejected = self.compute_ref_log_probs(self.model if self.ref_model is None else self.ref_model, inputs)
        self.precompute_ref_logps = True  # read by TRL's loss for this call only
        try:
            return super()._compute_loss(model, dict(inputs, ref_chosen_logps=chosen, ref_rejected_logps=rejected),
                                         return_outputs)
        finally:
            self.precompute_ref_logps = False


class AlignDPOTrainer(training.NonFiniteLossGuard, training.PairWeightedMetrics, ReferenceFirst, DPOTrainer):
    """TRL's DPOTrainer that stops on a NaN/inf loss, weights its logged metrics by pairs and computes the
    reference log-probabilities before the policy forward."""


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
    speed.finish(trainer, speedups, run_args.lean_memory_budget)

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
