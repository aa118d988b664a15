"""Using trained adapters outside training: load one on its base for inference, merge one into a standalone model
(verified against the adapter), or export one with its tokenizer and run.json.

Where an adapter's base comes from:
- `adapter_config.json`'s `base_model_name_or_path` (PEFT writes it), and
- the `lineage` in the `run.json` that align writes next to every adapter: the GGUF file, the dtype the base was
  loaded in and whether it was quantized (`lineage.quantization.load_in_4bit` / `load_in_8bit`). A preference
  adapter trained with `merge_sft_adapter` (`lineage.reference == "merged_sft"`) sat on base + SFT adapter merged;
  that parent is merged in first here too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
import transformers
from peft import PeftModel

from align import convert, modeling
from align.config import ModelArguments

logger = logging.getLogger("align")

DEFAULT_SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b",
    "Water boils at 100 degrees Celsius at sea level.",
)
CHAT_SAMPLE = [
    {"role": "user", "content": "Name three primary colours."},
    {"role": "assistant", "content": "Red, blue and yellow."},
]

# Default tolerances on the relative logits difference max|merged - adapter| / max|adapter| (see merge_adapter).
TOLERANCE_FP32 = 1e-3  # measured 2e-6..5e-6 (fp32 summation order)
TOLERANCE_HALF = 5e-2  # bf16/fp16 storage rounding: measured 0.6-1.8% (SmolLM2-135M), 1.6-2.2% (tiny models)
TOLERANCE_8BIT = 1e-1  # LLM.int8 quantizes activations too: the int8 forward is itself a few % off its weights

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
)


class MergeVerificationError(RuntimeError):
    """The merged model does not reproduce the adapter it was merged from; nothing was written."""

    def __init__(self, message: str, report: MergeReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class MergeReport:
    """What `merge_adapter` measured: merged-model logits against the adapter on its training base.

    `max_rel_diff` = max|Δlogits| / max|adapter logits| of the model as written is compared with `tolerance`,
    `merge_max_rel_diff` (the fp32 merge before storage rounding) with `merge_tolerance`. Perplexities are
    over the sample texts (None for a sequence-classification adapter). With `verify=False` the diffs are NaN.
    """

    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float
    ppl_adapter: float | None
    ppl_merged: float | None
    tolerance: float
    base_quantized: bool
    ok: bool
    verified: bool = True
    merge_max_rel_diff: float = math.nan  # the fp32 merge in memory, before storage rounding
    merge_tolerance: float = TOLERANCE_FP32
    dtype: str = "bfloat16"
    base_model: str = ""
    adapter: str = ""
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """JSON-safe dict (NaN -> null)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------------------------------------------- adapter info


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def adapter_config(adapter_dir: str) -> dict:
    """The adapter's `adapter_config.json` as a dict (FileNotFoundError when `adapter_dir` is no adapter)."""
    cfg = _read_json(os.path.join(adapter_dir, "adapter_config.json"))
    if cfg is None:
        hint = " (it holds a full model: load it directly)" if os.path.isfile(
            os.path.join(adapter_dir, "config.json")) else ""
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json, so it is not an adapter directory{hint}")
    return cfg


def read_lineage(adapter_dir: str) -> dict:
    """`lineage` from the run.json next to the adapter ({} when there is none)."""
    run = _read_json(os.path.join(adapter_dir, "run.json")) or {}
    return run.get("lineage") or {}


def resolve_base(adapter_dir: str) -> str:
    """The base model the adapter was trained on: `base_model_name_or_path` from adapter_config.json, or the
    run.json lineage's `base_model` when PEFT did not record one."""
    base = adapter_config(adapter_dir).get("base_model_name_or_path") or read_lineage(adapter_dir).get("base_model")
    if not base:
        raise ValueError(
            f"{adapter_dir}/adapter_config.json has no base_model_name_or_path and there is no run.json lineage "
            "naming the base: set base_model_name_or_path in adapter_config.json"
        )
    return base


def _run_model_args(adapter_dir: str) -> dict:
    run = _read_json(os.path.join(adapter_dir, "run.json")) or {}
    return (run.get("config") or {}).get("ModelArguments") or {}


