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

from trl import RewardTrainer

from align import batch_passes, config, data, modeling, speed, stacking, training


class AlignRewardTrainer(training.NonFiniteLossGuard, training.CachedParameterScans, batch_passes.BatchPasses,
                         training.PairWeightedMetrics, RewardTrainer):
    """TRL's RewardTrainer that stops on a NaN/inf loss, weights its logged metrics by pairs and lists its trained
    parameters once."""


def main(argv=None):
    # 1. Recipe, logging, seed, resume point. The adapter is a sequence-classification adapter.
    (model_args, data_args, train_args, run_args), run = training.begin(
        "rm", (config.ModelArguments, config.DataArguments, config.RewardArguments, config.RunArguments), argv
    )
    model_args.lora_task_type = run.resolved["ModelArguments"]["lora_task_type"] = "SEQ_CLS"
    if run_args.sft_adapter:
        raise config.ConfigError("rm.py trains a reward adapter on the base; sft_adapter is not used here (merge the "
                                 "SFT adapter with align/merge.py and use the merged model as model_name_or_path)")

    # 2. Tokenizer and preference pairs.
    tokenizer = modeling.load_tokenizer(model_args)
    template_sha = data.ensure_chat_template(tokenizer, data_args.chat_template)
    train_ds, eval_ds, report = data.build_preference_datasets(
        data_args, tokenizer, max_length=train_args.max_length, seed=train_args.seed
    )

    # 3. Base with a one-score head, and the LoRA adapter (the head trains with it and is saved with it).
    # The new score head is drawn from the seed alone: the same reward model under every launch engine.
    speedups = speed.resolve(run_args.speedups, "rm", model_args, train_args)
    speed.prepare_args(train_args, speedups, "rm")
    model = modeling.load_model(model_args, task="seq_cls", num_labels=1, training=True, head_seed=train_args.seed)
    model = speed.prepare_model(model, speedups)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = stacking.attach_trainable_adapter(model, model_args)
    training.mark_base_frozen(model)

    # 4. Trainer.
    trainer = AlignRewardTrainer(
        model=model, args=train_args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )
    trainer.stop_on_nonfinite_loss = run_args.stop_on_nonfinite_loss
    speed.finish(trainer, speedups, run_args.lean_memory_budget, run_args.offload_gib, run_args.passes_per_batch)

    # 5. Train, with held-out pairwise accuracy before and after.
    metrics = training.train_and_evaluate(trainer, run, has_eval=eval_ds is not None,
                                          logged_keys=("accuracy", "margin", "loss"))

    # 6. Save adapter + score head, held-out pairs, trainer state, run.json.
    training.finish(trainer, run, model_args, report=report, metrics=metrics, lineage=dict(
        chat_template_sha256=template_sha, parent_adapter=None, adapter=True, head="score",
    ))
    if trainer.is_world_process_zero():
        training.save_heldout_pairs(eval_ds, train_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
