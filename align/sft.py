"""Supervised fine-tuning: LoRA, QLoRA (4-bit base) or a full fine-tune, from one recipe.

    accelerate launch align/sft.py --config recipes/smollm2/sft_lora.yaml [--key value ...]

Sections, top to bottom: parse the recipe -> logging and seed -> resume point -> tokenizer and data ->
model and adapter -> trainer -> train -> save adapter, results and run.json.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from trl import SFTTrainer

from align import batch_passes, config, data, modeling, speed, stacking, training


class AlignSFTTrainer(training.NonFiniteLossGuard, training.CachedParameterScans, batch_passes.BatchPasses,
                      training.TokenWeightedMetrics, training.DeferredSFTMetrics, SFTTrainer):
    """TRL's SFTTrainer that stops on a NaN/inf loss, weights its logged metrics by trained tokens, reads them on
    the host once per log line and lists its trained parameters once."""

    pass_loss = "token_sum"  # batch_passes: each pass's token sum over the batch's trained-token count


def main(argv=None):
    # 1. Recipe (YAML + overrides), logging, seed, resume point.
    (model_args, data_args, train_args, run_args), run = training.begin(
        "sft", (config.ModelArguments, config.DataArguments, config.SFTArguments, config.RunArguments), argv
    )

    # 2. Tokenizer and data: any supported format -> chat messages -> token ids with assistant-only labels.
    tokenizer = modeling.load_tokenizer(model_args)
    if train_args.eos_token:  # the token that ends an assistant turn in this family's template
        tokenizer.eos_token = train_args.eos_token
    template_sha = data.ensure_chat_template(tokenizer, data_args.chat_template)
    train_ds, eval_ds, report = data.build_sft_datasets(
        data_args, tokenizer, max_length=train_args.max_length,
        assistant_only_loss=train_args.assistant_only_loss, seed=train_args.seed,
    )
    train_args.assistant_only_loss = False  # labels are built above; TRL must not rebuild them from a template

    # 3. Model: frozen base (bf16 / fp32 / 4-bit / 8-bit) with a LoRA adapter, or all weights for a full fine-tune.
    # Speedups (align/speed.py): padding-free batches, compiled layers, bf16 4-bit layout; the loss is unchanged.
    speedups = speed.resolve(run_args.speedups, "sft", model_args, train_args)
    speed.prepare_args(train_args, speedups, "sft")
    model = speed.prepare_model(modeling.load_model(model_args, training=True), speedups)
    model = stacking.attach_trainable_adapter(model, model_args, parent=run_args.sft_adapter)
    training.mark_base_frozen(model)

    # 4. Trainer: TRL's SFTTrainer on the pre-tokenized data (labels already carry the assistant mask).
    trainer = AlignSFTTrainer(
        model=model, args=train_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )
    trainer.stop_on_nonfinite_loss = run_args.stop_on_nonfinite_loss
    speed.finish(trainer, speedups, run_args.lean_memory_budget, run_args.offload_gib, run_args.passes_per_batch)

    # 5. Train (resuming from the last checkpoint when there is one), eval loss before and after.
    metrics = training.train_and_evaluate(trainer, run, has_eval=eval_ds is not None)

    # 6. Save: adapter (or full model) + tokenizer with its chat template, trainer state, run.json.
    training.finish(trainer, run, model_args, report=report, metrics=metrics, lineage=dict(
        chat_template_sha256=template_sha, parent_adapter=stacking.parent_lineage(run_args.sft_adapter),
        adapter=model_args.use_peft,
    ))
    return trainer


if __name__ == "__main__":
    main()