@dataclass
class BasePlan:
    """How to rebuild the base an adapter was trained on."""

    base: str
    gguf_file: str | None = None
    revision: str | None = None
    load_dtype: str | None = None  # dtype the base was loaded in for training (what 4-bit weights were made from)
    quantization: str | None = None  # None, "4bit" or "8bit"
    quant_type: str = "nf4"
    double_quant: bool = False
    task: str = "causal_lm"
    num_labels: int = 1
    merged_parent: str | None = None  # adapter merged into the base before this one (merge_sft_adapter runs)


def base_plan(adapter_dir: str, load_in_4bit: bool | None = None) -> BasePlan:
    """Read adapter_config.json and run.json into a `BasePlan`. `load_in_4bit` overrides what they say: True for a
    4-bit base, False for the unquantized base."""
    cfg = adapter_config(adapter_dir)
    lineage = read_lineage(adapter_dir)
    margs = _run_model_args(adapter_dir)
    quant = lineage.get("quantization") or {}
    in4 = bool(quant.get("load_in_4bit", margs.get("load_in_4bit", False)))
    in8 = bool(quant.get("load_in_8bit", margs.get("load_in_8bit", False)))
    if load_in_4bit is not None:  # explicit: 4-bit, or the unquantized base
        in4, in8 = bool(load_in_4bit), False
    parent = None
    if lineage.get("reference") == "merged_sft":
        parent = ((lineage.get("parent_adapter") or {}).get("path"))
        if not parent or not os.path.isfile(os.path.join(parent, "adapter_config.json")):
            raise FileNotFoundError(
                f"{adapter_dir} was trained on its base with the SFT adapter {parent} merged in; that adapter is "
                "needed to rebuild the base and is missing"
            )
    task = "seq_cls" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
    return BasePlan(
        base=resolve_base(adapter_dir),
        gguf_file=lineage.get("gguf_file", margs.get("gguf_file")),
        revision=cfg.get("revision") or lineage.get("revision"),
        load_dtype=lineage.get("dtype", margs.get("dtype")),
        quantization="4bit" if in4 else ("8bit" if in8 else None),
        quant_type=quant.get("bnb_4bit_quant_type") or margs.get("bnb_4bit_quant_type") or "nf4",
        double_quant=bool(quant.get("double_quant", margs.get("use_bnb_nested_quant", False))),
        task=task,
        num_labels=_num_labels(adapter_dir) if task == "seq_cls" else 1,
        merged_parent=parent,
    )


