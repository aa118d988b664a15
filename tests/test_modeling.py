"""Model loading: quantization config, LoRA config per family, 4-bit loading, errors; GGUF conversion."""

import os
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import convert, modeling
from align.config import ModelArguments
from align.testing import ARCHITECTURES

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_args(**kw):
    return ModelArguments(**kw)


def fake_model(model_type):
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type))


# ----------------------------------------------------------------------------------------------- quantization


def test_quantization_config_4bit_nf4_double_quant():
    q = modeling.quantization_config(model_args(load_in_4bit=True, use_bnb_nested_quant=True, dtype="float32"))
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant is True
    assert q.bnb_4bit_compute_dtype == torch.bfloat16  # fp32 model dtype -> bf16 compute


@pytest.mark.parametrize(
    "kw, want",
    [
        ({"dtype": "auto"}, torch.bfloat16),
        ({"dtype": "bfloat16"}, torch.bfloat16),
        ({"dtype": "float16"}, torch.float16),
        ({"dtype": "float32", "bnb_4bit_compute_dtype": "float16"}, torch.float16),
        ({"dtype": "bfloat16", "bnb_4bit_compute_dtype": "float32"}, torch.float32),
    ],
)
def test_quantization_config_compute_dtype(kw, want):
    q = modeling.quantization_config(model_args(load_in_4bit=True, **kw))
    assert q.bnb_4bit_compute_dtype == want
    assert q.bnb_4bit_use_double_quant is False


def test_quantization_config_storage_8bit_and_none():
    q = modeling.quantization_config(model_args(load_in_4bit=True, bnb_4bit_quant_storage="bfloat16",
                                                bnb_4bit_quant_type="fp4"))
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_quant_type == "fp4"
    q8 = modeling.quantization_config(model_args(load_in_8bit=True))
    assert q8.load_in_8bit and not q8.load_in_4bit
    assert modeling.quantization_config(model_args()) is None
    both = model_args(load_in_4bit=True)
    both.load_in_8bit = True  # ModelConfig refuses both at construction; a later override must not slip through
    with pytest.raises(ValueError, match="exclusive"):
        modeling.quantization_config(both)


# --------------------------------------------------------------------------------------------------- LoRA config


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_lora_default_targets_attention_and_mlp(arch):
    cfg = modeling.lora_config(model_args(use_peft=True), fake_model(arch))
    assert set(cfg.target_modules) == set(ATTN_MLP)


def test_lora_default_targets_phi3_fused():
    cfg = modeling.lora_config(model_args(use_peft=True), fake_model("phi3"))
    assert set(cfg.target_modules) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_lora_targets_fallback_all_linear_and_overrides():
    assert modeling.lora_config(model_args(use_peft=True), fake_model("falcon")).target_modules == "all-linear"
    cfg = modeling.lora_config(model_args(use_peft=True, lora_target_modules=["all-linear"]), fake_model("llama"))
    assert cfg.target_modules == "all-linear"
    cfg = modeling.lora_config(model_args(use_peft=True, lora_target_modules=["q_proj", "v_proj"]), fake_model("phi3"))
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert modeling.lora_config(model_args(use_peft=False), fake_model("llama")) is None


