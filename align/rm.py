"""Reward model: a one-score head on the frozen base with a LoRA adapter, trained on preference pairs with the
pairwise (Bradley-Terry) loss of TRL's RewardTrainer.

    accelerate launch align/rm.py --config recipes/smollm2/rm_lora.yaml

The score head is saved with the adapter (`modules_to_save`); `align.reward.RewardScorer` loads the result.
Sections: parse -> logging, seed, resume point -> tokenizer and pairs -> base (seq-cls) + adapter -> trainer ->
train, held-out pairwise accuracy before and after -> save + run.json.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import time

from transformers import set_seed
from trl import RewardTrainer

from align import config, data, manifest, modeling, stacking, training


class AlignRewardTrainer(training.NonFiniteLossGuard, RewardTrainer):
    """TRL's RewardTrainer that stops on a NaN/inf loss."""


def main(argv=None):
    started = time.time()
    # 1. Recipe. The adapter is a sequence-classification adapter whatever the recipe says.
    model_args, data_args, train_args, run_args = config.parse_recipe(
        (config.ModelArguments, config.DataArguments, config.RewardArguments, config.RunArguments), argv
    )
    model_args.lora_task_type = "SEQ_CLS"
    if run_args.sft_adapter:
        raise config.ConfigError("rm.py trains a reward adapter on the base; sft_adapter is not used here (merge the "
                                 "SFT adapter with align/merge.py and use the merged model as model_name_or_path)")
    training.setup_logging(train_args)
    set_seed(train_args.seed)
    checkpoint = training.find_resume_checkpoint(train_args, run_args.resume)
    resolved = config.to_dict(model_args, data_args, train_args, run_args)

    # 2. Tokenizer and preference pairs.
    tokenizer = modeling.load_tokenizer(model_args)
    template_sha = data.ensure_chat_template(tokenizer, data_args.chat_template)
    train_ds, eval_ds, report = data.build_preference_datasets(
        data_args, tokenizer, max_length=train_args.max_length, seed=train_args.seed
    )

    # 3. Base with a one-score head, and the LoRA adapter (the head trains with it and is saved with it).
    model = modeling.load_model(model_args, task="seq_cls", num_labels=1, training=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = stacking.attach_trainable_adapter(model, model_args)
    training.mark_base_frozen(model)

    # 4. Trainer.
    trainer = AlignRewardTrainer(
        model=model, args=train_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )
    trainer.stop_on_nonfinite_loss = run_args.stop_on_nonfinite_loss

    # 5. Train, with held-out pairwise accuracy before and after.
    metrics = {}
    if eval_ds is not None and checkpoint is None:
        metrics.update({f"before_{k}": v for k, v in trainer.evaluate().items()})
    train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    training.write_results(trainer, "train", train_metrics)
    metrics.update(train_metrics)
    metrics.update(training.last_logged(trainer, prefix="train_", keys=("accuracy", "margin", "loss")))
    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
        training.write_results(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)

    # 6. Save adapter + score head, tokenizer, trainer state, run.json.
    training.save_final(trainer, train_args.output_dir)
    if trainer.is_world_process_zero():
        training.save_heldout_pairs(eval_ds, train_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        lineage = manifest.base_model_lineage(model_args)
        lineage.update(chat_template_sha256=template_sha, parent_adapter=None, adapter=True, head="score")
        path = manifest.write_run(
            train_args.output_dir, stage="rm", config=resolved, seed=train_args.seed, data=report.as_dict(),
            metrics=metrics, lineage=lineage, started=started,
        )
        print(f"rm: wrote {train_args.output_dir} (run manifest {path}; eval accuracy "
              f"{metrics.get('eval_accuracy', float('nan')):.3f})")
    return trainer


if __name__ == "__main__":
    main()
