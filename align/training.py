"""What every training stage shares around TRL's trainers: logging, resume, the non-finite-loss guard,
atomic saving of the final output and the Trainer-layout result files."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from align import config, launch, manifest, run_stats

logger = logging.getLogger("align")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops instead of training on garbage."""


class NonFiniteLossGuard:
    """Trainer mixin: stop with a clear message when a step's loss is NaN or inf, without a GPU sync per step.

    Stock `Trainer` drops such losses from its logs (`logging_nan_inf_filter`) and keeps training, so a diverged
    run can look healthy. Mix in before the TRL trainer: `class T(NonFiniteLossGuard, SFTTrainer)`.

    Reading a loss on the host (`.item()`, or the `torch.isnan` test of `logging_nan_inf_filter`) waits for the
    GPU to finish all queued work, so the CPU cannot prepare the next step while the GPU runs this one's backward
    (the CPU-bound part of a step on a small model). Here each step's loss is copied to pinned host memory
    without waiting and checked once the copy has landed (usually at the next step); all pending losses are
    checked, waiting, before a log line, a checkpoint and the end of training, so no NaN is logged or saved.
    The check replaces the filter (turned off while the guard is on). With the guard, `model.train()`, which
    Trainer calls every step (a walk over every module: ~1,300 on a 16-layer LoRA model), runs only when some
    module is not in training mode.
    """

    stop_on_nonfinite_loss = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.stop_on_nonfinite_loss:
            self._check_losses(wait=False)
        with train_mode_once(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.stop_on_nonfinite_loss:
            self._watch_loss(loss)
        return loss

    def _watch_loss(self, loss) -> None:
        pending = self.__dict__.setdefault("_pending_losses", [])
        value = loss.detach().float().reshape(())
        event = None
        if value.device.type == "cuda":
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            value = host
        pending.append((self.state.global_step + 1, self.state.epoch or 0.0, value, event))
        if event is None:
            self._check_losses(wait=True)

    def _check_losses(self, wait: bool) -> None:
        pending = self.__dict__.get("_pending_losses", [])
        while pending:
            step, epoch, value, event = pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            pending.pop(0)
            number = value.item()
            if not math.isfinite(number):
                pending.clear()
                raise NonFiniteLossError(
                    f"training loss is {number} at step {step} (epoch {epoch:.2f}); "
                    "stopping. Lower learning_rate, set max_grad_norm, check the data for empty or broken rows, "
                    "or use bf16/fp32 instead of fp16. The last good checkpoint is in "
                    f"{self.args.output_dir}."
                )

    def log(self, logs: dict, start_time: float | None = None) -> None:
        self._check_losses(wait=True)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._check_losses(wait=True)
        return super()._save_checkpoint(model, trial)

    def train(self, *args, **kwargs):
        if self.stop_on_nonfinite_loss:
            self.args.logging_nan_inf_filter = False  # its host read syncs every step; the guard's check raises
        out = super().train(*args, **kwargs)
        self._check_losses(wait=True)
        return out


class CachedParameterScans:
    """Trainer mixin: transformers' Trainer walks every module and parameter of the model three more times per
    optimizer step, to count the parameters for `total_flos` (`floating_point_ops`), to list the gradients to clip
    and to zero them. With a frozen base and a LoRA adapter each walk goes over ~1,300 modules to find the few
    hundred trained tensors: host time in every step, which a GPU waits for on a small model. Here the count and the
    trained parameters are found once, at the first step (a stage does not unfreeze weights while it trains); the
    values are the same (the frozen parameters have no gradient, so neither the clipped norm nor the zeroing
    changes).

    The clip keeps Trainer's own path under FSDP, DeepSpeed and XLA (their clipping needs the whole list or is the
    engine's); the zeroing is the model's own `zero_grad` when Trainer wraps the model (DDP, DeepSpeed)."""

    _PLAIN = ("NO", "MULTI_GPU", "MULTI_CPU")

    def floating_point_ops(self, inputs):
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self.__dict__.get("_flop_parameters") is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flop_parameters

    def trained_parameters(self, model) -> list:
        """The parameters of `model` (the model or its wrapper) that require a gradient, listed at the first call
        for that object: a parameter unfrozen later in training is not in the list."""
        cache = self.__dict__.setdefault("_trained_parameters", {})  # modules hash by identity
        if model not in cache:
            cache[model] = [p for p in model.parameters() if p.requires_grad]
        return cache[model]

    def _clip_grad_norm(self, model):
        mixed_meshes = getattr(self, "_has_mixed_mesh_grads", None)  # DTensor gradients (tensor parallel)
        if (self.accelerator.distributed_type.name not in self._PLAIN or getattr(self.args, "fp16", False)
                or (mixed_meshes is not None and mixed_meshes(model))):
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self.trained_parameters(model), self.args.max_grad_norm)

    def train(self, *args, **kwargs):
        model = self.model
        own = model.__dict__.get("zero_grad")

        def zero_grad(set_to_none: bool = True) -> None:  # Module.zero_grad over the trained parameters only
            if not set_to_none:
                return torch.nn.Module.zero_grad(model, set_to_none=False)
            for p in self.trained_parameters(model):
                p.grad = None

        model.zero_grad = zero_grad
        try:
            return super().train(*args, **kwargs)
        finally:
            if own is None:
                del model.zero_grad
            else:
                model.zero_grad = own


