"""Base model and tokenizer loading (bf16 / fp32 / 4-bit NF4 / 8-bit; local dirs, hub names, GGUF files) and the
LoRA configuration of each model family."""

from __future__ import annotations

import logging
import os

import torch
import transformers
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from align.paths import SMOLLM2_DIR

logger = logging.getLogger("align")

_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _ATTN_MLP,
    "mistral": _ATTN_MLP,
    "qwen2": _ATTN_MLP,
    "gemma2": _ATTN_MLP,
    "gemma": _ATTN_MLP,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def quantization_config(model_args) -> BitsAndBytesConfig | None:
    """4-bit NF4 (QLoRA, optional double quantization) or 8-bit, from the recipe's `load_in_*` keys."""
    if model_args.load_in_4bit:
        compute = model_args.bnb_4bit_compute_dtype or model_args.dtype
        if compute in (None, "auto", "float32"):
            compute = "bfloat16"
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=torch_dtype(compute),
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _check_local(path: str | None) -> None:
    """A path that names a local directory must exist (a hub name is left to transformers)."""
    if path is None:
        raise ValueError("model_name_or_path is not set")
    if path.startswith((".", "/", "~")) and not os.path.exists(path):
        hint = ""
        if os.path.abspath(path) == os.path.abspath(SMOLLM2_DIR) or "SmolLM2" in path:
            hint = " Run `make smollm2` to convert SmolLM2-135M-Instruct."
        raise FileNotFoundError(f"model directory {path} does not exist.{hint}")


def load_tokenizer(model_args):
    """Tokenizer of the model (or `tokenizer_name_or_path`), with a pad token and right padding."""
    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    _check_local(name)
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=getattr(model_args, "trust_remote_code", False))
    if model_args.gguf_file and name == model_args.model_name_or_path:
        kwargs["gguf_file"] = model_args.gguf_file
    tok = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _device_map():
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_model(model_args, *, task: str = "causal_lm", num_labels: int = 1, training: bool = True):
    """The base model, frozen-ready: causal LM or sequence classification (`task="seq_cls"`, a score head)."""
    _check_local(model_args.model_name_or_path)
    quant = quantization_config(model_args)
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(model_args, "trust_remote_code", False),
        dtype=torch_dtype(model_args.dtype),
    )
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.gguf_file:
        kwargs["gguf_file"] = model_args.gguf_file
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = _device_map()
    if task == "seq_cls":
        auto = transformers.AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
    elif task == "causal_lm":
        auto = transformers.AutoModelForCausalLM
    else:
        raise ValueError(f"unknown task {task!r}: causal_lm or seq_cls")
    model = auto.from_pretrained(model_args.model_name_or_path, **kwargs)
    if task == "seq_cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if quant is not None and training:
        # casts norms to fp32 and freezes the base; checkpointing is the trainer's job (gradient_checkpointing key)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_cpu_4bit_trainable(model)
    return model


def _keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval-mode forward; a training step after
    that (eval during training) then fails on layers with a bias. Keep the training layout on CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(model_args, model) -> LoraConfig | None:
    """The recipe's LoRA settings, with the family's default target modules; None when `use_peft` is false."""
    if not model_args.use_peft:
        return None
    targets = model_args.lora_target_modules
    if not targets:
        targets = DEFAULT_TARGET_MODULES.get(model.config.model_type, "all-linear")
    kwargs = {}
    if model_args.lora_target_parameters:
        kwargs["target_parameters"] = model_args.lora_target_parameters
    modules_to_save = model_args.lora_modules_to_save
    if model_args.lora_task_type == "SEQ_CLS":
        modules_to_save = sorted(set(modules_to_save or []) | {"score"})
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        bias=model_args.lora_bias,
        modules_to_save=modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        **kwargs,
    )


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