def _num_labels(adapter_dir: str) -> int:
    """Rows of the saved score head of a sequence-classification adapter (1 for a reward model)."""
    from safetensors import safe_open

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return 1
    with safe_open(path, "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
            if "score" in key and key.endswith("weight") and "lora_" not in key:
                return int(fh.get_slice(key).get_shape()[0])
    return 1


# ---------------------------------------------------------------------------------------------------- loading


def plan_model_args(plan: BasePlan, dtype: torch.dtype, quantized: bool = True) -> ModelArguments:
    """ModelArguments that rebuild the plan's base computing in `dtype` (bfloat16, float16 or float32).

    The one difference from training: a quantized base (`quantized` and `plan.quantization`) is loaded in the
    training dtype (`plan.load_dtype`, what its 4-/8-bit weights were made from) but computes in `dtype`, set
    explicitly (fp32 to merge, where training may have computed in bf16); an unquantized base is loaded in `dtype`.
    """
    quant = plan.quantization if quantized else None
    name = str(dtype).removeprefix("torch.")
    return ModelArguments(
        model_name_or_path=plan.base, model_revision=plan.revision or "main", gguf_file=plan.gguf_file,
        dtype=plan.load_dtype if quant else name, load_in_4bit=quant == "4bit", load_in_8bit=quant == "8bit",
        bnb_4bit_quant_type=plan.quant_type, use_bnb_nested_quant=plan.double_quant, bnb_4bit_compute_dtype=name,
    )


def _cast_float_params(model, dtype: torch.dtype) -> None:
    """Cast the non-quantized floating weights (norms, embeddings, head) to `dtype`, as PEFT's
    prepare_model_for_kbit_training does for training; 4-bit / 8-bit weights are left alone."""
    for p in model.parameters():
        if p.is_floating_point() and type(p).__name__ not in ("Params4bit", "Int8Params"):
            p.data = p.data.to(dtype)


def load_base(plan: BasePlan, *, dtype: torch.dtype = torch.float32, quantized: bool = True, device: str = "cpu"):
    """The adapter's base model.

    quantized and `plan.quantization`: bitsandbytes weights made exactly as in training (from the base loaded in
    the training dtype), computing in `dtype`, other weights cast to `dtype`.
    Otherwise: the base loaded in `dtype`. A `merged_parent` adapter is merged in (in `dtype`) in both cases.
    Loaded by `modeling.load_pretrained` (the shared `from_pretrained` rules) from `plan_model_args`.
    """
    args = plan_model_args(plan, dtype, quantized)
    quant = args.load_in_4bit or args.load_in_8bit
    model, _ = modeling.load_pretrained(args, task=plan.task, num_labels=plan.num_labels, device=device)
    if quant:
        _cast_float_params(model, dtype)
    elif device != "cpu":
        model.to(device)
    if plan.merged_parent is not None:
        if quant:
            raise ValueError("a merge_sft_adapter run cannot have a quantized base")
        model = PeftModel.from_pretrained(model, plan.merged_parent).merge_and_unload()
    return model


def load_adapter_model(adapter_dir: str, *, dtype: torch.dtype = torch.float32, load_in_4bit: bool | None = None,
                       device: str = "cpu") -> PeftModel:
    """Base + adapter for inference (eval mode), rebuilt as the adapter was trained.

    A 4-bit-trained adapter (run.json lineage, or `load_in_4bit=True`) gets its base in 4-bit, computing in
    `dtype`; pass `load_in_4bit=False` to put it on the unquantized base instead (not what it was trained on).
    The GGUF file and training dtype come from the lineage too.
    """
    plan = base_plan(adapter_dir, load_in_4bit=load_in_4bit)
    base = load_base(plan, dtype=dtype, quantized=True, device=device)
    model = PeftModel.from_pretrained(base, adapter_dir)
    if plan.quantization is None:
        model.to(dtype)
    model.eval()
    return model


def load_adapter_tokenizer(adapter_dir: str):
    """The tokenizer saved with the adapter (it carries the chat template used in training), else the base's."""
    if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(adapter_dir)
    plan = base_plan(adapter_dir)
    kwargs = {"gguf_file": plan.gguf_file} if plan.gguf_file else {}
    return transformers.AutoTokenizer.from_pretrained(plan.base, **kwargs)


# ------------------------------------------------------------------------------------------------------ merging


def merged_model(adapter_dir: str, plan: BasePlan | None = None):
    """Base + adapter merged into plain fp32 weights (no PEFT wrapper).

    A quantized-trained adapter's base is loaded in 4-bit (8-bit) exactly as in training and dequantized to fp32
    first, so the merged weights are the rounded weights the adapter learned on, plus its delta.
    """
    plan = plan or base_plan(adapter_dir)
    base = load_base(plan, dtype=torch.float32, quantized=True)
    if plan.quantization is not None:
        base = dequantize_fp32(base)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.eval()
    return model


def dequantize_fp32(model):
    """Replace the bitsandbytes layers of `model` by plain fp32 Linear layers (transformers' `dequantize`).

    4-bit weights are dequantized straight to fp32: block scale × NF4 code computed in fp32, the very values a
    4-bit layer multiplies with when it computes in fp32. bitsandbytes' default would return them in the dtype the
    weights were quantized from (bf16 for a bf16 base), rounding every weight once more (~1% logits drift).
    """
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = torch.float32
    model = model.dequantize(dtype=torch.float32)
    return model.float()


def sample_batches(tokenizer, samples: list[str] | None) -> list[torch.Tensor]:
    """Token ids of each sample text (default: `DEFAULT_SAMPLES` plus one chat exchange in the chat template)."""
    texts = list(samples) if samples else list(DEFAULT_SAMPLES)
    if not samples and tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(CHAT_SAMPLE, tokenize=False))
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] >= 2:
            out.append(ids)
    if not out:
        raise ValueError("no sample text has two or more tokens")
    return out


@torch.no_grad()
def _logits(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in batches]


