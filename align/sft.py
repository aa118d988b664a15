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

import time

from transformers import set_seed
from trl import SFTTrainer

from align import config, data, manifest, modeling, stacking, training


class AlignSFTTrainer(training.NonFiniteLossGuard, SFTTrainer):
    """TRL's SFTTrainer that stops on a NaN/inf loss."""


def main(argv=None):
    started = time.time()
    # 1. Recipe: model / data / trainer / run settings, YAML plus command-line overrides.
    model_args, data_args, train_args, run_args = config.parse_recipe(
        (config.ModelArguments, config.DataArguments, config.SFTArguments, config.RunArguments), argv
    )
    training.setup_logging(train_args)
    set_seed(train_args.seed)
    checkpoint = training.find_resume_checkpoint(train_args, run_args.resume)
    resolved = config.to_dict(model_args, data_args, train_args, run_args)

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
    model = modeling.load_model(model_args, training=True)
    model = stacking.attach_trainable_adapter(model, model_args, parent=run_args.sft_adapter)
    training.mark_base_frozen(model)

    # 4. Trainer: TRL's SFTTrainer on the pre-tokenized data (labels already carry the assistant mask).
    trainer = AlignSFTTrainer(
        model=model, args=train_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )
    trainer.stop_on_nonfinite_loss = run_args.stop_on_nonfinite_loss

    # 5. Train (resuming from the last checkpoint when there is one), then evaluate.
    metrics = {}
    if eval_ds is not None and checkpoint is None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    training.write_results(trainer, "train", train_metrics)
    metrics.update(train_metrics)
    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
        training.write_results(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)

    # 6. Save: adapter (or full model) + tokenizer with its chat template, trainer state, run.json.
    training.save_final(trainer, train_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        lineage = manifest.base_model_lineage(model_args)
        lineage.update(chat_template_sha256=template_sha, parent_adapter=stacking.parent_lineage(run_args.sft_adapter),
                       adapter=model_args.use_peft)
        path = manifest.write_run(
            train_args.output_dir, stage="sft",
            config=resolved, seed=train_args.seed,
            data=report.as_dict(), metrics=metrics, lineage=lineage, started=started,
        )
        print(f"sft: wrote {train_args.output_dir} (run manifest {path})")
    return trainer


if __name__ == "__main__":
    main()
