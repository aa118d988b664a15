"""Recipe loading: typed dataclasses, one YAML file plus `--key value` overrides.

Every stage parses the same way:

    model_args, data_args, train_args = parse_recipe((ModelArguments, DataArguments, SFTConfig))

The key names are TRL's (`ModelConfig`, `ScriptArguments`, `SFTConfig`/`DPOConfig`/...) so recipes from the
alignment-handbook or TRL read the same here; `align` only adds the fields those classes lack. A key that no
dataclass knows is an error that names the key and the file, with the closest known names.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import yaml
from transformers import TrainingArguments
from trl import DPOConfig, ModelConfig, RewardConfig, ScriptArguments, SFTConfig, TrlParser


class ConfigError(ValueError):
    """A recipe or command line that cannot be used as given."""


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` (model, quantization and LoRA keys) plus what it lacks."""

    gguf_file: str | None = field(
        default=None,
        metadata={"help": "GGUF file inside `model_name_or_path` to load (dequantized on load)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to load, when it differs from `model_name_or_path`."}
    )
    lora_bias: str = field(
        default="none",
        metadata={"help": "Which biases LoRA trains.", "choices": ["none", "all", "lora_only"]},
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={"help": "Compute dtype of 4-bit layers; defaults to `dtype` (bfloat16 when `dtype` is float32)."},
    )


@dataclass
class DataArguments(ScriptArguments):
    """TRL's `ScriptArguments` (`dataset_name`, splits) plus the shared data module's settings."""

    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Row format of the dataset; `auto` detects it from the columns.",
            "choices": [
                "auto", "messages", "sharegpt", "alpaca", "prompt_completion", "hh", "gsm8k", "text",
                "preference",
            ],
        },
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate eval file or dataset; otherwise a split of the training data."}
    )
    eval_split_size: float = field(
        default=0.05,
        metadata={"help": "Held-out part of the training rows: a fraction (<1) or a row count (>=1); 0 disables."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows (after the split), for quick runs."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Chat template: a Jinja string, a file path, or `default` for align's documented template. "
            "By default the tokenizer's own template, and align's default where the tokenizer has none."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message prepended to conversations that have none."}
    )


@dataclass
class RunArguments:
    """Settings of an `align` run that are not model, data or trainer keys."""

    sft_adapter: str | None = field(
        default=None, metadata={"help": "Output directory of an earlier stage whose adapter this stage starts from."}
    )
    merge_sft_adapter: bool = field(
        default=False,
        metadata={
            "help": "Preference stages: merge the SFT adapter into the base and train a fresh adapter on the merged "
            "weights (reference: the merged model) instead of training a copy of the SFT adapter (reference: the "
            "SFT adapter). Not with a 4-bit base: merge with align/merge.py first and train on the merged model."
        },
    )
    forgetting_gate: str = field(
        default="off",
        metadata={"help": "After saving, score the model and its base on a quick general suite and `warn` or "
                  "`fail` the run when the average drop exceeds forgetting_threshold.",
                  "choices": ["off", "warn", "fail"]},
    )
    forgetting_threshold: float = field(
        default=0.02, metadata={"help": "Largest allowed average general-suite drop (0.02 = 2 accuracy points)."}
    )
    forgetting_suite: str = field(
        default="recipes/eval/general_quick.yaml", metadata={"help": "Suite YAML of the forgetting gate."}
    )
    forgetting_limit: int | None = field(
        default=None, metadata={"help": "Rows per task for the forgetting gate (default: the suite's own)."}
    )
    stop_on_nonfinite_loss: bool = field(
        default=True, metadata={"help": "Stop with an error when the training loss is NaN or infinite."}
    )
    resume: bool = field(
        default=True, metadata={"help": "Resume from the last `checkpoint-N` in `output_dir` when there is one."}
    )
    speedups: str = field(
        default="auto",
        metadata={"help": "Speed and memory options of sft.py, dpo.py and rm.py (align/speed.py; ppo.py takes none): "
                  "`auto` (default: on one CUDA GPU padding_free, shared_prompt, dense_pairs, ref_first, compile, lean, "
                  "kbit_bf16, fused_lora, torch_nf4, non_blocking, group_lora, head_grad; compile, lean and torch_nf4 "
                  "only without gradient checkpointing and on one process, dense_pairs in DPO only; on a CPU "
                  "padding_free, shared_prompt, ref_first, head_grad), `none`, or a comma list of padding_free (SFT), "
                  "shared_prompt (DPO, RM), dense_pairs (DPO, RM), ref_first (DPO), compile, lean, liger, kbit_bf16, "
                  "fused_lora, torch_nf4, head_grad, non_blocking, group_lora, offload, fp8 (experimental). Each but "
                  "fp8 keeps the loss (CPU tests to 1e-5); measured against stock TRL + PEFT on an H100 and an H200 in "
                  "benchmarks/README.md."},
    )
    lean_memory_budget: float | None = field(
        default=None,
        metadata={"help": "With the `lean` speedup: the fraction (0-1] of a compiled layer's activations the "
                  "partitioner may keep for the backward; the rest is recomputed. Lower saves memory, costs speed. "
                  "Default: 0.5 for sft.py and rm.py (0.58 with fused LoRA as one op), for dpo.py 0.58 in 2 passes "
                  "(`passes_per_batch`, its default with lean) and 0.2 in one (its rows carry prompt, chosen and "
                  "rejected)."},
    )

    offload_gib: float | None = field(
        default=None,
        metadata={"help": "With the `offload` speedup: GiB of the activations each forward saves for its backward "
                  "moved to pinned host memory (the first layers' first) and brought back ahead of their backward. "
                  "Default: 3."},
    )

    passes_per_batch: int | None = field(
        default=None,
        metadata={"help": "sft.py, dpo.py, rm.py: run each training batch through forward and backward in this many "
                  "passes over parts of its examples (SFT samples, DPO / RM pairs), the gradients summed before the "
                  "one optimizer step: the batch's update, schedule and logged steps, with the activations of one "
                  "part at a time (not under DeepSpeed). Default: 2 for dpo.py with the `lean` speedup (the GPU "
                  "`auto`; its lean budget then 0.58), else 1, the whole batch at once."},
    )

    def __post_init__(self):
        if self.passes_per_batch is not None and not self.passes_per_batch >= 1:
            raise ConfigError(f"passes_per_batch: must be >= 1, got {self.passes_per_batch}")
        if self.lean_memory_budget is not None and not 0 < self.lean_memory_budget <= 1:
            raise ConfigError(f"lean_memory_budget: must be in (0, 1], got {self.lean_memory_budget}")
        if self.offload_gib is not None and not self.offload_gib > 0:
            raise ConfigError(f"offload_gib: must be > 0, got {self.offload_gib}")


@dataclass
class SFTArguments(SFTConfig):
    """TRL's `SFTConfig`, with the loss on assistant tokens by default (align builds the labels itself)."""

    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Train on assistant tokens only (each turn's end-of-turn/EOS token included)."},
    )


RewardArguments = RewardConfig  # TRL's keys: max_length, center_rewards_coefficient, ...
DPOArguments = DPOConfig  # TRL's keys as they are: beta, loss_type, label_smoothing, precompute_ref_log_probs, ...


def _known_keys(classes) -> dict[str, type]:
    keys: dict[str, type] = {}
    for cls in classes:
        for f in fields(cls):
            keys.setdefault(f.name, cls)
    return keys


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file not found: {path}")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of key: value, got {type(data).__name__}")
    return data