def _perplexity(logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    """Token-weighted perplexity of next-token predictions over all samples."""
    nll, count = 0.0, 0
    for lg, ids in zip(logits, batches):
        nll += torch.nn.functional.cross_entropy(lg[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """max / mean |Δ| and max|Δ| / max|reference| over all samples."""
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, other)])
    scale = max(a.abs().max().item() for a in reference)
    max_abs = diffs.max().item()
    return {"max_abs_diff": max_abs, "mean_abs_diff": diffs.mean().item(),
            "max_rel_diff": max_abs / scale if scale > 0 else max_abs}


def default_tolerance(dtype: torch.dtype, quantization: str | None) -> float:
    """Default bound on the relative logits difference of the merged model *as written* (see merge_adapter)."""
    if quantization == "8bit":
        return TOLERANCE_8BIT
    return TOLERANCE_FP32 if dtype == torch.float32 else TOLERANCE_HALF


def default_merge_tolerance(quantization: str | None) -> float:
    """Default bound for the fp32 merge itself (before storage rounding): fp32 summation-order noise only,
    except on an 8-bit base, whose LLM.int8 forward also quantizes activations."""
    return TOLERANCE_8BIT if quantization == "8bit" else TOLERANCE_FP32


def _load_saved(path: str, task: str):
    return modeling._auto_class(task).from_pretrained(path, dtype=torch.float32).eval()


