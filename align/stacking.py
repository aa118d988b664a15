"""How a stage's trainable weights are set up on the frozen base: a fresh LoRA adapter from the recipe, a copy of
an earlier stage's adapter (stacking: SFT -> DPO / RM / PPO), or all weights for a full fine-tune."""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from peft import PeftModel, get_peft_model

from align import fused_lora, manifest, modeling

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


def adapter_base(adapter_dir: str) -> str | None:
    with open(os.path.join(check_adapter_dir(adapter_dir), "adapter_config.json")) as fh:
        return json.load(fh).get("base_model_name_or_path")


def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if os.path.isdir(a) or os.path.isdir(b):
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b


def check_same_base(adapter_dir: str, model_args) -> None:
    """The stage's base must be the one the parent adapter was trained on (filled in when the recipe has none)."""
    base = adapter_base(adapter_dir)
    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = base
        return
    if base is not None and not _same_model(base, model_args.model_name_or_path):
        raise AdapterError(
            f"{adapter_dir} was trained on {base}, but this recipe loads {model_args.model_name_or_path}; "
            "set model_name_or_path to the adapter's base"
        )


def policy_for_preference_training(model, model_args, run_args):
    """Set up the trainable policy on the frozen base and say what the reference is.

    Returns `(model, reference)` where `reference` is one of:
    - "sft_adapter": the policy is a trainable copy of the SFT adapter; the reference is the SFT adapter itself,
      frozen (TRL's DPOTrainer adds it as adapter "ref"; `check_reference` verifies it).
    - "merged_sft": the SFT adapter was merged into the base; a fresh adapter trains; the reference is the merged
      model with the adapter switched off.
    - "base": no SFT adapter; a fresh adapter trains; the reference is the base with the adapter switched off.
    """
    sft = run_args.sft_adapter
    if sft is not None and run_args.merge_sft_adapter:
        if model_args.load_in_4bit or model_args.load_in_8bit:
            raise AdapterError(
                "merge_sft_adapter with a quantized base would merge into rounded weights: merge with "
                "`python align/merge.py` first and use the merged model as model_name_or_path"
            )
        merged = PeftModel.from_pretrained(model, check_adapter_dir(sft)).merge_and_unload()
        if not model_args.use_peft:
            raise AdapterError("merge_sft_adapter trains a fresh adapter: set use_peft: true")
        return attach_trainable_adapter(merged, model_args), "merged_sft"
    if sft is not None:
        return attach_trainable_adapter(model, model_args, parent=sft), "sft_adapter"
    if not model_args.use_peft:
        raise AdapterError("align's preference stages train adapters: set use_peft: true (or give --sft_adapter)")
    return attach_trainable_adapter(model, model_args), "base"


def match_reference_to_policy(model, reference: str) -> int:
    """Give TRL's frozen "ref" adapter the dtype of the trainable policy it was copied from. Returns the number
    of tensors changed.

    TRL copies the SFT adapter into "ref" and then, for a quantized base, casts the trainable adapter to bf16
    (QLoRA paper recipe) but not the copy: the reference kept fp32 weights while the policy computed with their
    bf16 rounding, so policy and reference differed at step 0 (CPU, fp32 compute: DPO loss 0.6925 instead of
    log 2 = 0.6931, margins 1.3e-3). The reference must be the policy's starting point exactly.
    """
    if reference != "sft_adapter":
        return 0
    changed = 0
    for _, ref, policy in _reference_pairs(model):
        if ref.dtype != policy.dtype:
            ref.data = policy.data.detach().clone()
            changed += 1
    return changed


def _reference_pairs(model):
    """(name, reference weight, policy weight) for every weight of TRL's "ref" adapter."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if ".ref." in name:
            yield name, p, params[name.replace(".ref.", ".default.")]


def check_reference(model, reference: str) -> None:
    """Fail before training if the reference is not what `policy_for_preference_training` promised."""
    if reference != "sft_adapter":
        return
    if "ref" not in getattr(model, "peft_config", {}):
        raise AdapterError("the SFT reference adapter is missing: the reference would be the bare base")
    for name, p, policy in _reference_pairs(model):
        if p.requires_grad or p.dtype != policy.dtype or not torch.equal(p, policy):
            raise AdapterError(f"reference adapter weight {name} is trainable or differs from the SFT adapter "
                               f"(reference {p.dtype}, policy {policy.dtype})")


def remove_saved_reference(output_dir: str) -> None:
    """PEFT saves every adapter of a model; the frozen reference ("ref", a copy of the parent adapter, which is
    already on disk) is not part of this stage's output, so its folder is removed after saving."""
    import shutil

    ref = os.path.join(output_dir, "ref")
    if os.path.isfile(os.path.join(ref, "adapter_config.json")):
        shutil.rmtree(ref)