def check_keys(keys, classes, source: str) -> None:
    """Raise `ConfigError` naming every key that none of `classes` has."""
    known = _known_keys(classes)
    unknown = [k for k in keys if k not in known and k != "env"]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(known), n=3, cutoff=0.6)
            hints.append(f"'{k}'" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} " + ", ".join(hints))


def _cli_keys(argv: list[str]) -> list[str]:
    keys = []
    for tok in argv:
        if tok.startswith("--"):
            keys.append(tok[2:].split("=", 1)[0].replace("-", "_"))
    return keys


def parse_recipe(classes, argv: list[str] | None = None):
    """Parse `--config FILE` plus `--key value` overrides into one instance of each dataclass.

    Values from the command line win over the file. Unknown keys in either are errors that name them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif tok.startswith("--config="):
            config_path = tok.split("=", 1)[1]
    if config_path is not None:
        check_keys(load_yaml(config_path), classes, config_path)
    check_keys([k for k in _cli_keys(argv) if k != "config"], classes, "command line")
    if not _has_accelerator() and any(issubclass(c, TrainingArguments) for c in classes):
        if "use_cpu" not in _cli_keys(argv) and "use_cpu" not in (load_yaml(config_path) if config_path else {}):
            argv += ["--use_cpu", "true"]  # no GPU here: train on the CPU (bf16 then means CPU autocast)
    parser = TrlParser(dataclass_types=list(classes))
    parsed = parser.parse_args_and_config(args=argv)
    # TRL keeps `trust_remote_code` on the trainer config; model loading reads it from the model arguments
    trust = any(getattr(p, "trust_remote_code", False) for p in parsed)
    for p in parsed:
        if isinstance(p, ModelConfig):
            p.trust_remote_code = trust
    return parsed


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def to_dict(*configs) -> dict[str, dict[str, Any]]:
    """Resolved config for run.json: one mapping per dataclass, JSON-safe."""
    out = {}
    for cfg in configs:
        if cfg is None:
            continue
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        out[type(cfg).__name__] = {k: _jsonable(v) for k, v in d.items()}
    return out


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)
