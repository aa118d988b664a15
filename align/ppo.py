"""PPO (RLHF) on adapters: policy, reference, reward and value as LoRA adapters on one frozen base.

    accelerate launch align/ppo.py --config recipes/smollm2/ppo_lora.yaml \
        --sft_adapter outputs/smollm2-sft --reward_adapter outputs/smollm2-rm

The base is loaded once. The policy is a trainable copy of the SFT adapter, the reference the SFT adapter itself
(frozen), the reward the reward model's adapter and score head, the value a trainable adapter with a value head
(from the reward model or the SFT adapter, `value_init`); see `align.rl.roles`. Without `--sft_adapter` the policy
is a fresh LoRA adapter and the reference the base. The reward can also be a separate model (`--reward_model`)
or a Python function (`--reward_fn module:function`).

Sections: parse -> accelerator, logging, seed -> tokenizer and prompts -> roles on the base, reward, optimizer ->
resume -> reward before -> loop (rollout, score, advantages, PPO epochs; log; checkpoint) -> reward after ->
save policy adapter, value/, tokenizer, run.json.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import logging
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object
from tqdm.auto import tqdm
from transformers import set_seed

from align import config, data, launch, manifest, modeling, stacking
from align.rl import checkpoint, kl, rewards, rollout
from align.rl import roles as roles_lib
from align.rl import step as ppo
from align.rl.config import PPOArguments

logger = logging.getLogger("align")
# step statistics averaged over the run into run.json, by their name there (train_<name>)
AVERAGED = {"loss/total": "loss", "loss/policy": "policy_loss", "loss/value": "value_loss",
            "policy/entropy": "entropy", "policy/clipfrac": "clipfrac", "policy/approx_kl": "approx_kl"}


def parse(argv=None):
    """Recipe and command line -> (model, data, ppo, run) arguments, checked against the parent adapters."""
    model_args, data_args, args, run_args = config.parse_recipe(
        (config.ModelArguments, config.DataArguments, PPOArguments, config.RunArguments), argv
    )
    if run_args.merge_sft_adapter:
        raise config.ConfigError("ppo.py trains a copy of the SFT adapter; merge_sft_adapter is not supported (merge "
                                 "with align/merge.py and use the merged model as model_name_or_path)")
    if (run_args.speedups or "none").strip() not in ("none", "", "auto"):  # auto: what pays here, i.e. nothing
        raise config.ConfigError(f"ppo.py has no speed options (speedups: {run_args.speedups!r}); the stages that "
                                 "take them are sft.py, dpo.py and rm.py. Fix: remove speedups or set it to auto/none")
    if run_args.passes_per_batch not in (None, 1):
        raise config.ConfigError("passes_per_batch: a key of sft.py, dpo.py and rm.py, not of ppo.py (its "
                                 "mini_batch_size sets the rows of a pass). Fix: remove it from the recipe")
    if not (args.reward_adapter or args.reward_model or args.reward_fn):
        raise config.ConfigError("PPO needs a reward: --reward_adapter DIR (align/rm.py output, run on the shared base), "
                                 "--reward_model DIR (a separate model) or --reward_fn module:function")
    if args.value_init == "reward" and not args.reward_adapter:
        raise config.ConfigError("value_init: reward starts the value model from --reward_adapter; without one use "
                                 "--value_init sft")
    check_ppo_launch()
    for parent in (run_args.sft_adapter, args.reward_adapter):
        if parent:  # every adapter must sit on the base this run loads
            stacking.check_same_base(parent, model_args)
    if run_args.sft_adapter:  # the SFT run fixes the chat template and the end-of-turn token
        model_args.tokenizer_name_or_path = model_args.tokenizer_name_or_path or run_args.sft_adapter
    return model_args, data_args, args, run_args


def check_ppo_launch(env=None) -> None:
    """PPO runs as one process or as DDP (`recipes/accelerate/single_gpu.yaml` / `multi_gpu.yaml`); refuse the
    DeepSpeed and FSDP configs before anything is loaded, with the reason and the fix."""
    if launch.wraps_model_at_train(None, env):
        engine = launch.distributed_engine(None, env)
        raise launch.LaunchConfigError(
            f"ppo.py does not run under {engine}: its loop generates token by token and switches the policy, "
            "reference, reward and value adapters on one frozen base between passes, which a sharded base "
            "(ZeRO-3, FSDP) would gather at every token, and its own optimizer loop is not a DeepSpeed engine. "
            "Fix: launch with recipes/accelerate/multi_gpu.yaml (DDP: each GPU holds the one shared base, with "
            "load_in_4bit to fit a larger base) or single_gpu.yaml.")


def setup_logging(accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)


def reduce_stats(accelerator, stats: dict) -> dict:
    """Mean of each statistic over the processes."""
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, reduction="mean").tolist()))


def evaluate(accelerator, roles, reward, tokenizer, prompts, args, gen_config) -> dict:
    """Mean reward, KL and response length of the policy on the eval prompts (shared out over processes)."""
    mine = prompts[accelerator.process_index :: accelerator.num_processes]
    sums = ppo.evaluate(roles, reward, tokenizer, mine, args, gen_config, seed=args.seed + 1 + accelerator.process_index)
    keys = ("reward", "kl", "response_length", "count")
    totals = accelerator.reduce(torch.tensor([sums.get(k, 0.0) for k in keys], device=accelerator.device), "sum")
    count = max(totals[3].item(), 1.0)
    return {"reward": totals[0].item() / count, "kl": totals[1].item() / count,
            "response_length": totals[2].item() / count}


def main(argv=None):
    started = time.time()
    # 1. Recipe.
    model_args, data_args, args, run_args = parse(argv)
    resolved = config.to_dict(model_args, data_args, args, run_args)

    # 2. Accelerator (one process per device; DDP all-reduces the gradients), logging, trackers, seed.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, several processes (torchrun) then join a gloo process group
        mixed_precision="bf16" if args.bf16 else "no", log_with=args.trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "runs")),
    )
    setup_logging(accelerator)
    set_seed(args.seed)
    if args.trackers:
        accelerator.init_trackers("ppo")

    # 3. Tokenizer (the SFT adapter's, with its chat template) and prompts from the shared data module.
    tokenizer = modeling.load_tokenizer(model_args)
    if args.eos_token:
        tokenizer.eos_token = args.eos_token
    template_sha = data.ensure_chat_template(tokenizer, data_args.chat_template)
    train_prompts, eval_prompts, report = rollout.load_prompts(
        data_args, tokenizer, max_prompt_length=args.max_prompt_length, seed=args.seed)
    eval_prompts = eval_prompts or train_prompts[: args.per_device_train_batch_size * accelerator.num_processes]
    gen_config = rollout.generation_config(args, tokenizer)

    # 4. One frozen base with the policy, reference, reward and value adapters; the reward; the optimizer.
    roles = roles_lib.build_roles(model_args, sft_adapter=run_args.sft_adapter, reward_adapter=args.reward_adapter,
                                  value_init=args.value_init)
    roles.place(accelerator.device, quantized=model_args.load_in_4bit or model_args.load_in_8bit)
    roles.eval()  # no dropout anywhere: old and new log-probs must agree before an update
    reward = rewards.build_reward(args, roles, tokenizer, accelerator.device)
    optimizer = torch.optim.AdamW([p for p in roles.parameters() if p.requires_grad], lr=args.learning_rate,
                                  eps=args.adam_epsilon)
    model, optimizer = accelerator.prepare(roles, optimizer)
    kl_ctl = kl.kl_controller(args)
    set_seed(args.seed + accelerator.process_index)  # sampling differs across processes (their prompts do too)
    logger.info("ppo: %d base parameters (one copy), %d trainable; reference: %s; reward: %s",
                roles_lib.base_parameter_count(roles), sum(p.numel() for p in roles.parameters() if p.requires_grad),
                "the SFT adapter" if roles.reference else "the base (adapters off)",
                args.reward_adapter or args.reward_model or args.reward_fn)

    # 5. Resume from the last complete checkpoint, or measure the reward before training.
    state = {"metrics": {}, "sums": {}, "steps": 0, "log_history": []}
    last = checkpoint.last_checkpoint(args.output_dir) if run_args.resume else None
    if last is not None:
        logger.info("resuming from %s", last)
        state = checkpoint.load_checkpoint(last, roles, optimizer, accelerator)
        kl_ctl.load_state_dict(state["kl_ctl"])
    else:
        before = evaluate(accelerator, roles, reward, tokenizer, eval_prompts, args, gen_config)
        state["metrics"].update({f"{k}_before": v for k, v in before.items()})

    # 6. The loop: rollout -> score -> KL penalty, advantages -> PPO epochs over mini-batches.
    bar = tqdm(total=args.max_steps, initial=state["steps"], disable=args.disable_tqdm or not accelerator.is_main_process)
    for step in range(state["steps"], args.max_steps):
        prompts = rollout.batch_for_step(train_prompts, step, args.per_device_train_batch_size, args.seed,
                                         accelerator.num_processes, accelerator.process_index)
        with accelerator.autocast():
            exp, stats = ppo.collect_experience(roles, reward, tokenizer, prompts, args, kl_ctl.value, gen_config)
        stats.update(ppo.ppo_update(model, optimizer, accelerator, exp, args, run_args.stop_on_nonfinite_loss))
        stats = reduce_stats(accelerator, stats)
        kl_ctl.update(stats["objective/kl"], args.per_device_train_batch_size * accelerator.num_processes)
        state["steps"] = step + 1
        record(state, stats)
        bar.update(1)
        if (step + 1) % args.logging_steps == 0:
            state["log_history"].append(dict(stats, step=step + 1))
            accelerator.log(stats, step=step + 1)
            logger.info("ppo step %d/%d: %s", step + 1, args.max_steps, format_stats(stats))
        if args.save_steps and (step + 1) % args.save_steps == 0:
            checkpoint.save_checkpoint(args.output_dir, step + 1, roles, optimizer, accelerator,
                                       dict(state, kl_ctl=kl_ctl.state_dict()), model_args.model_name_or_path,
                                       args.save_total_limit)
    bar.close()

    # 7. Reward after training; the processes must hold the same weights.
    after = evaluate(accelerator, roles, reward, tokenizer, eval_prompts, args, gen_config)
    metrics = dict(state["metrics"], **{f"{k}_after": v for k, v in after.items()})
    metrics.update({f"train_{k}": v / max(state["steps"], 1) for k, v in state["sums"].items()}, kl_coef=kl_ctl.value,
                   steps=state["steps"])
    fingerprints = gather_object([roles_lib.trainable_fingerprint(roles)])
    print(f"ppo: process {accelerator.process_index} trainable weights sha256 {fingerprints[accelerator.process_index]}",
          flush=True)
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"the processes' adapters differ after training: {fingerprints}")

    # 8. Save the policy adapter (output_dir), the value adapter + head (output_dir/value), tokenizer, run.json.
    if accelerator.is_main_process:
        roles_lib.save_policy_and_value(roles, args.output_dir, model_args.model_name_or_path)
        # the policy adapter holds finite tensors (not `trained`: a fresh adapter whose policy gradient was zero
        # in a short run, all advantages zero, keeps LoRA B at zero)
        launch.check_saved_adapter(args.output_dir, trained=False)
        for path in (args.output_dir, os.path.join(args.output_dir, "value")):  # value/ loads like a reward model
            tokenizer.save_pretrained(path)
        manifest.write_json_atomic(os.path.join(args.output_dir, "log_history.json"), state["log_history"])
        lineage = manifest.base_model_lineage(model_args)
        lineage.update(chat_template_sha256=template_sha, parent_adapter=stacking.parent_lineage(run_args.sft_adapter),
                       reference="sft_adapter" if run_args.sft_adapter else "base", reward=reward_lineage(args),
                       value_init=args.value_init, adapter=True)
        path = manifest.write_run(
            args.output_dir, stage="ppo", config=resolved, seed=args.seed, data=report.as_dict(), metrics=metrics,
            lineage=lineage, started=started,
            extra={"processes": accelerator.num_processes, "trainable_sha256": fingerprints[0]},
        )
        print(f"ppo: wrote {args.output_dir} (run manifest {path}; reward {metrics.get('reward_before', float('nan')):.4f}"
              f" -> {metrics['reward_after']:.4f}, KL {metrics['kl_after']:.4f})")
    # A barrier before tearing down: gloo's worker thread destroys a finished collective's tensors (the adapter
    # fingerprints' all-gather) under the GIL, and the DDP reducer freed at exit destroys the process group while
    # holding the GIL and waiting for that thread: without the barrier (whose wait releases the GIL), a process
    # could hang at exit after its work was done (about one two-process CPU run in 45; py-spy showed
    # ~ProcessGroupGloo waiting on a mutex held by the worker thread, which waited for the GIL).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return roles, metrics


def record(state: dict, stats: dict) -> None:
    """For run.json: the first and last step's mean reward, the last KL, running sums of the losses."""
    state["metrics"].setdefault("train_reward_first", stats["reward/score"])
    state["metrics"].update(train_reward_last=stats["reward/score"], final_kl=stats["objective/kl"])
    for k, name in AVERAGED.items():
        state["sums"][name] = state["sums"].get(name, 0.0) + stats[k]


def format_stats(stats: dict) -> str:
    keys = ("reward/score", "objective/kl", "objective/kl_coef", "policy/entropy", "policy/clipfrac", "loss/value",
            "policy/approx_kl", "response/length")
    return ", ".join(f"{k.split('/')[-1]} {stats[k]:.4g}" for k in keys if k in stats)


def reward_lineage(args) -> dict:
    if args.reward_adapter:
        return {"source": "adapter", "path": os.path.abspath(args.reward_adapter),
                "parent": stacking.parent_lineage(args.reward_adapter)}
    if args.reward_model:
        return {"source": "model", "path": args.reward_model}
    return {"source": "function", "name": args.reward_fn}


if __name__ == "__main__":
    main()