class AdapterSwitch:
    """A PEFT model's LoRA layers, found once, switched to one adapter for the forwards of a `with switch.use(name):`
    block (`None`: adapters off, the base), and put back after.

    PEFT's `set_adapter` / `disable_adapter` give the same forwards, but walk every module of the model on the way
    in and out (~1,300 on a 16-layer LoRA model) and re-flag `requires_grad` on every adapter weight (the adapter
    switched to trainable, the others frozen), which DPO's no-grad reference ignores and PPO's roles undo with two
    more walks. Here the flags are left as they are. `for_model` returns None where the switch does not apply (not
    a PEFT model, a non-LoRA tuner, merged adapters, auxiliary trained modules such as `modules_to_save`): PEFT's
    own calls then."""

    def __init__(self, peft_model, layers):
        self.peft_model, self.layers = peft_model, layers

    @classmethod
    def for_model(cls, model) -> AdapterSwitch | None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper

        if not isinstance(model, PeftModel):
            return None
        layers = []
        for module in model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                return None
            if isinstance(module, BaseTunerLayer):
                if not isinstance(module, LoraLayer) or module.merged:
                    return None
                layers.append(module)
        return cls(model, layers) if layers else None

    def can_stand_in(self, adapter: str | None) -> bool:
        """Whether the active adapter (the policy's) can carry `adapter`'s weights, or the base's for None (B = 0),
        through its own forward (`stand_in`): one active adapter, no variant (DoRA's magnitude makes B = 0 another
        weight than the base's), and in every layer that has it, `adapter` with the same shapes, dtypes and scaling.
        A dropout is no obstacle: with B = 0 the dropped LoRA input meets a zero product, and TRL's "ref" adapter
        drops its input as the policy's does (its masks draw from the random stream, which the base reference of a
        plain forward does not)."""
        active = self.peft_model.active_adapter
        if not isinstance(active, str) or (adapter is not None and adapter not in self.peft_model.peft_config):
            return False
        for layer in self.layers:
            if active not in layer.lora_A:
                continue  # the base in this layer either way
            if active in layer.lora_variant:
                return False
            if adapter is None:
                continue
            if adapter not in layer.lora_A or layer.scaling[adapter] != layer.scaling[active]:
                return False
            for mine, theirs in ((layer.lora_A[active], layer.lora_A[adapter]),
                                 (layer.lora_B[active], layer.lora_B[adapter])):
                if (mine.weight.shape != theirs.weight.shape or mine.weight.dtype != theirs.weight.dtype
                        or (mine.bias is None) != (theirs.bias is None)):
                    return False
        return True

    @contextlib.contextmanager
    def stand_in(self, adapter: str | None):
        """The active adapter carries `adapter`'s weights (None: the base's, B = 0) for the block: the reference's
        forward through the policy's own code and, under `torch.compile`, the policy's own compiled graph. The
        parameters stay the same objects (their `.data` is swapped and put back after), so a compiled layer runs
        the graph it has for them; with B = 0 its fused LoRA ops skip their zero products (`fused_lora.zero_b`).
        Check `can_stand_in` first."""
        active = self.peft_model.active_adapter
        saved = []
        for layer in self.layers:
            if active not in layer.lora_A:
                continue
            mine = [layer.lora_A[active], layer.lora_B[active]]
            params = [p for m in mine for p in (m.weight, m.bias) if p is not None]
            saved.extend((p, p.data) for p in params)
            if adapter is None:
                for p in mine[1].weight, mine[1].bias:
                    if p is not None:
                        p.data = torch.zeros_like(p.data)
            else:
                theirs = [layer.lora_A[adapter], layer.lora_B[adapter]]
                for m, t in zip(mine, theirs):
                    m.weight.data = t.weight.data
                    if m.bias is not None:
                        m.bias.data = t.bias.data
        try:
            with fused_lora.zero_b() if adapter is None else contextlib.nullcontext():
                yield self
        finally:
            for p, data in saved:
                p.data = data

    @contextlib.contextmanager
    def use(self, adapter: str | None):
        """As PEFT's `set_adapter(adapter)` (a layer without that adapter runs its base layer alone) or, for None,
        `disable_adapter()`, for the block."""
        if adapter is not None and adapter not in self.peft_model.peft_config:
            raise ValueError(f"no adapter {adapter!r}; the model has {sorted(self.peft_model.peft_config)}")
        named = (self.peft_model, self.peft_model.base_model)  # both keep the active adapter's name
        saved = [(layer._active_adapter, layer._disable_adapters) for layer in self.layers]
        saved_names = [m.active_adapter for m in named]
        for layer in self.layers:
            if adapter is None:
                layer._disable_adapters = True
            else:
                layer._active_adapter = [adapter]
        if adapter is not None:
            for m in named:
                m.active_adapter = adapter
        try:
            yield self
        finally:
            for layer, (active, disabled) in zip(self.layers, saved):
                layer._active_adapter, layer._disable_adapters = active, disabled
            for m, name in zip(named, saved_names):
                m.active_adapter = name
