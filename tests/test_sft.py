"""SFT stage on tiny random models: LoRA per architecture, full fine-tune, determinism, NaN guard."""

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from align import sft
from align.training import NonFiniteLossError

ARCHS = ["llama", "mistral", "qwen2", "gemma2", "phi3"]


def sft_argv(model, data, out, **overrides):
    args = {
        "model_name_or_path": model, "dataset_name": data, "output_dir": out, "use_peft": "true",
        "lora_r": "8", "lora_alpha": "16", "lora_dropout": "0.0", "max_steps": "12",
        "per_device_train_batch_size": "4", "per_device_eval_batch_size": "4", "learning_rate": "3e-2",
        "logging_steps": "1", "save_strategy": "no", "report_to": "none", "bf16": "false",
        "gradient_checkpointing": "false", "dtype": "float32", "max_length": "128", "eval_split_size": "8",
        "eval_strategy": "no", "seed": "0", "disable_tqdm": "true", "warmup_steps": "0",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", v]
    return argv


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def base_state(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


def sample_batch(tokenizer):
    msgs = [{"role": "user", "content": "Reverse: red green blue lamp"}, {"role": "assistant", "content": "lamp blue"}]
    ids = tokenizer.apply_chat_template(msgs, return_tensors="pt", return_dict=True)
    return ids["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_lora_trains_only_the_adapter(arch, tiny_model_factory, chat_jsonl, tokenizer, tmp_path):
    base_dir = tiny_model_factory(arch)
    out = str(tmp_path / "out")
    trainer = sft.main(sft_argv(base_dir, chat_jsonl, out))

    # the loss falls
    ls = losses(trainer)
    assert len(ls) == 12
    assert sum(ls[-3:]) / 3 < ls[0] - 1.0, ls

    # every base weight is bit-identical; only adapter weights are trainable and they moved
    model = trainer.model
    base = base_state(base_dir)
    seen = 0
    for name, p in model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        if key in base:
            assert torch.equal(p.cpu(), base[key]), key
            seen += 1
    assert seen >= len(base) - 1  # all (lm_head may be tied)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # initialised at zero, so they trained

    # the saved adapter holds only adapter weights and reloads to the same logits
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    ids = sample_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sft_output_layout_and_manifest(tiny_llama, chat_jsonl, tmp_path):
    out = str(tmp_path / "out")
    sft.main(sft_argv(tiny_llama, chat_jsonl, out, save_strategy="steps", save_steps=6, eval_strategy="steps",
                      eval_steps=6, report_to="tensorboard"))
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "run.json",
                 "trainer_state.json", "train_results.json", "eval_results.json", "checkpoint-12"):
        assert os.path.exists(os.path.join(out, name)), name
    assert any(os.scandir(os.path.join(out, "runs"))) or any("tfevents" in f for _, _, fs in os.walk(out) for f in fs)
    tok_cfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    chat_template = tok_cfg.get("chat_template") or open(os.path.join(out, "chat_template.jinja")).read()
    assert "<|im_start|>" in chat_template
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["stage"] == "sft" and run["seed"] == 0
    assert run["versions"]["torch"] and run["versions"]["peft"] and run["versions"]["trl"]
    assert run["lineage"]["base_model"] == os.path.abspath(tiny_llama)
    assert run["lineage"]["quantization"]["load_in_4bit"] is False
    assert len(run["lineage"]["chat_template_sha256"]) == 64
    assert run["lineage"]["parent_adapter"] is None
    assert run["lineage"]["speedups"] == {"options": ["padding_free", "head_grad"],  # auto on a CPU
                                          "lean_memory_budget": None, "offload_gib": None,
                                          "passes_per_batch": 1}
    assert run["data"]["train"] == 56 and run["data"]["eval"] == 8
    assert run["metrics"]["eval_loss"] < run["metrics"]["before_eval_loss"]
    assert run["config"]["ModelArguments"]["lora_r"] == 8
    # speed of the run, next to its losses: tokens counted by TRL over the timed steps (after 2 warm-up steps)
    m = run["metrics"]
    assert m["train_step_s_median"] > 0
    tokens = {e["step"]: e["num_tokens"] for e in run_log(out) if "loss" in e}
    per_step = (tokens[12] - tokens[2]) / 10
    assert 0.2 < m["train_tokens_per_s"] * m["train_step_s_median"] / per_step < 5  # one step's tokens / its time


def run_log(out):
    return json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]


def test_logged_token_metrics_do_not_depend_on_the_eval_batch_size(tiny_llama, chat_jsonl, tmp_path):
    """5 held-out rows: evaluated in one batch, or in batches of 2, 2, 1, the logged token accuracy and entropy are
    the same per-token means (TRL alone averages per-batch values, so the lone row would weigh a third)."""
    trainer = sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / "out"), max_steps=3, eval_split_size=5))
    got = {}
    for batch in (5, 2):
        trainer.args.per_device_eval_batch_size = batch
        got[batch] = trainer.evaluate()
    for key in ("eval_mean_token_accuracy", "eval_entropy", "eval_loss"):
        assert got[2][key] == pytest.approx(got[5][key], abs=1e-5), key


