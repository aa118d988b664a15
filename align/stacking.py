"""How a stage's trainable weights are set up on the frozen base: a fresh LoRA adapter from the recipe, a copy of
an earlier stage's adapter (stacking: SFT -> DPO / RM / PPO), or all weights for a full fine-tune."""

from __future__ import annotations

import logging
import os

from peft import PeftModel, get_peft_model

from align import manifest, modeling

logger = logging.getLogger("align")


class AdapterError(ValueError):
    """An adapter directory that cannot be used as asked."""


def check_adapter_dir(path: str) -> str:
    """`path` must hold a PEFT adapter (`adapter_config.json`); returns it as an absolute path."""
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        hint = " (it holds a full model: use it as model_name_or_path instead)" if os.path.isfile(
            os.path.join(path, "config.json")) else ""
        raise AdapterError(f"{path}: no adapter_config.json, so it is not an adapter directory{hint}")
    return os.path.abspath(path)


def attach_trainable_adapter(model, model_args, parent: str | None = None, adapter_name: str = "default"):
    """Return the model with its trainable weights set up.

    - `parent` given: load that adapter as trainable (training continues from it; its files are not touched).
    - `model_args.use_peft`: a fresh LoRA adapter from the recipe's `lora_*` keys.
    - otherwise a full fine-tune: every weight trains.
    """
    if parent is not None:
        path = check_adapter_dir(parent)
        logger.info("starting from the adapter in %s", path)
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=True)
    lora = modeling.lora_config(model_args, model)
    if lora is not None:
        return get_peft_model(model, lora, adapter_name=adapter_name)
    model.requires_grad_(True)
    return model


def parent_lineage(parent: str | None) -> dict | None:
    """What run.json records about the adapter a stage started from: its path, stage and own lineage."""
    if parent is None:
        return None
    run = manifest.read_run(parent) or {}
    return {
        "path": os.path.abspath(parent),
        "stage": run.get("stage"),
        "base_model": (run.get("lineage") or {}).get("base_model"),
        "lineage": run.get("lineage"),
    }
