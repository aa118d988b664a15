"""Multi-GPU launch: which distributed engine a run is under, the settings known to break with adapters on a
frozen base (refused before the model loads, each with its reason and its fix), and a check that the saved
adapter holds trained weights.

    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml align/sft.py --config ...

    launch.check_launch(model_args, train_args)   # after parsing, before loading the model
    ...
    launch.prepare_trainer(trainer)               # after building the trainer, before training
    launch.prepare_final_save(trainer)            # before the final trainer.save_model (all ranks)
    launch.check_saved_adapter(output_dir)        # after saving, on the main process

The engine comes from what `accelerate launch` puts in the environment (ACCELERATE_USE_DEEPSPEED,
ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_USE_FSDP, FSDP_*, WORLD_SIZE) or from the trainer config's own
`deepspeed` / `fsdp` keys. The rules below come from PEFT's DeepSpeed and FSDP guides, bitsandbytes'
FSDP-QLoRA notes, and what TRL and transformers do (or refuse) for these combinations; each message says
which.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

ENGINES = ("none", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")
SHARDED = ("deepspeed_zero3", "fsdp")  # engines that split the frozen base's weights across processes
WRAPPING = ("deepspeed_zero2", "deepspeed_zero3", "fsdp")  # engines that wrap model + optimizer in train()
_FLOAT_DTYPES = ("bfloat16", "float16", "float32")
_MULTI_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_ADAPTER_FILE = "adapter_model.safetensors"


class LaunchConfigError(ValueError):
    """A launch configuration known to break; the message says why and how to fix it."""


class EmptyAdapterError(RuntimeError):
    """A saved adapter that is missing, empty or untrained (say, a sharded save that gathered nothing)."""


# ------------------------------------------------------------------------------------------------------------
# Which engine


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _json_config(value) -> dict | None:
    """A DeepSpeed config given as a dict, a JSON string or a JSON file path; None when it cannot be read."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str) and value.strip().startswith("{"):
        return json.loads(value)
    if isinstance(value, str) and value not in ("", "none") and os.path.isfile(value):
        with open(value) as fh:
            return json.load(fh)
    return None


def deepspeed_settings(train_args=None, env: Mapping | None = None) -> dict | None:
    """{"stage": int, "gather_16bit_on_save": bool} of the DeepSpeed run, or None without DeepSpeed.

    Read from, in this order: the trainer config's DeepSpeed plugin (built by `TrainingArguments` under
    `accelerate launch` or from `deepspeed`), the trainer config's `deepspeed` (dict or JSON file), the
    environment `accelerate launch` sets (a DeepSpeed config file named there, else its ZeRO keys; stage 2 by
    default, as accelerate).
    """
    env = os.environ if env is None else env
    config = None
    plugin = getattr(train_args, "deepspeed_plugin", None)
    if plugin is not None and isinstance(getattr(plugin, "deepspeed_config", None), Mapping):
        config = plugin.deepspeed_config
    elif getattr(train_args, "deepspeed", None):
        config = _json_config(train_args.deepspeed)
    elif _flag(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
        config = _json_config(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none"))
        if config is None:
            config = {"zero_optimization": {
                "stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2)),
                "stage3_gather_16bit_weights_on_model_save": env.get(
                    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false"),
            }}
    if config is None:
        return None
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if not isinstance(stage, int):  # "auto" is not a stage DeepSpeed accepts; take accelerate's value
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    gather = zero.get("stage3_gather_16bit_weights_on_model_save",
                      zero.get("stage3_gather_fp16_weights_on_model_save", False))
    if gather == "auto":  # accelerate fills "auto" from its zero3_save_16bit_model setting
        gather = env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    return {"stage": stage, "gather_16bit_on_save": _flag(gather)}


def fsdp_settings(train_args=None, env: Mapping | None = None) -> dict | None:
    """FSDP settings of the run ({"version", "use_orig_params", "cpu_ram_efficient_loading",
    "activation_checkpointing", "state_dict_type"}), or None without FSDP.

    From the trainer config (`fsdp` with `fsdp_config`, as transformers resolves them into `fsdp_plugin_args`)
    or from the environment `accelerate launch` sets for an FSDP config (FSDP_VERSION defaults to 1 there, as
    in accelerate).
    """
    env = os.environ if env is None else env
    args = getattr(train_args, "fsdp_plugin_args", None)
    if getattr(train_args, "fsdp", None) and isinstance(args, Mapping):
        return {
            "version": int(args.get("fsdp_version", 2)),
            "use_orig_params": _flag(args.get("use_orig_params", True)),
            "cpu_ram_efficient_loading": _flag(args.get("cpu_ram_efficient_loading", False)),
            "activation_checkpointing": _flag(args.get("activation_checkpointing", False)),
            "state_dict_type": str(args.get("state_dict_type", "FULL_STATE_DICT")),
        }
    if _flag(env.get("ACCELERATE_USE_FSDP", "false")):
        return {
            "version": int(env.get("FSDP_VERSION", 1)),
            "use_orig_params": _flag(env.get("FSDP_USE_ORIG_PARAMS", "false")),
            "cpu_ram_efficient_loading": _flag(env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")),
            "activation_checkpointing": _flag(env.get("FSDP_ACTIVATION_CHECKPOINTING", "false")),
            "state_dict_type": env.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"),
        }
    return None


def distributed_engine(train_args=None, env: Mapping | None = None) -> str:
    """"none", "ddp", "deepspeed_zero2", "deepspeed_zero3" or "fsdp".

    DeepSpeed stages 0-2 are reported as "deepspeed_zero2": for adapter training they behave alike (whole
    parameters on every rank; optimizer state and, from stage 2, gradients sharded). Several processes without
    DeepSpeed or FSDP are "ddp".
    """
    env = os.environ if env is None else env
    ds = deepspeed_settings(train_args, env)
    if ds is not None:
        return "deepspeed_zero3" if ds["stage"] == 3 else "deepspeed_zero2"
    if fsdp_settings(train_args, env) is not None:
        return "fsdp"
    world = env.get("WORLD_SIZE")
    if world is None and train_args is not None:
        world = getattr(train_args, "world_size", 1)
    return "ddp" if int(world or 1) > 1 else "none"


def wraps_model_at_train(train_args=None, env: Mapping | None = None) -> bool:
    """True under DeepSpeed and FSDP: they wrap the model together with its optimizer when training starts, so
    the model cannot be evaluated (prepared alone) before `train()`, nor driven by a hand-written loop."""
    return distributed_engine(train_args, env) in WRAPPING


# ------------------------------------------------------------------------------------------------------------
# Settings known to break


def _checkpointing(train_args) -> tuple[bool, dict | None]:
    """(gradient checkpointing on, its kwargs) under transformers' new and old key names."""
    on = getattr(train_args, "activation_checkpointing", None)
    if on is None:
        on = getattr(train_args, "gradient_checkpointing", False)
    kwargs = getattr(train_args, "activation_checkpointing_kwargs", None)
    if kwargs is None:
        kwargs = getattr(train_args, "gradient_checkpointing_kwargs", None)
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    return bool(on), (dict(kwargs) if kwargs is not None else None)


def reentrant_checkpointing(train_args) -> bool:
    """Whether gradient checkpointing runs reentrant as transformers calls it: without kwargs transformers
    passes use_reentrant False; kwargs without the key fall back to torch's default, reentrant."""
    _, kwargs = _checkpointing(train_args)
    kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("every_n_layers", "offload", "selective")}
    if not kwargs:
        return False
    return bool(kwargs.get("use_reentrant", True))


def _device_map(model_args, train_args):
    device_map = getattr(model_args, "device_map", None)
    if device_map is None:
        device_map = (getattr(train_args, "model_init_kwargs", None) or {}).get("device_map")
    return device_map


def _spans_devices(device_map) -> bool:
    if isinstance(device_map, str):
        return device_map in _MULTI_DEVICE_MAPS
    if isinstance(device_map, Mapping):
        return len({str(v) for v in device_map.values()}) > 1
    return False


def _dtype_name(value) -> str | None:
    if value is None:
        return None
    return str(value).replace("torch.", "")


def launch_problems(
    model_args, train_args, *, adapter: bool | None = None, env: Mapping | None = None
) -> list[str]:
    """Every known-broken combination of this model, adapter, trainer config and engine, one message each
    ("<what> because <why>; fix: <what to change>"). Empty when the launch is fine."""
    from align import modeling

    env = os.environ if env is None else env
    engine = distributed_engine(train_args, env)
    adapter = bool(model_args.use_peft) if adapter is None else adapter
    ds = deepspeed_settings(train_args, env)
    fsdp = fsdp_settings(train_args, env)
    problems = []

    # 1. Quantized bases under engines that shard the base.
    if model_args.load_in_8bit and engine in SHARDED:
        problems.append(
            f"an 8-bit base (load_in_8bit) under {engine} because ZeRO-3 and FSDP shard a model by "
            "flattening its weights into floating-point buffers, and LLM.int8 weights (int8 data with "
            "separate scale states) cannot be flattened, sharded or gathered back; fix: use load_in_4bit "
            "with bnb_4bit_quant_storage: bfloat16 (recipes/accelerate/deepspeed_zero3_qlora.yaml or "
            "fsdp_qlora.yaml), or keep 8-bit under DDP or ZeRO-2 (recipes/accelerate/multi_gpu.yaml, "
            "deepspeed_zero2.yaml), where each GPU holds the whole base"
        )
    if model_args.load_in_4bit and engine in SHARDED:
        storage = _dtype_name(model_args.bnb_4bit_quant_storage)
        dtype = _dtype_name(model_args.dtype)
        if storage not in _FLOAT_DTYPES:
            problems.append(
                f"a 4-bit base under {engine} with bnb_4bit_quant_storage {storage or 'unset (uint8)'} "
                "because ZeRO-3 and FSDP shard floating-point tensors only: packed in uint8 the 4-bit "
                "weights are left out of the sharding (every GPU keeps all of them) or break the flattening "
                "of a layer's weights; fix: set bnb_4bit_quant_storage: bfloat16 and dtype: bfloat16 (the "
                "same dtype; PEFT's and bitsandbytes' FSDP/ZeRO-3 QLoRA setup)"
            )
        else:
            if dtype != storage:
                problems.append(
                    f"a 4-bit base under {engine} with bnb_4bit_quant_storage {storage} but dtype "
                    f"{dtype or 'unset'} because the weights that are not quantized (norms, embeddings, "
                    "head) load in `dtype`, and each sharded unit must hold a single dtype (PEFT's guide "
                    f"loads the model with dtype = quant storage); fix: set dtype: {storage}"
                )
            compute = _dtype_name(modeling.compute_dtype(model_args))
            if storage != "float32" and compute != storage:
                problems.append(
                    f"a 4-bit base under {engine} computing in {compute} with {storage} storage because the "
                    "sharded layers run in the storage dtype (transformers sets FSDP's mixed precision to "
                    f"it) while the 4-bit matmuls return {compute}, two 16-bit dtypes in one layer; fix: set "
                    f"bnb_4bit_compute_dtype: {storage} (or bnb_4bit_quant_storage: float32 and dtype: "
                    "float32 for fp32 master weights)"
                )
        if fsdp is not None and fsdp["version"] == 1 and (
            fsdp["use_orig_params"] or not fsdp["cpu_ram_efficient_loading"]
        ):
            problems.append(
                "a 4-bit base under FSDP (version 1) with fsdp_use_orig_params "
                f"{str(fsdp['use_orig_params']).lower()} and fsdp_cpu_ram_efficient_loading "
                f"{str(fsdp['cpu_ram_efficient_loading']).lower()} because FSDP-QLoRA is built and tested "
                "(PEFT's FSDP guide, bitsandbytes' FSDP-QLoRA notes) with the LoRA layers wrapped apart from "
                "the frozen 4-bit base (use_orig_params false) and the base loaded once on the CPU and "
                "broadcast (cpu_ram_efficient_loading with sync_module_states); fix: fsdp_use_orig_params: "
                "false and fsdp_cpu_ram_efficient_loading: true in the accelerate config "
                "(recipes/accelerate/fsdp_qlora.yaml)"
            )

    # 2. Device maps: the engine places the weights.
    device_map = _device_map(model_args, train_args)
    if device_map is not None and engine in ("deepspeed_zero2", "deepspeed_zero3", "fsdp"):
        problems.append(
            f"device_map {device_map!r} under {engine} because DeepSpeed and FSDP place (and shard) the "
            "weights themselves: transformers refuses any device_map under ZeRO-3, and a map over several "
            "GPUs cannot be trained in any distributed mode; fix: remove device_map (align puts a quantized "
            "base on each process's own GPU itself)"
        )
    elif device_map is not None and engine == "ddp" and _spans_devices(device_map):
        problems.append(
            f"device_map {device_map!r} under DDP because each process must hold its whole copy of the model "
            "on its own GPU (accelerate refuses to train a model spread over several devices in a "
            "distributed run); fix: remove device_map, or run one process with the model spread over the "
            "GPUs"
        )
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if engine == "deepspeed_zero3" and quantized and device_map is None:
        auto_map = modeling.kbit_device_map()
        if auto_map is not None:
            problems.append(
                f"the quantized base would load with device_map {auto_map!r} under deepspeed_zero3 because "
                "align's loader (modeling.kbit_device_map) pins quantized weights to the local GPU, and "
                "transformers refuses any device_map under ZeRO-3; fix: modeling.kbit_device_map must return "
                "None under ZeRO-3 (bitsandbytes then places the weights on the current GPU itself)"
            )

    # 3. Gradient checkpointing.
    checkpointing, kwargs = _checkpointing(train_args)
    reentrant = reentrant_checkpointing(train_args)
    if checkpointing and fsdp is not None:
        if fsdp["activation_checkpointing"]:
            problems.append(
                "gradient_checkpointing together with fsdp_activation_checkpointing because they checkpoint "
                "the same layers twice (transformers refuses both at once); fix: keep one: "
                "fsdp_activation_checkpointing: true with gradient_checkpointing: false, or the reverse"
            )
        if adapter and reentrant:
            problems.append(
                "reentrant gradient checkpointing (use_reentrant true) with an adapter under FSDP because "
                "reentrant checkpointing gives gradients only when a checkpointed layer's input requires "
                "grad (the hidden states of a frozen base do not) and recomputes each layer in a nested "
                "backward pass that does not compose reliably with FSDP's per-layer gather and "
                "reduce-scatter hooks; PEFT's FSDP guide trains LoRA with use_reentrant false; fix: "
                "gradient_checkpointing_kwargs: {use_reentrant: false}, or FSDP's own "
                "fsdp_activation_checkpointing: true (non-reentrant) with gradient_checkpointing: false"
            )
    explicit_non_reentrant = (kwargs or {}).get("use_reentrant") is False
    if checkpointing and adapter and engine == "deepspeed_zero3" and explicit_non_reentrant:
        problems.append(
            "use_reentrant false with gradient checkpointing and an adapter under deepspeed_zero3 because "
            "ZeRO-3 has released the frozen base weights again by the time non-reentrant checkpointing "
            "recomputes a layer, so the recomputation sees empty tensors (CheckpointError: 'Recomputed "
            "values ... have different metadata'; TRL issue 2514, which is why TRL's trainers force "
            "use_reentrant true here); fix: gradient_checkpointing_kwargs: {use_reentrant: true}"
        )
    if (checkpointing and reentrant and engine == "ddp"
            and getattr(train_args, "ddp_find_unused_parameters", None) is True):
        problems.append(
            "reentrant gradient checkpointing with ddp_find_unused_parameters true because DDP then marks "
            "the adapter's gradients ready twice, once per recomputation (RuntimeError: 'Expected to mark a "
            "variable ready only once'); fix: ddp_find_unused_parameters: false, or "
            "gradient_checkpointing_kwargs: {use_reentrant: false}"
        )

    # 4. Saving a full fine-tune under ZeRO-3: the weights must be gathered from the shards. (An adapter is
    # gathered either way: the Trainer consolidates a PEFT model's trainable weights without this setting.)
    if engine == "deepspeed_zero3" and not adapter and ds is not None and not ds["gather_16bit_on_save"]:
        problems.append(
            "a full fine-tune under ZeRO-3 without zero3_save_16bit_model because the Trainer can then not "
            "gather the sharded weights when saving and writes no model weights (only DeepSpeed's own "
            "checkpoint, to be converted with zero_to_fp32.py); fix: zero3_save_16bit_model: true in the "
            "accelerate config (recipes/accelerate/deepspeed_zero3.yaml), or "
            "\"stage3_gather_16bit_weights_on_model_save\": true in the DeepSpeed JSON"
        )
    return problems


def check_launch(model_args, train_args, *, adapter: bool | None = None, env: Mapping | None = None) -> None:
    """Raise `LaunchConfigError` for settings known to break under this run's distributed engine.

    Call after parsing the recipe and before loading the model. `adapter` defaults to `model_args.use_peft`;
    pass True when the stage trains an adapter it loads (`--sft_adapter`). `env` defaults to `os.environ`.
    """
    problems = launch_problems(model_args, train_args, adapter=adapter, env=env)
    if problems:
        engine = distributed_engine(train_args, env)
        raise LaunchConfigError(
            f"this launch ({engine}) is known to break:\n" + "\n".join(f"- {p}" for p in problems)
        )


# ------------------------------------------------------------------------------------------------------------
# Trainer set-up and saving


def prepare_trainer(trainer) -> int:
    """Engine settings on the finished trainer, before train() wraps the model: FSDP2's precision policy
    (`fsdp2_precision`), and under ZeRO-3 the adapter dtype (`zero3_adapter_dtype`). Returns the number of
    adapter tensors cast."""
    fsdp2_precision(trainer)
    return zero3_adapter_dtype(trainer)


def fsdp2_precision(trainer) -> bool:
    """Under FSDP2 with bf16 mixed precision, keep the model's outputs and the gradient reduction in fp32.

    accelerate builds FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16, output_dtype=bf16)`
    (1.16 leaves `output_dtype=None`; a user's fsdp config may still set it). `output_dtype` casts the root module's outputs, and with TRL's fused LM head those are the per-token
    log-probabilities (computed in fp32): rounded to bf16 (steps of 0.06 near -12), summed over a completion
    and subtracted policy minus reference, they bury the DPO signal (on 2 H200s, DPO losses under FSDP2 differed
    by up to 0.073 from the one-GPU run, under DDP by 0.013). The policy here is the same with `output_dtype=None` (outputs keep
    the dtype they were computed in) and `reduce_dtype=fp32` (what DDP reduces: the fp32 adapter gradients; an
    adapter's gradients are small, so the cost is small). Returns True when the policy was changed."""
    import torch

    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2 or policy is None:
        return False
    if policy.output_dtype is None and policy.reduce_dtype in (None, torch.float32):
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=None,
        cast_forward_inputs=policy.cast_forward_inputs)
    return True


def zero3_adapter_dtype(trainer) -> int:
    """Under DeepSpeed ZeRO-3, give every adapter weight the dtype of the base (bf16 for a bf16 base or a
    4-bit base with bf16 storage). Returns the number of tensors cast (0 under other engines or with an fp32
    base).

    PEFT keeps LoRA weights in fp32 on a bf16 base; with several GPUs ZeRO-3 gathers its small persistent
    parameters (LoRA A/B, norms) into one buffer of the first one's dtype and fails on the mix at the first
    optimizer step (TRL issue 6089, DeepSpeed issue 8072; TRL builds its own adapters with
    `autocast_adapter_dtype=False` for this reason). align builds the adapter itself, and DPO adds a frozen
    "ref" copy, so the cast is done here on the finished trainer model. DeepSpeed keeps fp32 master weights of
    the trainable ones in its optimizer: on one H100 the first four losses with and without the cast differed
    by at most 8e-3 (of 11), the bf16 rounding of the LoRA weights in the forward pass.
    """
    import torch

    from align.modeling import is_adapter_parameter

    if distributed_engine(trainer.args) != "deepspeed_zero3":
        return 0
    counts: dict[torch.dtype, int] = {}
    for name, p in trainer.model.named_parameters():
        if not is_adapter_parameter(name) and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return 0
    base_dtype = max(counts, key=counts.get)
    if base_dtype == torch.float32:
        return 0
    cast = 0
    for name, p in trainer.model.named_parameters():
        if is_adapter_parameter(name) and p.is_floating_point() and p.dtype != base_dtype:
            p.data = p.data.to(base_dtype)
            cast += 1
    return cast


def prepare_final_save(trainer) -> None:
    """Under FSDP, switch to a full state dict before the final save (call on every rank).

    With SHARDED_STATE_DICT (the fast choice for checkpoints) `Trainer.save_model` writes no weights at all,
    so the final adapter would be missing; with FULL_STATE_DICT the adapter is gathered on the main process
    and saved as an ordinary `adapter_model.safetensors` (what PEFT's FSDP guide and the alignment-handbook
    scripts do).
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")


def check_saved_adapter(output_dir: str, *, trained: bool = True) -> dict[str, int]:
    """Check the adapter saved in `output_dir` and return {"tensors": n, "parameters": m}.

    Raise `EmptyAdapterError` when adapter_config.json or adapter_model.safetensors is missing, the file holds
    no tensors, a tensor has no elements (a shard saved without gathering, as from ZeRO-3), a value is NaN or
    infinite, or, when `trained`, a LoRA B matrix is all zero (B starts at zero, so an all-zero B means the
    training never reached the saved weights).
    """
    from safetensors import safe_open

    path = os.path.join(output_dir, _ADAPTER_FILE)
    for needed in ("adapter_config.json", _ADAPTER_FILE):
        if not os.path.isfile(os.path.join(output_dir, needed)):
            raise EmptyAdapterError(
                f"{output_dir}: no {needed} was saved (under FSDP with SHARDED_STATE_DICT the Trainer writes "
                "no weights unless the final save switches to FULL_STATE_DICT: "
                "align.launch.prepare_final_save)"
            )
    empty, nonfinite, zero_b = [], [], []
    n_tensors = n_params = 0
    with safe_open(path, framework="pt") as fh:
        names = fh.keys()  # safe_open is not iterable
        for key in names:
            tensor = fh.get_tensor(key)
            n_tensors += 1
            n_params += tensor.numel()
            if tensor.numel() == 0:
                empty.append(key)
                continue
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                nonfinite.append(key)
            if ("lora_B" in key or "lora_embedding_B" in key) and not bool(tensor.any()):
                zero_b.append(key)
    if n_tensors == 0:
        raise EmptyAdapterError(
            f"{path} holds no tensors: the adapter was not gathered from the shards on save (seen with FSDP "
            "version 1 and a 4-bit base: use recipes/accelerate/fsdp_qlora.yaml, FSDP2)"
        )
    if empty:
        raise EmptyAdapterError(
            f"{path}: {len(empty)} of {n_tensors} tensors have no elements ({', '.join(empty[:3])}...): this "
            "process's empty ZeRO-3 shards were saved instead of the gathered weights"
        )
    if nonfinite:
        raise EmptyAdapterError(f"{path}: NaN or infinite values in {', '.join(nonfinite[:3])}")
    if trained and zero_b:
        raise EmptyAdapterError(
            f"{path}: {len(zero_b)} LoRA B matrices are all zero ({', '.join(zero_b[:3])}): LoRA B starts at "
            "zero, so the saved adapter is the untrained initialisation (the trained weights were not "
            "gathered, or training never updated them)"
        )
    return {"tensors": n_tensors, "parameters": n_params}
