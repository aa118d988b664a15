"""The four PPO roles on one frozen base, as PEFT adapters switched per forward pass.

    role       weights on the shared base                                                   trains
    policy     adapter "policy": a copy of the SFT adapter (a fresh LoRA adapter without one)    yes
    reference  adapter "reference": the SFT adapter (the base, adapters off, without one)        no
    reward     adapter "reward": the reward model's LoRA weights, plus its score head            no
    value      adapter "value": the reward adapter or the SFT adapter, plus a value head         yes

The reward model of align/rm.py is a sequence-classification model: LoRA on the transformer and a `score` head
(Linear hidden -> 1) saved with the adapter (`modules_to_save`). The transformer is `model.model` in both the
sequence-classification and the causal-LM class, so its LoRA weights load onto the causal-LM base unchanged, as
adapter "reward"; the score head is applied here to the hidden state of the last non-pad token, the token
`AutoModelForSequenceClassification` scores. The value model is saved in the same format (`value/`), so a value
adapter loads like a reward adapter.

Roles are switched on the adapter layers found once (`stacking.AdapterSwitch`), which leaves `requires_grad` alone, so
the trainable set (policy, value, value head) never changes; where that switch does not apply, PEFT's `set_adapter`
marks the active adapter trainable and the others frozen, and `SharedBaseRoles.role` undoes that.
"""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import contextmanager

import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import save_file
from torch import nn

from align import modeling, stacking

POLICY, REFERENCE, REWARD, VALUE = "policy", "reference", "reward", "value"
SCORE_PREFIX = "base_model.model.score."  # where a sequence-classification adapter keeps its head


