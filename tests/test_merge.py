"""Adapter merging on tiny random models: fp32 / bf16 merges reproduce the adapter, a QLoRA adapter is merged
into its dequantized 4-bit base (a naive merge is not), broken merges are refused and leave nothing behind."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from align import adapters, manifest, modeling
from align.adapters import MergeVerificationError, merge_adapter
from align.config import ModelArguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_adapter(base_dir, out_dir, *, load_in_4bit=False, load_in_8bit=False, seed=1, scale=0.05, model=None,
                 lineage_extra=None, **lora):
    """A LoRA adapter on `base_dir` (loaded as in training: 4-bit / 8-bit when asked) with random non-zero B
    weights, saved with the tokenizer and a run.json lineage as align's stages write them."""
    args = ModelArguments(model_name_or_path=base_dir, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                          use_bnb_nested_quant=load_in_4bit, use_peft=True, lora_r=8, lora_alpha=16, **lora)
    base = model if model is not None else modeling.load_model(args)
    peft_model = get_peft_model(base, modeling.lora_config(args, base))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out_dir)
    modeling.load_tokenizer(args).save_pretrained(out_dir)
    lineage = manifest.base_model_lineage(args)
    lineage.update(lineage_extra or {})
    manifest.write_json_atomic(os.path.join(out_dir, "run.json"), {"stage": "sft", "lineage": lineage})
    return out_dir


@pytest.fixture(scope="module")
def ids(tokenizer):
    msgs = [{"role": "user", "content": "Reverse: red green blue lamp"}, {"role": "assistant", "content": "lamp blue"}]
    return tokenizer.apply_chat_template(msgs, return_tensors="pt", return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory):
    return make_adapter(tiny_llama, str(tmp_path_factory.mktemp("adapters") / "lora"))


@pytest.fixture(scope="module")
def qlora_adapter(tiny_llama, tmp_path_factory):
    return make_adapter(tiny_llama, str(tmp_path_factory.mktemp("adapters") / "qlora"), load_in_4bit=True)


@pytest.fixture(scope="module")
def qlora_bf16_adapter(tiny_llama, tmp_path_factory):
    """QLoRA on a base loaded in bf16: the 4-bit weights are made from bf16 weights (as in the recipes)."""
    return make_adapter(tiny_llama, str(tmp_path_factory.mktemp("adapters") / "qlora-bf16"), load_in_4bit=True,
                        dtype="bfloat16")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def fp32_adapter_logits(base_dir, adapter_dir, ids):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)