@pytest.mark.parametrize("speedups", ["none", "padding_free"])  # token counts from the mask / the row lengths
def test_deferred_training_metrics_log_what_trl_logs_token_weighted(tiny_llama, chat_jsonl, tmp_path, monkeypatch,
                                                                    speedups):
    """Training steps queue their entropy/accuracy/token sums on the device and read them once per log line: the
    logged losses, token counts and token-weighted entropy and accuracy are those of TRL's own compute_loss."""
    from align.training import DeferredSFTMetrics

    calls = {"deferred": 0}
    real = DeferredSFTMetrics._deferred_metrics_apply

    def counted(self, model):
        used = real(self, model)
        calls["deferred"] += used
        return used

    def run(name):
        # evaluations at steps 2 and 4 fall between the log lines at 3 and 6 (their log lines come in eval mode)
        trainer = sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / name), max_steps=6, logging_steps=3,
                                    eval_strategy="steps", eval_steps=2, speedups=speedups))
        return trainer, [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]

    monkeypatch.setattr(DeferredSFTMetrics, "_deferred_metrics_apply", counted)
    trainer, deferred = run("deferred")
    assert calls["deferred"] == 6 and trainer._deferred_sums == []
    monkeypatch.setattr(DeferredSFTMetrics, "_deferred_metrics_apply", lambda self, model: False)
    _, stock = run("stock")
    assert [sorted(h) for h in deferred] == [sorted(h) for h in stock]
    assert sum("loss" in h for h in deferred) == 2 and sum("eval_loss" in h for h in deferred) >= 3
    for d, s in zip(deferred, stock):
        for key in (k for k in d if not any(t in k for t in ("runtime", "per_second", "_time"))):
            assert d[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    assert [h["num_tokens"] for h in deferred if "loss" in h][0] > 0


def test_sft_same_seed_same_adapter(tiny_llama, chat_jsonl, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sft.main(sft_argv(tiny_llama, chat_jsonl, a, max_steps=4, lora_dropout=0.1))
    sft.main(sft_argv(tiny_llama, chat_jsonl, b, max_steps=4, lora_dropout=0.1))
    wa, wb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    c = str(tmp_path / "c")
    sft.main(sft_argv(tiny_llama, chat_jsonl, c, max_steps=4, lora_dropout=0.1, seed=1))
    wc = load_file(os.path.join(c, "adapter_model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_sft_full_finetune_from_the_same_script(tiny_llama, chat_jsonl, tmp_path):
    out = str(tmp_path / "full")
    trainer = sft.main(sft_argv(tiny_llama, chat_jsonl, out, use_peft="false", learning_rate="1e-3"))
    ls = losses(trainer)
    assert sum(ls[-3:]) / 3 < ls[0] - 1.0, ls
    saved = load_file(os.path.join(out, "model.safetensors"))
    base = base_state(tiny_llama)
    changed = [k for k in base if k in saved and not torch.equal(saved[k], base[k])]
    assert len(changed) > len(base) // 2
    assert saved["model.embed_tokens.weight"].dtype == torch.float32  # fp32 master weights
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))


def test_nonfinite_loss_stops_the_run(tiny_llama, chat_jsonl, tmp_path, monkeypatch):
    """From step 3 on the embeddings turn NaN (as after a blow-up); the run must stop there with a message."""
    from align import modeling

    real_load = modeling.load_model
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        model = real_load(*args, **kwargs)

        def hook(module, inputs, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] >= 3 else output

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(modeling, "load_model", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 3"):
        sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / "nan"), eval_split_size=0))