def _train_only_sets_modes(cls) -> bool:
    """Whether `cls.train` only sets the training flags (torch's, or a wrapper's that just calls it): engines with
    their own `train` (DeepSpeed's) keep the real call every step."""
    from torch.nn.parallel import DistributedDataParallel

    return cls.train in (torch.nn.Module.train, DistributedDataParallel.train, transformers.PreTrainedModel.train)


class train_mode_once:
    """Context for one training step: the model's `train()` walks its modules only when one of them is not in
    training mode (the list of modules is kept on the model, re-read after every real walk)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        model = self.model
        real = type(model).train
        if not _train_only_sets_modes(type(model)):
            return model

        def train(mode: bool = True):
            modules = model.__dict__.get("_align_modules")
            if mode and modules is not None and all(m.training for m in modules):
                return model
            out = real(model, mode)
            model.__dict__["_align_modules"] = list(model.modules())
            return out

        model.__dict__["train"] = train
        return model

    def __exit__(self, *exc):
        self.model.__dict__.pop("train", None)
        return False


def summed_over_processes(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over processes along a new first dimension (itself on one process: no collective)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.gather(tensor.unsqueeze(0)).sum(0)


class WeightedLoggedMetrics:
    """Trainer mixin for TRL's SFT, DPO and reward trainers: each logged metric (token accuracy, entropy, reward
    accuracy, margins, ...) is weighted by what its batch holds (`batch_weight`) instead of averaged over batches.

    TRL appends one value per batch and logs the mean of those values, so a short last batch weighs as much as a
    full one: 17 held-out DPO pairs in eval batches of 8 (8, 8, 1) logged a reward accuracy of 0.667 where 9 of 17
    pairs (0.529) were ranked right. The weight is summed over processes."""

    def batch_weight(self, inputs) -> int | torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        before = {k: len(v) for k, v in self._metrics[mode].items()}
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        device = inputs["input_ids"].device
        # summed over processes, and kept on the device: read at log time (a host read here would wait for the GPU)
        weight = summed_over_processes(self.accelerator, torch.as_tensor(self.batch_weight(inputs), device=device))
        weights = self.__dict__.setdefault("_metric_weights", {"train": {}, "eval": {}})[mode]
        for key, values in self._metrics[mode].items():
            if len(values) == before.get(key, 0) + 1:  # appended by this batch
                weights.setdefault(key, []).append(weight)
        return out

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        weights = self.__dict__.get("_metric_weights", {}).get(mode, {})
        for key, w in weights.items():
            w = torch.stack(w).tolist() if w and isinstance(w[0], torch.Tensor) else w
            values = self._metrics[mode].get(key)
            if values and len(values) == len(w) and sum(w):
                self._metrics[mode][key] = [sum(v * n for v, n in zip(values, w)) / sum(w)]
        weights.clear()
        super().log(logs, start_time)


class PairWeightedMetrics(WeightedLoggedMetrics):
    """DPO and reward trainers: a batch weighs its pairs (chosen rows first, rejected second in `input_ids`)."""

    def batch_weight(self, inputs) -> int:
        return inputs["input_ids"].shape[0] // 2


class TokenWeightedMetrics(WeightedLoggedMetrics):
    """SFT: a batch weighs its trained tokens (labels other than -100 after the one-token shift), the tokens TRL's
    per-batch token accuracy and entropy are averaged over."""

    def batch_weight(self, inputs) -> int | torch.Tensor:
        labels = inputs.get("labels")
        if labels is None:
            return int(inputs["input_ids"].numel())
        return (labels[..., 1:] != -100).sum()  # a device tensor: WeightedLoggedMetrics reads it at log time


class DeferredTokenCount:
    """The running count of trained tokens TRL logs as `num_tokens`, queued per step (a device tensor, or a length
    known on the host) and added up at a log line or before an evaluation: TRL reads it on the host every step."""

    def _queue_tokens(self, device_count=None, host_count: int = 0) -> None:
        if device_count is not None:
            queued = self.__dict__.get("_deferred_tokens")
            self.__dict__["_deferred_tokens"] = device_count if queued is None else queued + device_count
        if host_count:
            self.__dict__["_deferred_host_tokens"] = self.__dict__.get("_deferred_host_tokens", 0) + host_count

    def _count_deferred_tokens(self) -> None:
        queued = self.__dict__.pop("_deferred_tokens", None)
        host = self.__dict__.pop("_deferred_host_tokens", None)
        if queued is None and host is None:  # no training step since the last count (alike on every process)
            return
        total = torch.tensor(host or 0, device=self.accelerator.device) + (0 if queued is None else queued)
        self._total_train_tokens += int(summed_over_processes(self.accelerator, total)) // getattr(
            self, "_tp_size", 1)

    def evaluate(self, *args, **kwargs):
        self._count_deferred_tokens()  # TRL logs the running train token count with the evaluation's metrics
        return super().evaluate(*args, **kwargs)


class DeferredSFTMetrics(DeferredTokenCount):
    """SFTTrainer mixin (between the metric weighting and `SFTTrainer`): TRL's training loss with its logged
    entropy, token accuracy and token count kept on the device and read once per log line.

    TRL's `compute_loss` reads five numbers on the host every step (`num_valid > 0`, two `.item()`, the token
    count), each a wait for the GPU. Here a training step runs TRL's default loss path unchanged (fused LM head,
    `nll` or `dft`, `num_items_in_batch` and the across-devices scaling) and only queues its sums; at a log line
    they are gathered once and logged as TRL would after token weighting: entropy and accuracy over all trained
    tokens of the logging window, `num_tokens` the running total (counted before an evaluation too, which logs it).
    Evaluation, `compute_loss_func`, label smoothing, MoE aux loss and sequence parallelism go to TRL's own
    `compute_loss`."""

    def _deferred_metrics_apply(self, model) -> bool:
        if not model.training or self.compute_loss_func is not None or self.label_smoother is not None:
            return False
        if getattr(self, "aux_loss_enabled", False) or self.args.loss_type not in ("nll", "dft"):
            return False
        pc = getattr(self.accelerator, "parallelism_config", None)
        return not (pc is not None and getattr(pc, "sp_enabled", False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._deferred_metrics_apply(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        if self.args.loss_type == "dft":
            per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if "attention_mask" in inputs:  # a device count, summed on the device
            self._queue_tokens(device_count=inputs["attention_mask"].sum())
        elif "position_ids" in inputs:  # a padding-free row: its length, known on the host (a tensor made from it
            # on the device would be a blocking copy, a wait for the GPU every step)
            self._queue_tokens(host_count=inputs["position_ids"].size(1))
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        with torch.no_grad():
            sums = torch.stack([outputs.label_mask.sum().float(), outputs.entropy.detach().sum().float(),
                                outputs.is_top1.sum().float()])
        self.__dict__.setdefault("_deferred_sums", []).append(sums)
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        pending = self.__dict__.get("_deferred_sums")
        if pending and self.model.training:  # a training log line (an evaluation's comes in eval mode)
            valid, entropy, correct = summed_over_processes(self.accelerator, torch.stack(pending).sum(0)).tolist()
            pending.clear()
            self._count_deferred_tokens()
            metrics = self._metrics["train"]
            metrics["entropy"] = [entropy / valid if valid > 0 else 0.0]
            metrics["mean_token_accuracy"] = [correct / valid if valid > 0 else 0.0]
            metrics["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


def setup_logging(train_args) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = train_args.get_process_log_level()
    own = logging.INFO if train_args.should_log else logging.WARNING  # align's own messages: info on process 0
    logger.setLevel(min(level, own))
    logging.getLogger("align.data").setLevel(min(level, own))
    transformers.utils.logging.set_verbosity(level)


def find_resume_checkpoint(train_args, resume: bool) -> str | None:
    """The last `checkpoint-N` in `output_dir` to resume from, honouring an explicit `resume_from_checkpoint`."""
    if train_args.resume_from_checkpoint:
        return train_args.resume_from_checkpoint
    if not resume or not os.path.isdir(train_args.output_dir):
        return None
    last = get_last_checkpoint(train_args.output_dir)
    if last is not None:
        logger.info("resuming from %s", last)
    return last


def save_final(trainer, output_dir: str) -> None:
    """Save the model (adapter or full weights) and tokenizer so no reader sees half-written files.

    Everything is written into a temporary directory first and then moved into `output_dir` file by file with
    `os.replace`, which is atomic per file. Every rank calls `save_model` (collective under ZeRO-3/FSDP).
    """
    launch.prepare_final_save(trainer)  # FSDP: gather a FULL_STATE_DICT, else the Trainer writes no weights
    tmp = os.path.join(output_dir, ".final-tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(tmp)
    if trainer.is_world_process_zero():
        for name in os.listdir(tmp):
            src, dst = os.path.join(tmp, name), os.path.join(output_dir, name)
            if os.path.isdir(src):
                shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def write_results(trainer, split: str, metrics: dict) -> None:
    """`train_results.json` / `eval_results.json` / `all_results.json`, as the HF example scripts write them. The
    console table shows the scalars (Trainer.log_metrics cannot format a list such as the peak memory per rank)."""
    trainer.log_metrics(split, {k: v for k, v in metrics.items() if not isinstance(v, (list, tuple, dict))})
    trainer.save_metrics(split, metrics)


def last_logged(trainer, prefix: str = "", keys: tuple[str, ...] = ()) -> dict:
    """The last logged training value of each metric whose name starts with one of `keys` (eval logs excluded)."""
    out = {}
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if not k.startswith("eval_") and k.startswith(keys):
                out[prefix + k] = v
    return out


def save_heldout_pairs(eval_ds, output_dir: str) -> str | None:
    """Write the held-out preference pairs (prompt/chosen/rejected messages) next to the adapter, so evaluation
    scores exactly the pairs training never saw (`align/evaluate.py --preference_data DIR/heldout_pairs.jsonl`)."""
    if eval_ds is None:
        return None
    import json

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "heldout_pairs.jsonl")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        for row in eval_ds:
            fh.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    os.replace(tmp, path)
    return path


def mark_base_frozen(model) -> None:
    """Assert that with an adapter only adapter (and modules_to_save) weights train; fail loudly otherwise."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return
    bad = [
        n for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n and "modules_to_save" not in n and "score" not in n
    ]
    if bad:
        raise RuntimeError(f"base weights would train with an adapter: {bad[:5]}")