def qlora_reference_logits(base_dir, adapter_dir, ids, source_dtype=torch.float32):
    """The QLoRA model as trained (nested NF4 base made from `source_dtype` weights), computing in fp32; built
    here without align.adapters."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=source_dtype, quantization_config=quant)
    modeling.keep_cpu_4bit_unpacked(base)
    for p in base.parameters():
        if p.dtype == source_dtype:
            p.data = p.data.float()
    return logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)


def merged_logits(out_dir, ids):
    return logits(AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval(), ids)


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def leftovers(parent):
    return [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p]


# ---------------------------------------------------------------------------------------------------- merges


def test_fp32_merge_reproduces_adapter(tiny_llama, lora_adapter, ids, tmp_path):
    out = str(tmp_path / "merged")
    report = merge_adapter(lora_adapter, out, dtype=torch.float32)
    assert report.ok and report.verified and not report.base_quantized
    assert report.max_rel_diff < 1e-4 and report.merge_max_rel_diff < 1e-4
    assert report.tolerance == adapters.TOLERANCE_FP32
    assert abs(report.ppl_adapter - report.ppl_merged) / report.ppl_adapter < 1e-4

    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "merge_report.json", "adapter_run.json"} <= files
    assert "adapter_config.json" not in files
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as fh:
        assert not any("lora" in k for k in fh.keys())  # noqa: SIM118
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
    with open(os.path.join(out, "merge_report.json")) as fh:
        assert json.load(fh)["ok"] is True

    want = fp32_adapter_logits(tiny_llama, lora_adapter, ids)
    got = merged_logits(out, ids)
    assert (want - got).abs().max().item() < 1e-4
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), ids)
    assert (want - base).abs().max().item() > 0.1  # the adapter does change the model
    assert not leftovers(tmp_path)


def test_bf16_merge_within_documented_tolerance(tiny_llama, lora_adapter, ids, tmp_path):
    out = str(tmp_path / "merged-bf16")
    report = merge_adapter(lora_adapter, out)  # default dtype: bfloat16
    assert report.ok and report.dtype == "bfloat16"
    assert report.tolerance == adapters.TOLERANCE_HALF
    assert report.merge_max_rel_diff < 1e-4  # the merge itself is exact; bf16 storage adds the rest
    assert 1e-4 < report.max_rel_diff < adapters.TOLERANCE_HALF
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16
    assert rel(fp32_adapter_logits(tiny_llama, lora_adapter, ids), merged_logits(out, ids)) < 5e-2


def test_qlora_merge_uses_dequantized_base(tiny_llama, qlora_adapter, ids, tmp_path):
    """The adapter learned on 4-bit weights: merged into the dequantized 4-bit base it reproduces the QLoRA model;
    merged into the original fp32 weights (the naive way) it does not."""
    report = merge_adapter(qlora_adapter, str(tmp_path / "merged"), dtype=torch.float32)
    assert report.ok and report.base_quantized
    assert report.max_rel_diff < 1e-4
    reference = qlora_reference_logits(tiny_llama, qlora_adapter, ids)
    dequantized_merge = rel(reference, merged_logits(str(tmp_path / "merged"), ids))
    assert dequantized_merge < 1e-4

    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                      qlora_adapter).merge_and_unload()
    naive_diff = rel(reference, logits(naive, ids))
    assert naive_diff > 0.05 and naive_diff > 100 * dequantized_merge, (naive_diff, dequantized_merge)


def test_qlora_merge_from_bf16_base_uses_exact_dequantized_values(tiny_llama, qlora_bf16_adapter, ids, tmp_path):
    """4-bit weights made from a bf16 base: dequantized straight to fp32 (not rounded back to bf16 first)."""
    report = merge_adapter(qlora_bf16_adapter, str(tmp_path / "merged"), dtype=torch.float32)
    assert report.ok and report.base_quantized and report.max_rel_diff < 1e-4
    reference = qlora_reference_logits(tiny_llama, qlora_bf16_adapter, ids, source_dtype=torch.bfloat16)
    assert rel(reference, merged_logits(str(tmp_path / "merged"), ids)) < 1e-4
    assert rel(reference, qlora_reference_logits(tiny_llama, qlora_bf16_adapter, ids)) > 1e-3  # source dtype matters


def test_qlora_merge_bf16(tiny_llama, qlora_adapter, ids, tmp_path):
    report = merge_adapter(qlora_adapter, str(tmp_path / "merged"))
    assert report.ok and report.base_quantized and report.max_rel_diff < adapters.TOLERANCE_HALF
    assert rel(qlora_reference_logits(tiny_llama, qlora_adapter, ids), merged_logits(str(tmp_path / "merged"), ids)) \
        < adapters.TOLERANCE_HALF


def test_8bit_adapter_merge(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, str(tmp_path / "a8"), load_in_8bit=True)
    report = merge_adapter(adapter, str(tmp_path / "merged"), dtype=torch.float32)
    assert report.ok and report.base_quantized and report.tolerance == adapters.TOLERANCE_8BIT
    assert report.max_rel_diff < adapters.TOLERANCE_8BIT


def test_dora_rslora_merge(tiny_llama, ids, tmp_path):
    adapter = make_adapter(tiny_llama, str(tmp_path / "dora"), use_dora=True, use_rslora=True)
    report = merge_adapter(adapter, str(tmp_path / "merged"), dtype=torch.float32)
    assert report.ok
    assert (fp32_adapter_logits(tiny_llama, adapter, ids) - merged_logits(str(tmp_path / "merged"), ids)).abs().max() \
        < 1e-4


def test_merged_sft_lineage_merges_the_parent_first(tiny_llama, ids, tmp_path):
    """A DPO adapter trained with merge_sft_adapter sat on base + SFT merged: the merge rebuilds that base."""
    sft = make_adapter(tiny_llama, str(tmp_path / "sft"), seed=1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    sft_merged = PeftModel.from_pretrained(base, sft).merge_and_unload()
    dpo = make_adapter(tiny_llama, str(tmp_path / "dpo"), seed=2, model=sft_merged,
                       lineage_extra={"reference": "merged_sft", "parent_adapter": {"path": sft}})
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                        sft).merge_and_unload()
    want = logits(PeftModel.from_pretrained(rebuilt, dpo).eval(), ids)
    assert rel(want, fp32_adapter_logits(tiny_llama, dpo, ids)) > 1e-2  # the parent matters

    report = merge_adapter(dpo, str(tmp_path / "merged"), dtype=torch.float32)
    assert report.ok and any("merged in" in n for n in report.notes)
    assert (want - merged_logits(str(tmp_path / "merged"), ids)).abs().max().item() < 1e-4


def test_reward_model_adapter_merge(tiny_llama, ids, tmp_path):
    """A sequence-classification adapter (LoRA + trained score head) merges into a standalone reward model."""
    args = ModelArguments(model_name_or_path=tiny_llama, use_peft=True, lora_task_type="SEQ_CLS")
    rm = modeling.load_model(args, task="seq_cls", num_labels=1)
    adapter = make_adapter(tiny_llama, str(tmp_path / "rm"), model=rm, lora_task_type="SEQ_CLS")
    with torch.no_grad():  # a trained score head, not the base's random one
        head = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        key = next(k for k in head if "score" in k)
        head[key] = head[key] * 3.0
        save_file(head, os.path.join(adapter, "adapter_model.safetensors"))
    report = merge_adapter(adapter, str(tmp_path / "merged"), dtype=torch.float32)
    assert report.ok and report.ppl_adapter is None
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    reference = adapters.load_adapter_model(adapter)
    want, got = logits(reference, ids), logits(merged.eval(), ids)
    assert want.shape == got.shape == (1, 1)
    assert (want - got).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------ refused merges


def test_corrupted_merge_raises_and_leaves_nothing(lora_adapter, tmp_path, monkeypatch):
    real = adapters.merged_model

    def corrupted(adapter_dir, plan=None):
        model = real(adapter_dir, plan)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.05)
        return model

    monkeypatch.setattr(adapters, "merged_model", corrupted)
    out = tmp_path / "merged"
    with pytest.raises(MergeVerificationError, match="differs") as err:
        merge_adapter(lora_adapter, str(out))
    assert err.value.report is not None and not err.value.report.ok
    assert err.value.report.merge_max_rel_diff > adapters.TOLERANCE_FP32
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_zero_tolerance_raises_and_leaves_nothing(lora_adapter, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(MergeVerificationError):
        merge_adapter(lora_adapter, str(out), tolerance=0.0)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(lora_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        merge_adapter(lora_adapter, str(out), verify=False)
    assert (out / "keep.txt").exists()
    report = merge_adapter(lora_adapter, str(out), verify=False, overwrite=True)
    assert report.verified is False and report.ok
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not leftovers(tmp_path)


def test_merge_cli(lora_adapter, tmp_path):
    out = str(tmp_path / "merged")
    run = subprocess.run([sys.executable, "align/merge.py", "--adapter", lora_adapter, "--output", out, "--dtype",
                          "float32"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"ok": true' in run.stdout and os.path.isfile(os.path.join(out, "config.json"))
    bad = subprocess.run([sys.executable, "align/merge.py", "--adapter", lora_adapter, "--output", out + "-2",
                          "--tolerance", "0"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 1 and "differs" in bad.stderr
    assert not os.path.exists(out + "-2")


# ------------------------------------------------------------------------------------------ loading / export


def test_load_adapter_model_rebuilds_the_training_base(tiny_llama, qlora_adapter, lora_adapter, ids):
    import bitsandbytes as bnb

    q = adapters.load_adapter_model(qlora_adapter)
    assert isinstance(q, PeftModel)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    assert rel(qlora_reference_logits(tiny_llama, qlora_adapter, ids), logits(q, ids)) < 1e-5
    unq = adapters.load_adapter_model(qlora_adapter, load_in_4bit=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in unq.modules())
    plain = adapters.load_adapter_model(lora_adapter)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    assert (logits(plain, ids) - fp32_adapter_logits(tiny_llama, lora_adapter, ids)).abs().max() < 1e-5


def test_resolve_base_and_errors(tiny_llama, lora_adapter, tmp_path):
    assert os.path.abspath(adapters.resolve_base(lora_adapter)) == os.path.abspath(tiny_llama)
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        adapters.resolve_base(str(tmp_path))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        adapters.resolve_base(str(bare))


def test_export_adapter(lora_adapter, tmp_path):
    os.makedirs(os.path.join(lora_adapter, "checkpoint-5"), exist_ok=True)
    out = adapters.export_adapter(lora_adapter, str(tmp_path / "export"))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json", "tokenizer.json"} <= files
    assert "checkpoint-5" not in files
    with pytest.raises(FileExistsError):
        adapters.export_adapter(lora_adapter, out)
    assert not leftovers(tmp_path)
