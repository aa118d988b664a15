"""Base model and tokenizer loading (bf16 / fp32 / 4-bit NF4 / 8-bit; local dirs, hub names, GGUF files) and the
LoRA configuration of each model family.

    model_args = ModelArguments(model_name_or_path=..., load_in_4bit=True, use_peft=True)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args)                  # frozen base, ready for an adapter
    peft_model = get_peft_model(model, lora_config(model_args, model))
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch
import transformers
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig
from trl import get_quantization_config

from align.paths import SMOLLM2_DIR

logger = logging.getLogger("align")

_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _ATTN_MLP,
    "mistral": _ATTN_MLP,
    "qwen2": _ATTN_MLP,
    "gemma2": _ATTN_MLP,
    "gemma": _ATTN_MLP,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused projections
}
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every nn.Linear except the output head

# Parameter-name pieces that mark adapter weights (LoRA A/B, DoRA magnitudes, trainable copies of whole modules).
_ADAPTER_MARKERS = ("lora_", "modules_to_save.")
_DTYPES = ("bfloat16", "float16", "float32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    """"auto"/None -> "auto"; "bfloat16" / torch.bfloat16 -> torch.bfloat16."""
    if name in (None, "auto"):
        return "auto"
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(_DTYPES)}")
    return getattr(torch, name)


def compute_dtype(model_args) -> torch.dtype:
    """Compute dtype of 4-bit layers: `bnb_4bit_compute_dtype`, else `dtype`; bfloat16 when that is float32/auto
    (4-bit matmuls in fp32 are slow and gain nothing over bf16 on the rounded weights)."""
    name = model_args.bnb_4bit_compute_dtype or model_args.dtype
    if model_args.bnb_4bit_compute_dtype is None and name in (None, "auto", "float32"):
        name = "bfloat16"
    return torch_dtype(name)


def quantization_config(model_args) -> BitsAndBytesConfig | None:
    """bitsandbytes settings from the recipe's `load_in_*` keys, or None for an unquantized base.

    4-bit: `bnb_4bit_quant_type` (nf4 by default), double quantization from `use_bnb_nested_quant`, compute dtype
    from `compute_dtype`, storage dtype from `bnb_4bit_quant_storage` (a float storage such as bfloat16 is what
    FSDP / ZeRO-3 QLoRA shard). 8-bit: LLM.int8(). This is TRL's `get_quantization_config` with the compute dtype
    fixed (TRL passes `dtype` through, which breaks for "auto").
    """
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are exclusive: choose one")
    quant = get_quantization_config(_with_dtype(model_args, "bfloat16")) if model_args.load_in_4bit else (
        get_quantization_config(model_args))
    if quant is not None and model_args.load_in_4bit:
        quant.bnb_4bit_compute_dtype = compute_dtype(model_args)
    return quant


def _with_dtype(model_args, dtype: str):
    """A shallow copy of `model_args` with another `dtype` (TRL's helper reads the compute dtype from it)."""
    import copy

    args = copy.copy(model_args)
    args.dtype = dtype
    return args


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`, whose first part is not a local directory (so `runs/x` is a path, not a repo)."""
    if not _HUB_ID.match(name) or name.startswith("."):
        return False
    return not os.path.isdir(name.split("/")[0]) if "/" in name else True


def check_model_path(path: str | None, what: str = "model") -> None:
    """Raise FileNotFoundError for a local path that does not exist; hub names are left to transformers.

    The SmolLM2 cache path gets a hint: it is created by `make smollm2` (`python -m align.convert smollm2`).
    """
    if not path:
        raise ValueError(f"{what}_name_or_path is not set")
    if os.path.exists(os.path.expanduser(path)) or _looks_like_hub_id(path):
        return
    hint = ""
    if os.path.abspath(os.path.expanduser(path)) == os.path.abspath(SMOLLM2_DIR) or "SmolLM2" in os.path.basename(
        os.path.normpath(path)
    ):
        hint = " Run `make smollm2` (python -m align.convert smollm2) to convert SmolLM2-135M-Instruct there."
    raise FileNotFoundError(f"{what} directory {path} does not exist.{hint}")


def load_tokenizer(model_args):
    """Tokenizer of the model (or of `tokenizer_name_or_path`), with a pad token (EOS when missing) and right
    padding (training and log-prob scoring; generation code switches to left padding itself)."""
    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    check_model_path(name, "tokenizer" if model_args.tokenizer_name_or_path else "model")
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": getattr(model_args, "trust_remote_code", False)}
    if model_args.gguf_file and name == model_args.model_name_or_path:
        kwargs["gguf_file"] = model_args.gguf_file
    tok = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def kbit_device_map() -> dict[str, int | str] | None:
    """Quantized weights must sit on this process's accelerator: `{"": local_process_index}`; None on CPU."""
    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        from accelerate import PartialState

        from align.launch import distributed_engine

        if distributed_engine() == "deepspeed_zero3":
            return None  # transformers refuses any device_map under ZeRO-3; bitsandbytes places the weights

        return {"": PartialState().local_process_index}
    return None


def _auto_class(task: str):
    if task == "causal_lm":
        return transformers.AutoModelForCausalLM
    if task == "seq_cls":
        return transformers.AutoModelForSequenceClassification
    raise ValueError(f"unknown task {task!r}: causal_lm or seq_cls")


def base_load_kwargs(model_args, *, device: str | None = None) -> dict:
    """`from_pretrained` keyword arguments for the base `model_args` describe: revision, trust_remote_code and
    dtype (`torch_dtype`); attn_implementation and gguf_file when set; for a 4-/8-bit base its bitsandbytes config
    (`quantization_config`) and a device map for the quantized weights: `kbit_device_map()` (this process's
    accelerator) when `device` is None, else `{"": device}`, none for "cpu"."""
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": getattr(model_args, "trust_remote_code", False),
        "dtype": torch_dtype(model_args.dtype),
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.gguf_file:
        kwargs["gguf_file"] = model_args.gguf_file
    quant = quantization_config(model_args)
    if quant is not None:
        kwargs["quantization_config"] = quant
        device_map = kbit_device_map() if device is None else (None if device == "cpu" else {"": device})
        if device_map is not None:
            kwargs["device_map"] = device_map
    return kwargs


def load_pretrained(model_args, *, task: str = "causal_lm", num_labels: int = 1, device: str | None = None):
    """(model, loading info): the base `model_args` describe, loaded with `base_load_kwargs` (`device` places
    quantized weights, see there) as a causal LM or a sequence classifier (`task="seq_cls"`, `num_labels` outputs).

    A sequence classifier without a pad token id gets the EOS id; 4-bit layers keep the portable CPU layout
    (`keep_cpu_4bit_unpacked`). Nothing is frozen or cast: that is the caller's choice.
    """
    check_model_path(model_args.model_name_or_path)
    kwargs = base_load_kwargs(model_args, device=device)
    auto = _auto_class(task)
    if task == "seq_cls":
        kwargs["num_labels"] = num_labels
    model, info = auto.from_pretrained(model_args.model_name_or_path, output_loading_info=True, **kwargs)
    if task == "seq_cls" and model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    if "quantization_config" in kwargs:
        keep_cpu_4bit_unpacked(model)
    return model, info


def load_model(model_args, *, task: str = "causal_lm", num_labels: int = 1, training: bool = True,
               head_seed: int | None = None):
    """The base model: causal LM, or sequence classification (`task="seq_cls"`: a `num_labels` score head).

    Dtype from `model_args.dtype`; bitsandbytes 4-/8-bit when `load_in_4bit`/`load_in_8bit` (placed on the local
    accelerator; on CPU no device map); `gguf_file` dequantizes a GGUF on load (`base_load_kwargs`).

    A quantized base loaded for training goes through `prepare_for_kbit_training`: frozen, with the small
    non-quantized weights (norms, embeddings, head) in fp32. Gradient checkpointing is not switched on here: the
    trainer config's `gradient_checkpointing` key owns it (TRL adds the input-grad hook it needs).

    `head_seed`: a score head missing from the checkpoint (a causal LM loaded for sequence classification) is
    drawn from this seed alone (`init_new_head`), so one seed gives one reward model under every launch engine.
    """
    model, info = load_pretrained(model_args, task=task, num_labels=num_labels)
    if head_seed is not None:
        init_new_head(model, info.get("missing_keys") or (), head_seed)
    quant = quantization_config(model_args)
    if quant is not None and training:
        model = prepare_for_kbit_training(model, quant)
    return model


def init_new_head(model, missing_keys, seed: int) -> list[str]:
    """Draw the newly initialized weights of `missing_keys` (a score head) from N(0, initializer_range) with a
    generator seeded by `seed` only; biases to zero. Returns the names set.

    transformers draws missing weights from the global RNG, and under DeepSpeed ZeRO-3 inside `zero.Init` on
    partitioned tensors: the same seed gave another head there (H100 launch matrix: step-0 eval loss 0.866 under
    ZeRO-3 against 0.772 under every other engine). A ZeRO-3 partitioned weight is gathered, set on rank 0 and
    re-partitioned."""
    std = getattr(model.config, "initializer_range", 0.02)
    params = dict(model.named_parameters())
    done = []
    for name in sorted(missing_keys):
        param = params.get(name)
        if param is None or not param.is_floating_point():
            continue
        with _gathered(param):
            shape = tuple(getattr(param, "ds_shape", param.shape))
            if name.endswith("bias"):
                value = torch.zeros(shape)
            else:
                generator = torch.Generator().manual_seed(seed)
                value = torch.randn(shape, generator=generator) * std
            if param.numel():
                with torch.no_grad():
                    param.copy_(value.to(param.dtype))
        done.append(name)
    return done


def _gathered(param):
    """DeepSpeed's GatheredParameters for a ZeRO-3 partitioned parameter (modified on rank 0), else a no-op."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def prepare_for_kbit_training(model, quant: BitsAndBytesConfig):
    """PEFT's `prepare_model_for_kbit_training` without gradient checkpointing (the trainer's job), guarded.

    PEFT freezes every weight and casts the fp16/bf16 weights that are not 4-bit (norms, embeddings, head) to
    fp32: stabler training at the cost of fp32 copies of the embedding and head. That cast breaks sharded QLoRA
    (FSDP / ZeRO-3 with a float `bnb_4bit_quant_storage`), where every weight must keep one dtype to be flattened
    into shards, so with a float storage dtype the base is only frozen. The 4-bit weights themselves are never
    cast (PEFT skips `Params4bit`), and LoRA layers run in the input dtype, so the fp32 norms do not leak fp32
    into the quantized matmuls (bitsandbytes casts inputs to the compute dtype).
    """
    storage = getattr(quant, "bnb_4bit_quant_storage", None) if quant.load_in_4bit else None
    if isinstance(storage, torch.dtype) and storage.is_floating_point:
        model.requires_grad_(False)
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_cpu_4bit_unpacked(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into a CPU GEMM layout on its first
    eval-mode forward without grad. A training step after that (eval during training) fails on layers with a bias,
    the repacked kernel rounds differently from the training path, and dequantizing a repacked weight is wrong.
    Keep the portable layout, the one training uses, everywhere."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(model_args, model) -> LoraConfig | None:
    """The recipe's LoRA settings, with the family's default target modules; None when `use_peft` is false.

    Targets: `lora_target_modules` when set (a list, or "all-linear"), else `DEFAULT_TARGET_MODULES` for the
    model type, else "all-linear". A sequence-classification adapter also trains (and saves) the `score` head.
    """
    if not model_args.use_peft:
        return None
    targets = model_args.lora_target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == ALL_LINEAR:
        targets = ALL_LINEAR
    if not targets:
        targets = DEFAULT_TARGET_MODULES.get(getattr(model.config, "model_type", None), ALL_LINEAR)
    kwargs = {}
    if getattr(model_args, "lora_target_parameters", None):
        kwargs["target_parameters"] = model_args.lora_target_parameters
    modules_to_save = model_args.lora_modules_to_save
    if model_args.lora_task_type == "SEQ_CLS":
        modules_to_save = sorted(set(modules_to_save or []) | {"score"})
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
        bias=model_args.lora_bias,
        modules_to_save=modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        **kwargs,
    )


def count_parameters(model) -> dict[str, int]:
    """{"total": all parameters, "trainable": those with requires_grad}. A 4-bit weight counts its packed
    storage elements (two 4-bit values per uint8), as `model.parameters()` reports it."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def is_adapter_parameter(name: str) -> bool:
    """True for adapter weights: LoRA A/B, DoRA magnitudes, trainable `modules_to_save` copies."""
    return any(marker in name for marker in _ADAPTER_MARKERS)


def base_parameters_snapshot(model) -> dict[str, torch.Tensor]:
    """Detached CPU clones of every non-adapter parameter (4-bit weights as their packed storage), by name.

    Compare two snapshots with `torch.equal` to check that training left the frozen base untouched.
    """
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if not is_adapter_parameter(name)
    }