class SharedBaseRoles(nn.Module):
    """One PEFT model with the role adapters, the value head and (with a reward adapter) the reward head.

    `forward` is the training pass (the one accelerate/DDP wraps): policy logits and values at the positions that
    predict the response tokens. The other passes (reference, reward, generation) run on the unwrapped module.
    """

    def __init__(self, model: PeftModel, value_head: nn.Linear, reward_head: nn.Linear | None,
                 reference_adapter: bool):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.reward_head = reward_head
        self.reference = REFERENCE if reference_adapter else None  # None: the base with adapters switched off
        self.trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        self.switch = stacking.AdapterSwitch.for_model(model)  # None: PEFT's own switch (see `role`)

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        return (self.logits(POLICY, input_ids, attention_mask, position_ids, response_length),
                self.values(input_ids, attention_mask, position_ids, response_length))

    def place(self, device, quantized: bool) -> SharedBaseRoles:
        """Move to `device`; a quantized base was placed when it was loaded, so then only the heads move."""
        if not quantized:
            return self.to(device)
        for head in (self.value_head, self.reward_head):
            if head is not None:
                head.to(device)
        return self

    @property
    def backbone(self) -> nn.Module:
        """The transformer under the LM head (`model.model`), shared by every role."""
        return self.model.get_base_model().base_model

    @contextmanager
    def role(self, adapter: str | None):
        """Run the enclosed forward passes with `adapter` active (None: the bare base, adapters off). With the
        adapter layers found once (`stacking.AdapterSwitch`) nothing else changes; through PEFT's own calls, which
        walk the whole model and re-flag `requires_grad`, the trainable set is put back after."""
        if self.switch is not None:
            with self.switch.use(adapter):
                yield
            return
        try:
            if adapter is None:
                with self.model.disable_adapter():
                    self._keep_trainable_set()
                    yield
            else:
                self.model.set_adapter(adapter)
                self._keep_trainable_set()
                yield
        finally:
            self._keep_trainable_set()

    def _keep_trainable_set(self) -> None:
        for name, p in self.named_parameters():
            if p.requires_grad != (name in self.trainable):
                p.requires_grad_(name in self.trainable)

    def logits(self, adapter, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
        """Logits of the `adapter` role at the positions predicting the last `response_length` tokens."""
        with self.role(adapter):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             logits_to_keep=response_length + 1, use_cache=False)
        return out.logits[:, :-1]

    def hidden_states(self, adapter, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        with self.role(adapter):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state

    def values(self, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
        """V(s_t) for each response token t: the value head on the state before the token is generated."""
        hidden = self.hidden_states(VALUE, input_ids, attention_mask, position_ids)
        hidden = hidden[:, -response_length - 1 : -1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def reward_scores(self, input_ids, attention_mask, pad_token_id: int) -> torch.Tensor:
        """The reward model's score of right-padded sequences (one float each), as its sequence-classification
        model computes it: the score head on the hidden state of the rightmost non-pad token."""
        if self.reward_head is None:
            raise RuntimeError("no reward adapter was loaded on the shared base")
        hidden = self.hidden_states(REWARD, input_ids, attention_mask)
        last = last_non_pad_index(input_ids, pad_token_id)
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]
        return self.reward_head(pooled.to(self.reward_head.weight.dtype)).squeeze(-1)


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of the rightmost token that is not `pad_token_id` (transformers' sequence-classification rule)."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


# ------------------------------------------------------------------------------------------------- building


def build_roles(model_args, *, sft_adapter: str | None, reward_adapter: str | None, value_init: str,
                training: bool = True) -> SharedBaseRoles:
    """Load the base once and put every role on it (see the module docstring)."""
    base = modeling.load_model(model_args, training=training)
    if sft_adapter is not None:
        path = stacking.check_adapter_dir(sft_adapter)
        model = PeftModel.from_pretrained(base, path, adapter_name=POLICY, is_trainable=True)
        model.load_adapter(path, adapter_name=REFERENCE, is_trainable=False)
    else:
        lora = modeling.lora_config(model_args, base)
        if lora is None:
            raise stacking.AdapterError("PPO trains adapters: set use_peft: true (or give --sft_adapter)")
        model = get_peft_model(base, lora, adapter_name=POLICY)
    reward_head = load_seq_cls_adapter(model, reward_adapter, REWARD) if reward_adapter else None
    value_head = _add_value_model(model, model_args, value_init, sft_adapter, reward_adapter)
    model.set_adapter(POLICY)
    for name, p in model.named_parameters():  # trainable: the policy and value adapters (and the value head)
        p.requires_grad_(_is_adapter_weight(name, POLICY) or _is_adapter_weight(name, VALUE))
    return SharedBaseRoles(model, value_head, reward_head, reference_adapter=sft_adapter is not None)


def _is_adapter_weight(name: str, adapter: str) -> bool:
    return modeling.is_adapter_parameter(name) and f".{adapter}." in name


def _add_value_model(model, model_args, value_init: str, sft_adapter, reward_adapter) -> nn.Linear:
    """Adapter "value" and its head: a copy of the reward adapter and score head, or of the SFT adapter (a fresh
    LoRA adapter without one) with a zero head."""
    if value_init == "reward":
        if reward_adapter is None:
            raise stacking.AdapterError("value_init: reward needs --reward_adapter; use value_init: sft otherwise")
        return load_seq_cls_adapter(model, reward_adapter, VALUE, trainable=True).float().requires_grad_(True)
    if sft_adapter is not None:
        model.load_adapter(stacking.check_adapter_dir(sft_adapter), adapter_name=VALUE, is_trainable=True)
    else:
        model.add_adapter(VALUE, modeling.lora_config(model_args, model.get_base_model()))
    head = nn.Linear(model.config.hidden_size, 1, bias=False)
    nn.init.zeros_(head.weight)
    return head


def split_seq_cls_weights(weights: dict, source: str) -> tuple[dict, dict]:
    """A sequence-classification adapter's saved weights -> (LoRA weights, score head {"weight", "bias"?})."""
    head = {k[len(SCORE_PREFIX):]: v for k, v in weights.items() if k.startswith(SCORE_PREFIX)}
    lora = {k: v for k, v in weights.items() if not k.startswith(SCORE_PREFIX)}
    other = [k for k in lora if not modeling.is_adapter_parameter(k)]
    if "weight" not in head or other:
        raise stacking.AdapterError(f"{source}: expected LoRA weights and a score head, got {sorted(weights)[:8]}")
    return lora, head


def load_seq_cls_adapter(model: PeftModel, adapter_dir: str, name: str, trainable: bool = False) -> nn.Linear:
    """Add a reward/value adapter saved by align (task SEQ_CLS, `score` head) to the causal-LM `model` as adapter
    `name`; return its score head as an `nn.Linear` (frozen unless `trainable`)."""
    path = stacking.check_adapter_dir(adapter_dir)
    cfg = PeftConfig.from_pretrained(path)
    if str(cfg.task_type) not in ("SEQ_CLS", "TaskType.SEQ_CLS"):
        raise stacking.AdapterError(f"{adapter_dir}: task_type {cfg.task_type}, not a reward adapter (SEQ_CLS)")
    lora, head = split_seq_cls_weights(load_peft_weights(path), adapter_dir)
    cfg = copy.deepcopy(cfg)
    cfg.task_type, cfg.modules_to_save, cfg.inference_mode = "CAUSAL_LM", None, not trainable
    model.add_adapter(name, cfg)
    _set_adapter_weights(model, name, lora, adapter_dir)
    out_features, hidden = head["weight"].shape
    if out_features != 1:
        raise stacking.AdapterError(f"{adapter_dir}: the score head has {out_features} outputs, expected 1")
    linear = nn.Linear(hidden, 1, bias="bias" in head, dtype=head["weight"].dtype)
    linear.load_state_dict(head)
    return linear.requires_grad_(trainable)


def _set_adapter_weights(model: PeftModel, name: str, weights: dict, source: str) -> None:
    """Load saved adapter weights into adapter `name`; every weight must find its place and fill every slot."""
    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    slots = [n for n, _ in model.named_parameters() if _is_adapter_weight(n, name)]
    if result.unexpected_keys or len(slots) != len(weights):
        raise stacking.AdapterError(
            f"{source}: its weights do not fit adapter {name!r} on this base ({len(weights)} saved, {len(slots)} "
            f"slots; unexpected: {list(result.unexpected_keys)[:4]})"
        )


# ------------------------------------------------------------------------------------------------- saving


def save_adapter(model: PeftModel, name: str, out_dir: str, *, base_model: str | None = None,
                 head: nn.Linear | None = None) -> None:
    """Adapter `name` in PEFT's format (adapter_config.json + adapter_model.safetensors) in `out_dir`.

    With `head`, it is saved as a sequence-classification adapter with that head as `score` (the format of
    align/rm.py), which `load_seq_cls_adapter` and `align.reward.RewardScorer` read back.
    """
    state = get_peft_model_state_dict(model, adapter_name=name)
    cfg = copy.deepcopy(model.peft_config[name])
    cfg.inference_mode = True
    if base_model is not None:
        cfg.base_model_name_or_path = base_model
    if head is not None:
        cfg.task_type, cfg.modules_to_save = "SEQ_CLS", ["score"]
        state.update({SCORE_PREFIX + k: v for k, v in head.state_dict().items()})
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f"adapter_model.safetensors.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    cfg.save_pretrained(out_dir)


def save_policy_and_value(roles: SharedBaseRoles, out_dir: str, base_model: str | None = None) -> None:
    """`out_dir/` = the policy adapter; `out_dir/value/` = the value adapter with its head as `score`."""
    save_adapter(roles.model, POLICY, out_dir, base_model=base_model)
    save_adapter(roles.model, VALUE, os.path.join(out_dir, "value"), base_model=base_model, head=roles.value_head)


def load_policy_and_value(roles: SharedBaseRoles, out_dir: str) -> None:
    """Put the weights that `save_policy_and_value` wrote back into the policy and value adapters and head."""
    _set_adapter_weights(roles.model, POLICY, load_peft_weights(out_dir), out_dir)
    value_dir = os.path.join(out_dir, "value")
    lora, head = split_seq_cls_weights(load_peft_weights(value_dir), value_dir)
    _set_adapter_weights(roles.model, VALUE, lora, value_dir)
    with torch.no_grad():
        for k, v in head.items():
            getattr(roles.value_head, k).copy_(v)


# ------------------------------------------------------------------------------------------------- checks


def trainable_fingerprint(roles: SharedBaseRoles) -> str:
    """sha256 of every trainable weight (names and bytes): equal on all processes of a correct DDP run."""
    h = hashlib.sha256()
    for name, p in sorted(roles.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def base_parameter_count(roles: SharedBaseRoles) -> int:
    """Parameters that are neither adapter weights nor the heads: one copy of the base."""
    return sum(p.numel() for n, p in roles.named_parameters()
               if not modeling.is_adapter_parameter(n) and not n.startswith(("value_head.", "reward_head.")))