def _save_merged(model, tokenizer, base: str, out: str, dtype: torch.dtype) -> None:
    """Save a plain copy of `model` in `dtype` with the tokenizer and a generation config to `out`."""
    plain = convert.standalone_model(model, dtype)
    if getattr(plain, "generation_config", None) is not None:  # a causal LM, not a reward model
        try:
            plain.generation_config = transformers.GenerationConfig.from_pretrained(base)
        except (OSError, ValueError):
            pass  # no generation_config.json with the base: the model config's own defaults
        plain.generation_config = convert.generation_config_for(plain, tokenizer)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def merge_adapter(adapter_dir: str, output_dir: str, *, dtype: torch.dtype = torch.bfloat16, verify: bool = True,
                  tolerance: float | None = None, samples: list[str] | None = None,
                  overwrite: bool = False) -> MergeReport:
    """Merge the adapter into its base and save a standalone model (+ tokenizer, generation config,
    merge_report.json, the adapter's run.json as adapter_run.json) to `output_dir`, verified against the adapter.

    Quantized bases (QLoRA): the adapter learned a correction to the *4-bit-rounded* base weights, not to the
    original ones. So the base is loaded in 4-bit exactly as in training (quant type, double quant and the dtype
    the weights were quantized from, all from run.json's lineage), dequantized to exact fp32 values
    (`dequantize_fp32`), and the adapter is merged into that. The merged model reproduces the QLoRA model (fp32
    compute: to ~5e-6 relative, measured), but it carries the 4-bit rounding of the base: it is *not* the original
    base plus the adapter. Merging into the original weights instead keeps the base exact but applies a delta
    learned for other weights: measured 68% relative logits change on SmolLM2-135M (and more on the tiny test
    model). An 8-bit base is dequantized the same way.

    Verification (`verify=True`) runs the sample texts through (a) the adapter on its base as trained (4-bit if
    trained so), computing in fp32; (b) the merged fp32 model in memory; (c) the merged model *as written*,
    loaded back in fp32. The relative difference max|Δlogits| / max|logits_a| is checked twice:
    - merge: (b) vs (a) <= 1e-3 (`default_merge_tolerance`; measured 2e-6..5e-6): catches a wrong merge;
    - written: (c) vs (a) <= `tolerance`, by default 1e-3 for fp32 storage and 5e-2 for bf16/fp16 storage
      (rounding the merged weights to bf16 measured 0.6-1.8% on SmolLM2-135M, 1.6-2.2% on the tiny random test
      models), 1e-1 for an 8-bit base (`default_tolerance`).
    An explicit `tolerance` bounds both. The report keeps the written-model numbers plus both perplexities and
    `merge_max_rel_diff`; on failure MergeVerificationError (with `.report`) is raised and nothing is written.

    Atomic: everything is written to `output_dir + ".tmp-<pid>"`, which replaces `output_dir` with one rename
    only after verification passed. An existing `output_dir` is an error unless `overwrite`.
    """
    adapter_dir = os.path.abspath(adapter_dir)
    output_dir = os.path.abspath(output_dir)
    if os.path.lexists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; choose another output or pass overwrite=True")
    plan = base_plan(adapter_dir)
    tokenizer = load_adapter_tokenizer(adapter_dir)
    tol = default_tolerance(dtype, plan.quantization) if tolerance is None else float(tolerance)
    merge_tol = default_merge_tolerance(plan.quantization) if tolerance is None else float(tolerance)
    batches = sample_batches(tokenizer, samples)
    report = MergeReport(
        max_abs_diff=math.nan, mean_abs_diff=math.nan, max_rel_diff=math.nan, ppl_adapter=None, ppl_merged=None,
        tolerance=tol, base_quantized=plan.quantization is not None, ok=True, verified=verify,
        dtype=str(dtype).removeprefix("torch."), base_model=plan.base, adapter=adapter_dir, samples=len(batches),
        merge_tolerance=merge_tol,
    )
    if plan.quantization is not None:
        report.notes.append(f"merged into the dequantized {plan.quantization} base (what the adapter trained on)")
    if plan.merged_parent:
        report.notes.append(f"base = {plan.base} with {plan.merged_parent} merged in")

    ref_logits = None
    if verify:  # (a) the adapter as trained, before the merged model takes the memory
        reference = load_adapter_model(adapter_dir, dtype=torch.float32)
        ref_logits = _logits(reference, batches)
        del reference
    model = merged_model(adapter_dir, plan)
    if verify:  # (b) the merge itself, in fp32
        report.merge_max_rel_diff = compare_logits(ref_logits, _logits(model, batches))["max_rel_diff"]
    tmp = convert.tmp_dir_for(output_dir)
    try:
        _save_merged(model, tokenizer, plan.base, tmp, dtype)
        del model
        if verify:  # (c) the files as written
            merged_logits = _logits(_load_saved(tmp, plan.task), batches)
            for k, v in compare_logits(ref_logits, merged_logits).items():
                setattr(report, k, v)
            if plan.task == "causal_lm":
                report.ppl_adapter = _perplexity(ref_logits, batches)
                report.ppl_merged = _perplexity(merged_logits, batches)
            report.ok = report.merge_max_rel_diff <= merge_tol and report.max_rel_diff <= tol
        if not report.ok:
            raise MergeVerificationError(
                f"merged model differs from the adapter: relative logits difference {report.max_rel_diff:.3g} "
                f"as written (tolerance {tol:.3g}), {report.merge_max_rel_diff:.3g} for the fp32 merge "
                f"(tolerance {merge_tol:.3g}); max|Δlogits| {report.max_abs_diff:.3g}, perplexity "
                f"{report.ppl_adapter} -> {report.ppl_merged}. Nothing was written to {output_dir}", report,
            )
        with open(os.path.join(tmp, "merge_report.json"), "w") as fh:
            json.dump(report.to_json(), fh, indent=2)
        _copy_run_json(adapter_dir, tmp)
        convert.publish_dir(tmp, output_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _copy_run_json(adapter_dir: str, out: str) -> None:
    """Keep the adapter's run.json (as `adapter_run.json`) so the merged model stays traceable."""
    src = os.path.join(adapter_dir, "run.json")
    if os.path.isfile(src):
        shutil.copy2(src, os.path.join(out, "adapter_run.json"))


# ----------------------------------------------------------------------------------------------------- export


def _exported(name: str) -> bool:
    return name.startswith("adapter_") or name in _TOKENIZER_FILES or name in ("run.json", "README.md")


def export_adapter(adapter_dir: str, output_dir: str, overwrite: bool = False) -> str:
    """Copy the adapter (weights + config), its tokenizer files, README and run.json to `output_dir` atomically
    (checkpoints, optimizer state and logs stay behind); return `output_dir`."""
    adapter_config(adapter_dir)  # fails clearly on a non-adapter directory
    output_dir = os.path.abspath(output_dir)
    if os.path.lexists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass overwrite=True to replace it")
    tmp = convert.tmp_dir_for(output_dir)
    try:
        os.makedirs(tmp)
        for name in sorted(os.listdir(adapter_dir)):
            src = os.path.join(adapter_dir, name)
            if os.path.isfile(src) and _exported(name):
                shutil.copy2(src, os.path.join(tmp, name))
        convert.publish_dir(tmp, output_dir, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