@dataclass
class StageRun:
    """What a stage knows about its run before the model exists: name, start time, resume point, config."""

    name: str
    started: float
    checkpoint: str | None
    resolved: dict
    train_args: TrainingArguments
    run_args: config.RunArguments


def begin(name: str, classes, argv=None):
    """Parse the recipe, set up logging and the seed, find the checkpoint to resume from.

    Returns the parsed dataclasses (in the order of `classes`) and a `StageRun`."""
    started = time.time()
    parsed = config.parse_recipe(classes, argv)
    train_args = next(p for p in parsed if isinstance(p, TrainingArguments))
    run_args = next(p for p in parsed if isinstance(p, config.RunArguments))
    model_args = next(p for p in parsed if isinstance(p, config.ModelArguments))
    # refuse launch combinations known to break (ZeRO-3/FSDP with quantization, checkpointing settings, ...)
    launch.check_launch(model_args, train_args, adapter=bool(model_args.use_peft or run_args.sft_adapter))
    setup_logging(train_args)
    set_seed(train_args.seed)
    checkpoint = find_resume_checkpoint(train_args, run_args.resume)
    return parsed, StageRun(name, started, checkpoint, config.to_dict(*parsed), train_args, run_args)


def step0_eval(log_history: list[dict]) -> dict:
    """`before_eval_*` from the evaluation logged at step 0 (`eval_on_start`)."""
    for entry in log_history:
        if entry.get("step") == 0 and any(k.startswith("eval_") for k in entry):
            return {f"before_{k}": v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
    return {}


def train_and_evaluate(trainer, run: StageRun, has_eval: bool, logged_keys: tuple[str, ...] = ("loss",)) -> dict:
    """Held-out metrics before training (`before_*`, fresh runs only), training (resuming when a checkpoint
    exists), the last logged training metrics (`train_*`), held-out metrics after. Writes the result files."""
    launch.prepare_trainer(trainer)  # FSDP2: fp32 outputs and reduction; ZeRO-3: adapter dtype (TRL #6089)
    metrics = {}
    before = has_eval and run.checkpoint is None
    # DeepSpeed and FSDP2 wrap the model when training starts; an evaluate() before train() would prepare it on
    # its own (ZeRO-2 refuses ZeRO inference, ZeRO-3 starts an inference engine that train() then cannot use,
    # FSDP2 needs the optimizer in the same prepare call). Under them the "before" evaluation runs inside
    # train(), at step 0 before the first update (`eval_on_start`), and is read back from the log history.
    in_train = before and launch.wraps_model_at_train(trainer.args)
    if in_train:
        trainer.args.eval_on_start = True
    elif before:
        metrics.update({f"before_{k}": v for k, v in trainer.evaluate().items()})
    clock = run_stats.StepClock()
    trainer.add_callback(clock)
    train_metrics = trainer.train(resume_from_checkpoint=run.checkpoint).metrics
    train_metrics.update(run_stats.summarize(clock, trainer))  # step time, tokens/s, peak GPU memory per process
    if in_train:
        metrics.update(step0_eval(trainer.state.log_history))
    write_results(trainer, "train", train_metrics)
    metrics.update(train_metrics)
    metrics.update(last_logged(trainer, prefix="train_", keys=logged_keys))
    if has_eval:
        eval_metrics = trainer.evaluate()
        write_results(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def finish(trainer, run: StageRun, model_args, *, report, metrics: dict, lineage: dict) -> None:
    """Save the adapter (or model) and tokenizer atomically, the trainer state, and run.json with lineage."""
    out = run.train_args.output_dir
    save_final(trainer, out)
    trainer.save_state()
    if trainer.is_world_process_zero():
        if lineage.get("adapter"):
            launch.check_saved_adapter(out)  # peers have shipped empty adapters from sharded saves
        full_lineage = manifest.base_model_lineage(model_args)
        full_lineage.update(lineage)
        if hasattr(trainer, "align_speedups"):  # what speed.finish applied (`speedups: auto` resolved)
            full_lineage["speedups"] = dict(options=list(trainer.align_speedups),
                                            lean_memory_budget=trainer.align_lean_memory_budget,
                                            offload_gib=getattr(trainer, "align_offload_gib", None),
                                            passes_per_batch=getattr(trainer, "passes_per_batch", 1))
        path = manifest.write_run(
            out, stage=run.name, config=run.resolved, seed=run.train_args.seed, data=report.as_dict(),
            metrics=metrics, lineage=full_lineage, started=run.started,
        )
        print(f"{run.name}: wrote {out} (run manifest {path})")
        forgetting_gate(run)


def forgetting_gate(run: StageRun) -> dict | None:
    """The recipe's forgetting gate: general-suite scores of the saved model against its base, recorded in
    run.json under "forgetting"; `fail` raises `ForgettingError` (after recording) when the drop is too large."""
    args = run.run_args
    if args.forgetting_gate == "off":
        return None
    from align.eval.gate import ForgettingError, run_gate
    from align.paths import REPO_ROOT

    suite = args.forgetting_suite
    if not os.path.isfile(suite) and os.path.isfile(os.path.join(REPO_ROOT, suite)):
        suite = os.path.join(REPO_ROOT, suite)
    out = run.train_args.output_dir
    try:
        result = run_gate(out, None, suite, args.forgetting_threshold, args.forgetting_gate,
                          limit=args.forgetting_limit)
    except ForgettingError as err:
        _record_in_run(out, "forgetting", err.result)
        raise
    _record_in_run(out, "forgetting", result)
    return result


def _record_in_run(output_dir: str, key: str, value) -> None:
    run_json = manifest.read_run(output_dir) or {}
    run_json[key] = value
    manifest.write_json_atomic(os.path.join(output_dir, "run.json"), run_json)