def test_lora_switches_reach_lora_config():
    args = model_args(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True, use_rslora=True,
                      lora_bias="lora_only", lora_modules_to_save=["lm_head"])
    cfg = modeling.lora_config(args, fake_model("llama"))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.1)
    assert cfg.use_dora is True and cfg.use_rslora is True
    assert cfg.bias == "lora_only"
    assert cfg.modules_to_save == ["lm_head"]
    assert str(cfg.task_type.value if hasattr(cfg.task_type, "value") else cfg.task_type) == "CAUSAL_LM"
    plain = modeling.lora_config(model_args(use_peft=True), fake_model("llama"))
    assert plain.use_dora is False and plain.use_rslora is False and plain.bias == "none"
    cls = modeling.lora_config(model_args(use_peft=True, lora_task_type="SEQ_CLS"), fake_model("llama"))
    assert cls.modules_to_save == ["score"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_targets_exist_in_each_family(arch, tiny_model_factory):
    """The family defaults name real modules: every one of them gets a LoRA layer, nothing else does."""
    path = tiny_model_factory(arch)
    args = model_args(model_name_or_path=path, use_peft=True, lora_r=4)
    model = modeling.load_model(args)
    peft_model = get_peft_model(model, modeling.lora_config(args, model))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(modeling.DEFAULT_TARGET_MODULES[arch])


# --------------------------------------------------------------------------------------------------- loading


def test_load_model_4bit_has_linear4bit_layers_and_frozen_base(tiny_llama):
    import bitsandbytes as bnb

    args = model_args(model_name_or_path=tiny_llama, load_in_4bit=True, use_bnb_nested_quant=True, use_peft=True,
                      lora_r=4)
    model = modeling.load_model(args)
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.nested is True
    assert modeling.count_parameters(model)["trainable"] == 0
    # prepare_model_for_kbit_training kept the norms in fp32, the 4-bit weights packed
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.uint8

    peft_model = get_peft_model(model, modeling.lora_config(args, model))
    counts = modeling.count_parameters(peft_model)
    assert 0 < counts["trainable"] < counts["total"]
    before = modeling.base_parameters_snapshot(peft_model)
    assert before and not any("lora_" in n for n in before)
    assert any(".weight" in n and t.dtype == torch.uint8 for n, t in before.items())

    # one optimizer step moves the adapter, not the base
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model.train()
    ids = torch.randint(0, 1000, (2, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = modeling.base_parameters_snapshot(peft_model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)


def test_base_parameters_snapshot_detects_a_changed_base(tiny_llama):
    args = model_args(model_name_or_path=tiny_llama, use_peft=True, lora_r=4)
    model = modeling.load_model(args)
    model = get_peft_model(model, modeling.lora_config(args, model))
    before = modeling.base_parameters_snapshot(model)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.add_(1e-3)
    after = modeling.base_parameters_snapshot(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]


def test_load_model_dtype_and_seq_cls(tiny_llama):
    bf16 = modeling.load_model(model_args(model_name_or_path=tiny_llama, dtype="bfloat16"), training=False)
    assert bf16.dtype == torch.bfloat16
    rm = modeling.load_model(model_args(model_name_or_path=tiny_llama), task="seq_cls", num_labels=1)
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    assert rm.score.out_features == 1
    assert rm.config.pad_token_id is not None
    with pytest.raises(ValueError, match="unknown task"):
        modeling.load_model(model_args(model_name_or_path=tiny_llama), task="seq2seq")


def test_new_score_head_is_drawn_from_the_seed_alone(tiny_llama):
    """The reward model's new head depends on `head_seed`, not on the global RNG (nor, so, on the launch engine)."""
    args = ModelArguments(model_name_or_path=tiny_llama, dtype="float32")
    heads = []
    for global_seed, head_seed in ((0, 7), (123, 7), (0, 8)):
        torch.manual_seed(global_seed)
        model = modeling.load_model(args, task="seq_cls", num_labels=1, training=False, head_seed=head_seed)
        heads.append(model.score.weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
    assert not torch.allclose(heads[0], heads[2])
    std = model.config.initializer_range
    assert 0.7 * std < float(heads[0].std()) < 1.3 * std
    # the base weights are the checkpoint's, untouched
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.testing.assert_close(model.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    # without head_seed: transformers' draw from the global RNG
    torch.manual_seed(123)
    other = modeling.load_model(args, task="seq_cls", num_labels=1, training=False).score.weight
    assert not torch.allclose(other, heads[0])


def test_load_tokenizer_sets_pad_and_right_padding(tiny_llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path / "tok")
    loaded = modeling.load_tokenizer(model_args(model_name_or_path=tiny_llama, tokenizer_name_or_path=str(
        tmp_path / "tok")))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "right"


def test_missing_local_dir_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope") as err:
        modeling.load_model(model_args(model_name_or_path=missing))
    assert "make smollm2" not in str(err.value)
    smol = str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match="make smollm2"):
        modeling.load_tokenizer(model_args(model_name_or_path=smol))
    # a relative path under an existing folder is a path, not a hub name
    os.makedirs(tmp_path / "runs")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(FileNotFoundError, match="runs/sft"):
            modeling.load_model(model_args(model_name_or_path="runs/sft"))
    finally:
        os.chdir(cwd)
    modeling.check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub names are transformers' business


# ---------------------------------------------------------------------------------------------- GGUF conversion


@pytest.mark.slow
def test_convert_gguf_matches_gguf_model(tmp_path):
    """SmolLM2's GGUF -> bf16 safetensors directory: same logits as the GGUF loaded directly, loads in fp32,
    chat template and generation config kept, a second call is a no-op."""
    from align.paths import smollm2_gguf

    gguf = smollm2_gguf()
    out = str(tmp_path / "smollm2")
    assert convert.convert_gguf(gguf, out) == out
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", convert.MARKER} <= set(
        os.listdir(out))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template and "<|im_start|>" in tok.chat_template
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert converted.dtype == torch.float32
    assert not hasattr(converted.config, "quantization_config")
    assert converted.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    with open(os.path.join(out, "config.json")) as fh:
        assert '"dtype": "bfloat16"' in fh.read()

    direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                  dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a, b = direct(ids).logits, converted(ids).logits
    rel = (a - b).abs().max().item() / a.abs().max().item()
    assert rel < 1e-2, rel  # bf16 storage of the dequantized weights
    assert torch.equal(a.argmax(-1), b.argmax(-1)) or (a.argmax(-1) != b.argmax(-1)).float().mean() < 0.1
    assert "paris" in convert.chat_answer(converted, tok, "What is the capital of France?").lower()

    stamp = os.path.getmtime(os.path.join(out, "model.safetensors"))
    convert.convert_gguf(gguf, out)  # already converted: skipped
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == stamp


def test_convert_refuses_unfinished_output_and_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert.convert_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "partial.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="force"):
        convert.convert_gguf(str(fake), str(tmp_path / "out"))


def test_publish_dir_replaces_atomically(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "out.tmp-1"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    with pytest.raises(FileExistsError):
        convert.publish_dir(str(tmp), str(out))
    convert.publish_dir(str(tmp), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