def test_sft_qlora_adapter_merges_into_a_standalone_model(tiny_llama, chat_jsonl, tmp_path):
    """QLoRA from the SFT script, then merge into bf16 weights: the merged model reproduces the 4-bit adapter
    model's logits within the stated tolerance (5e-2 relative for bf16 storage; 1e-3 for the fp32 merge)."""
    from align.adapters import merge_adapter

    out = str(tmp_path / "qlora")
    trainer = sft.main(sft_argv(tiny_llama, chat_jsonl, out, load_in_4bit="true", use_bnb_nested_quant="true",
                                dtype="bfloat16", max_steps=6))
    assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["lineage"]["quantization"]["load_in_4bit"] and run["lineage"]["quantization"]["double_quant"]
    report = merge_adapter(out, str(tmp_path / "merged"), dtype=torch.bfloat16)
    assert report.ok and report.base_quantized
    assert report.merge_max_rel_diff < 1e-3
    assert report.max_rel_diff < 5e-2
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_forgetting_gate_records_and_fails(tiny_llama, chat_jsonl, tmp_path):
    """The recipe's gate scores the saved adapter and its base after the run; `fail` stops on a constructed drop."""
    from align.eval.gate import ForgettingError

    out = str(tmp_path / "gate")
    sft.main(sft_argv(tiny_llama, chat_jsonl, out, max_steps=2, forgetting_gate="warn", forgetting_limit=3))
    gate = json.load(open(os.path.join(out, "run.json")))["forgetting"]
    assert gate["mode"] == "warn" and gate["threshold"] == 0.02
    assert set(gate["base_scores"]) == set(gate["tuned_scores"]) and len(gate["base_scores"]) >= 5
    assert gate["exceeded"] == (gate["average_drop"] > 0.02)

    strict = str(tmp_path / "strict")  # a threshold of -1 counts any model as having forgotten
    with pytest.raises(ForgettingError):
        sft.main(sft_argv(tiny_llama, chat_jsonl, strict, max_steps=2, forgetting_gate="fail",
                          forgetting_threshold=-1.0, forgetting_limit=3))
    assert json.load(open(os.path.join(strict, "run.json")))["forgetting"]["exceeded"] is True


@pytest.mark.parametrize("speedups", ["none", "padding_free,head_grad"])
def test_passes_per_batch_give_the_one_pass_sft_update(speedups, tiny_llama, chat_jsonl, tmp_path):
    """4 samples per batch through forward and backward in 2 passes of about as many tokens each, padded or packed:
    the losses (each pass's token sum over the batch's trained-token count), gradient norms, logged token metrics
    and trained adapter of one pass, and every forward holds fewer tokens than the whole batch's. Plain SGD: Adam's
    first steps (about lr x sign(gradient)) would turn rounding-level gradient differences into lr-sized ones."""
    runs, tokens = {}, {}
    for passes in (1, 2):
        seen = []
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(args[0].numel()) if isinstance(m, torch.nn.Embedding) else None)
        try:
            runs[passes] = sft.main(sft_argv(tiny_llama, chat_jsonl, str(tmp_path / f"sft_{passes}"), max_steps=3,
                                             speedups=speedups, eval_split_size=0, optim="sgd", learning_rate=0.5,
                                             passes_per_batch=passes))
        finally:
            hook.remove()
        tokens[passes] = seen
    one, split = runs[1], runs[2]
    assert losses(split) == pytest.approx(losses(one), abs=1e-5) and len(set(losses(one))) > 1
    for key in ("grad_norm", "mean_token_accuracy", "entropy"):
        logged = [[h[key] for h in r.state.log_history if key in h and "loss" in h] for r in (one, split)]
        assert len(logged[0]) == 3 and logged[1] == pytest.approx(logged[0], rel=1e-4), key
    a, b = (load_file(os.path.join(str(tmp_path / f"sft_{p}"), "adapter_model.safetensors")) for p in (1, 2))
    assert a.keys() == b.keys() and max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
    assert len(tokens[2]) == 2 * len(tokens[1]) and max(tokens[2]) < min(tokens[1])
