"""A model to evaluate is a directory: a base model, a merged or fully fine-tuned model, or an adapter whose base
is read from its run.json lineage (else adapter_config.json). So one command compares base, SFT-LoRA, DPO-LoRA
and full fine-tunes.

    ref = resolve_model("dpo", "outputs/demo/dpo")     # ModelRef(kind="adapter", base=..., parent_adapter=...)
    model, tokenizer = load_causal_lm(ref)               # base + adapter "default" (+ "ref" for preference evals)
    resolve_model("base_nf4", "models/base@4bit")        # the base in 4-bit NF4, as a QLoRA adapter's base sits:
                                                         # tells quantization loss from forgetting
    fingerprint(ref)                                     # changes when any file of the model (or its base) does
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
import transformers
from peft import PeftModel

from align import manifest, modeling
from align.config import ModelArguments
from align.reward import model_args_for

KINDS = ("base", "full", "merged", "adapter", "reward")
QUANTIZATIONS = ("4bit", "8bit")  # `DIR@4bit`: a base/full/merged model loaded as QLoRA training loads its base
_HASHED_FILE_LIMIT = 64 << 20  # files up to this size are hashed by content; larger ones by size and mtime
_MODEL_FILES = (".json", ".safetensors", ".bin", ".gguf", ".model", ".txt", ".jinja", ".pt")


class ModelResolutionError(ValueError):
    """A model directory that cannot be evaluated as given."""


@dataclass
class ModelRef:
    """What a name=directory pair on the command line is."""

    name: str
    path: str
    kind: str  # base | full (fully fine-tuned) | merged (align/merge.py output) | adapter | reward (seq-cls adapter)
    base: str | None = None  # adapters: the base model they were trained on
    stage: str | None = None  # run.json stage (sft, dpo, rm, ...)
    parent_adapter: str | None = None  # the adapter this one was trained from (lineage.parent_adapter.path)
    reference: str | None = None  # preference adapters: sft_adapter | merged_sft | base (lineage.reference)
    beta: float | None = None  # DPO adapters: the beta they were trained with
    quantization: str | None = None  # 4bit | 8bit: a plain model loaded quantized (`DIR@4bit`)

    @property
    def is_causal_lm(self) -> bool:
        return self.kind != "reward"

    def as_dict(self) -> dict:
        return asdict(self)


def parse_model_args(items: list[str]) -> list[tuple[str, str]]:
    """`name=dir` items (a bare `dir` is named after its folder); names must be unique."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)), item
        if not name or not path:
            raise ModelResolutionError(f"--models item {item!r}: expected name=directory")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ModelResolutionError(f"model names must be unique, got {names}")
    return out


def _find_beta(config: dict) -> float | None:
    for section in (config or {}).values():
        if isinstance(section, dict) and isinstance(section.get("beta"), (int, float)):
            return float(section["beta"])
    return None


def _full_finetune(run: dict) -> bool:
    """A run whose weights all trained (use_peft false): a full fine-tune rather than a base."""
    margs = (run.get("config") or {}).get("ModelArguments") or {}
    return bool(run.get("stage")) and margs.get("use_peft") is False


def split_quantization(path: str) -> tuple[str, str | None]:
    """`DIR@4bit` -> (DIR, "4bit"); a path without a known suffix is returned unchanged."""
    head, sep, tail = path.rpartition("@")
    if sep and tail in QUANTIZATIONS:
        return head, tail
    return path, None


def resolve_model(name: str, path: str) -> ModelRef:
    """Classify `path` and find what it needs: an adapter's base, parent adapter, DPO reference and beta.
    `DIR@4bit` / `DIR@8bit` loads a plain model quantized (NF4 with double quantization, as the QLoRA recipes load
    their base), so a QLoRA adapter can be compared with the base it was trained on."""
    path, quantization = split_quantization(os.path.expanduser(path))
    ref = _resolve(name, path)
    if quantization:
        if ref.kind not in ("base", "full", "merged"):
            raise ModelResolutionError(f"{name}={path}@{quantization}: only a plain model can be loaded quantized; "
                                       f"an adapter loads its base as it was trained (run.json lineage)")
        ref.quantization = quantization
    return ref


def _resolve(name: str, path: str) -> ModelRef:
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        run = manifest.read_run(path) or {}
        lineage = run.get("lineage") or {}
        cfg = manifest.read_json(os.path.join(path, "adapter_config.json")) or {}
        kind = "reward" if cfg.get("task_type") == "SEQ_CLS" else "adapter"
        parent = (lineage.get("parent_adapter") or {}).get("path")
        return ModelRef(name=name, path=os.path.abspath(path), kind=kind, base=_adapter_base(path, lineage, cfg),
                        stage=run.get("stage"), parent_adapter=parent, reference=lineage.get("reference"),
                        beta=_find_beta(run.get("config")))
    if os.path.isfile(os.path.join(path, "config.json")):
        run = manifest.read_run(path) or manifest.read_json(os.path.join(path, "adapter_run.json")) or {}
        kind = "merged" if os.path.isfile(os.path.join(path, "merge_report.json")) else (
            "full" if _full_finetune(run) else "base")
        return ModelRef(name=name, path=os.path.abspath(path), kind=kind, stage=run.get("stage"))
    if not os.path.exists(path) and modeling._looks_like_hub_id(path):
        return ModelRef(name=name, path=path, kind="base")  # a hub name: transformers resolves it
    raise ModelResolutionError(f"{name}={path}: neither a model (config.json) nor an adapter (adapter_config.json)")


def _adapter_base(path: str, lineage: dict, cfg: dict) -> str:
    """run.json lineage's base_model first (it is what training loaded), then adapter_config.json's; the first
    that exists locally wins, else the first named (a hub name)."""
    candidates = [c for c in (lineage.get("base_model"), cfg.get("base_model_name_or_path")) if c]
    if not candidates:
        raise ModelResolutionError(f"{path}: neither run.json lineage nor adapter_config.json names the base model")
    return next((c for c in candidates if os.path.isdir(c)), candidates[0])


# --------------------------------------------------------------------------------------------------- fingerprints


def _dir_digest(path: str) -> str:
    h = hashlib.sha256(os.path.abspath(path).encode())
    if not os.path.isdir(path):
        return h.hexdigest()
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if not os.path.isfile(full) or not entry.endswith(_MODEL_FILES) or entry.startswith("results"):
            continue
        stat = os.stat(full)
        h.update(f"{entry}:{stat.st_size}".encode())
        if stat.st_size <= _HASHED_FILE_LIMIT:
            with open(full, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        else:
            h.update(str(stat.st_mtime_ns).encode())
    return h.hexdigest()


def fingerprint(ref: ModelRef, **settings) -> str:
    """Identity of what is evaluated: the model's files (with its base's and a merged parent's) and the load
    settings (dtype, ...). Equal fingerprints give equal scores, so results are cached under it."""
    parts = {"kind": ref.kind, "self": _dir_digest(ref.path), "settings": settings}
    if ref.quantization:
        parts["quantization"] = ref.quantization
    if ref.base:
        parts["base"] = _dir_digest(ref.base)
    if ref.reference == "merged_sft" and ref.parent_adapter:
        parts["merged_parent"] = _dir_digest(ref.parent_adapter)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# -------------------------------------------------------------------------------------------------------- loading


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(ref: ModelRef):
    """The tokenizer saved with the model or adapter (it carries the training chat template), else the base's;
    with a pad token and right padding (log-prob scoring)."""
    source = ref.path
    if not os.path.isfile(os.path.join(ref.path, "tokenizer_config.json")) and ref.base:
        source = ref.base
    kwargs = {}
    gguf = ((manifest.read_run(ref.path) or {}).get("lineage") or {}).get("gguf_file")
    if source == ref.base and gguf:
        kwargs["gguf_file"] = gguf
    tok = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_causal_lm(ref: ModelRef, *, dtype: str = "float32", device: str = "auto", with_reference: bool = False):
    """(model, tokenizer) in eval mode. An adapter sits on its base as trained (4-bit if it was trained so, a
    merge_sft_adapter run's SFT parent merged in first) as adapter "default". `with_reference` also loads a DPO
    adapter's parent SFT adapter as "ref" on the same base, for implicit rewards (see preference.py)."""
    if not ref.is_causal_lm:
        raise ModelResolutionError(f"{ref.name} is a reward model, not a causal LM")
    torch_dtype = modeling.torch_dtype(dtype)
    device = pick_device(device)
    tokenizer = load_tokenizer(ref)
    if ref.kind in ("base", "full", "merged"):
        model = modeling.load_model(plain_model_args(ref.path, dtype, ref.quantization), training=False)
        if not ref.quantization:
            model.to(device)
        return model.eval(), tokenizer
    base, quantized = _load_base(ref, dtype, device)
    model = PeftModel.from_pretrained(base, ref.path, adapter_name="default")
    if with_reference and ref.reference == "sft_adapter" and ref.parent_adapter:
        if not os.path.isfile(os.path.join(ref.parent_adapter, "adapter_config.json")):
            raise ModelResolutionError(f"{ref.name}: its reference, the SFT adapter {ref.parent_adapter}, is missing")
        model.load_adapter(ref.parent_adapter, adapter_name="ref")
        model.set_adapter("default")
    if not quantized:
        model.to(torch_dtype)
    return model.eval(), tokenizer


def plain_model_args(path: str, dtype: str, quantization: str | None = None) -> ModelArguments:
    """Model arguments that load the plain model `path` in `dtype`; with `quantization` as the QLoRA recipes load
    their base: NF4, double quantization, computing in `dtype` (8-bit: LLM.int8)."""
    return ModelArguments(model_name_or_path=path, dtype=dtype, load_in_4bit=quantization == "4bit",
                          load_in_8bit=quantization == "8bit", bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                          bnb_4bit_compute_dtype=dtype)


def _load_base(ref: ModelRef, dtype: str, device: str):
    """(base model, quantized?) for an adapter, rebuilt from its run.json as it was trained: GGUF file, 4-bit
    settings (on the local accelerator), and for a merge_sft_adapter run its parent SFT adapter merged in."""
    args = model_args_for(ref.path, dtype=dtype)
    args.model_name_or_path = ref.base
    quantized = bool(args.load_in_4bit or args.load_in_8bit)
    base = modeling.load_model(args, training=False)
    if not quantized:
        base.to(device)
    if ref.reference == "merged_sft":
        if quantized:
            raise ModelResolutionError(f"{ref.name}: a merge_sft_adapter run cannot have a quantized base")
        if not ref.parent_adapter or not os.path.isfile(os.path.join(ref.parent_adapter, "adapter_config.json")):
            raise ModelResolutionError(f"{ref.name} was trained on its base with the SFT adapter "
                                       f"{ref.parent_adapter} merged in, and that adapter is missing")
        base = PeftModel.from_pretrained(base, ref.parent_adapter).merge_and_unload()
    return base, quantized
