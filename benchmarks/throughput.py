"""Training throughput and peak memory: stock TRL + PEFT against align's fast path, side by side, same GPU.

    python benchmarks/throughput.py --cases sft_lora,sft_qlora,dpo_lora --shapes 1b --steps 10 --warmup 3 \
        --out benchmarks/results
    python benchmarks/throughput.py --runs 1b:sft_lora,1b:sft_qlora,1b:dpo_lora,8b:sft_qlora --out benchmarks/results
    python benchmarks/throughput.py --shapes tiny --cases sft_lora,dpo_lora --steps 2 --warmup 1 --out /tmp/x  # CPU

Every (shape, case, path) runs in its own process (this script with `--worker`), so one path's allocations, compiled
code or monkey patches never reach the other. A worker builds a random-initialised model of the shape's config on
the device (no download; QLoRA quantizes its linear layers to NF4 with double quantization), random tokens, and runs
`warmup + steps` optimizer steps through the real trainer:

- `stock`: TRL's `SFTTrainer` / `DPOTrainer` given the model and a PEFT `LoraConfig`, TRL's defaults otherwise.
  DPO's reference is the base with the adapter disabled. `stock_liger`: the same with TRL's `use_liger_kernel`.
- `align`: the model and adapter set up by align's own functions (k-bit preparation, `attach_trainable_adapter`)
  and align's trainer classes with `--align_options` (default `auto`, see align/speed.py); `align_<name>`: the
  same with the options of `--align_variants name=opts;...` (ablations).

Both paths get the same data in the same order, LoRA r=16 alpha=32 dropout 0 on every linear layer, bf16, the same
optimizer, learning rate and gradient checkpointing setting (off unless `--gradient_checkpointing`). Measured over
the timed steps: tokens/s (SFT: the batch's tokens, no padding counted; DPO: prompt+chosen plus prompt+rejected
tokens of each pair, i.e. what a stock step pushes through the policy), step time, peak GPU memory
(`max_memory_allocated` and `max_memory_reserved` from the start of training, weights included), and the loss of
every step (compared between the paths). Writes `<out>/throughput_<gpu>.json` (merged with earlier runs there) and
`<out>/throughput_<gpu>.md` with the align/stock ratios.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072, rms_norm_eps=1e-5)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                max_position_embeddings=131072, rms_norm_eps=1e-5)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=False, max_position_embeddings=1024)
# per shape: model config, SFT batch x length, DPO pairs per batch and prompt / completion lengths
SHAPES = {
    "tiny": dict(config=TINY, batch=2, seq=64, pairs=2, prompt=32, completion=32),
    # Llama-3.2-1B's 16 layers at tiny widths: on a CPU a step's time is then mostly the host's (Python, dispatch),
    # the part a GPU waits for when it is idle
    "host1b": dict(config=dict(TINY, num_hidden_layers=16), batch=4, seq=64, pairs=4, prompt=32, completion=32),
    # SmolLM2-135M's shape, sized for a CPU run (its vocabulary head is a fifth of the model)
    "smollm2": dict(config=SMOLLM2_135M, batch=2, seq=512, pairs=2, prompt=256, completion=256),
    "1b": dict(config=LLAMA_1B, batch=4, seq=2048, pairs=4, prompt=1024, completion=1024),
    "8b": dict(config=LLAMA_8B, batch=2, seq=2048, pairs=2, prompt=1024, completion=1024),
}
CASES = ("sft_lora", "sft_qlora", "dpo_lora", "dpo_qlora", "rm_lora")  # rm: a reward model on the DPO pairs
GOALS = {"speedup": 2.0, "sft_memory": 0.6, "dpo_memory_vs_sft": 1.1, "limit_share_8b": 0.7}
# issue 6's arithmetic limit of a LoRA step: ~790 TFLOP/s of dense bf16 on an H100 (the H200 has the same tensor cores)
PEAK_TFLOPS = {"h100": 790.0, "h200": 790.0}


def flops_per_token(config: dict, seq: int) -> float:
    """Issue 6's count of a LoRA step's FLOPs per token: 4 x parameters (a forward and an input-gradient pass through
    every weight, frozen weights get no weight gradient; the embedding counted as the issue does) plus attention,
    counted without the causal half: 4 * seq * width FLOPs a layer in the forward (QK^T and PV) and twice that in
    the backward. Llama-3.1-8B at 2048 tokens: 32.1 + 3.2 GFLOP, so ~22,350 tokens/s at 790 TFLOP/s, the issue's
    "about 22,000 tokens/s once attention is counted"."""
    d, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = d * (d + 2 * kv + d) + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two norms
    params = (config["vocab_size"] * d * (1 if config.get("tie_word_embeddings") else 2) + layers * per_layer + d)
    return 4.0 * params + 12.0 * seq * d * layers


def arithmetic_limit(run: dict) -> float | None:
    """Tokens/s at the GPU's peak for a fixed-length run of a named shape (None elsewhere: other GPUs, real-length
    data, or a batch that is not the shape's)."""
    shape, peak = SHAPES.get(run["shape"]), PEAK_TFLOPS.get(gpu_tag(run.get("device", "")))
    if shape is None or peak is None or run.get("data", "fixed") != "fixed":
        return None
    sft = run["case"].startswith("sft")
    seq = shape["seq"] if sft else shape["prompt"] + shape["completion"]
    expected = shape["batch"] * seq if sft else 2 * shape["pairs"] * seq
    if any(n != expected for n in run.get("tokens_per_step") or [expected]):
        return None
    return peak * 1e12 / flops_per_token(shape["config"], seq)


# --- worker: one path of one case, in its own process ---------------------------------------------------------

def word_tokenizer(vocab_size: int):
    """A word-level tokenizer: ids 0, 1, 2 are `<pad>`, `<eos>`, `<unk>`, and `w3 .. w{V-1}` the rest, so a text of N
    words is exactly N tokens. (Special tokens are matched inside words before the split: named `t0`..`t2` with
    words `t3`..., they cut every word that starts with them, `t1xx` into `t1` + `xx`, and texts came out ~40%
    longer than their word counts: DPO rows were then truncated to `max_length` with prompt-heavy pairs.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def lengths(rng, n: int, longest: int, real: bool, median: float) -> list[int]:
    """`n` lengths: all `longest`, or (real) log-normal around `median`, clipped to [16, longest]."""
    if not real:
        return [longest] * n
    return [int(min(longest, max(16, rng.lognormvariate(math.log(median), 0.8)))) for _ in range(n)]


def make_data(spec: dict, vocab: int):
    """Random-token rows: SFT `input_ids`; DPO and RM `prompt/chosen/rejected` texts of the word tokenizer."""
    import random

    from datasets import Dataset

    rng = random.Random(spec["seed"])
    shape, rows = spec["shape_cfg"], spec["rows"]
    words = lambda n: [f"w{rng.randrange(3, vocab)}" for _ in range(n)]
    if spec["case"].startswith("sft"):
        lens = lengths(rng, rows, shape["seq"], spec["data"] == "real", shape["seq"] / 3)
        return Dataset.from_list([{"input_ids": [rng.randrange(3, vocab) for _ in range(n)]} for n in lens])
    p_lens = lengths(rng, rows, shape["prompt"], spec["data"] == "real", shape["prompt"] / 3)
    out = []
    for p in p_lens:
        c, r = lengths(rng, 2, shape["completion"], spec["data"] == "real", shape["completion"] / 3)
        out.append({"prompt": " ".join(words(p)) + " ", "chosen": " ".join(words(c - 1) + ["<eos>"]),
                    "rejected": " ".join(words(r - 1) + ["<eos>"])})
    return Dataset.from_list(out)


def quantize_nf4(model, compute_dtype):
    """Replace the decoder's linear layers with bitsandbytes NF4 layers (double quantization), as loading with
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` does."""
    import bitsandbytes as bnb
    import torch

    layers = model.get_decoder().layers
    for layer in layers:
        for name, lin in list(layer.named_modules()):
            if type(lin) is not torch.nn.Linear:
                continue
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4").to(lin.weight.device)
            if lin.bias is not None:
                new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.rsplit(".", 1)[-1], new)
    model.is_loaded_in_4bit = True
    return model


def build_model(spec: dict, device):
    import torch
    import transformers

    torch.manual_seed(spec["seed"])
    cfg = transformers.LlamaConfig(**spec["shape_cfg"]["config"], pad_token_id=0, eos_token_id=1, bos_token_id=1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    auto = transformers.AutoModelForCausalLM
    if spec["case"].startswith("rm"):  # a one-score head (num_labels 1), as TRL's RewardTrainer loads it
        auto, cfg.num_labels = transformers.AutoModelForSequenceClassification, 1
    with device:
        model = auto.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if spec["case"].endswith("qlora"):
        quantize_nf4(model, torch.bfloat16)
    return model


def lora_kwargs(spec):
    return dict(r=16, lora_alpha=32, lora_dropout=spec.get("lora_dropout", 0.0), target_modules="all-linear",
                task_type=task_type(spec))


def stage(spec) -> str:
    return spec["case"].split("_")[0]


def task_type(spec) -> str:
    return "SEQ_CLS" if stage(spec) == "rm" else "CAUSAL_LM"  # SEQ_CLS: PEFT trains and saves the score head


def trainer_args(spec: dict, out: str, cuda: bool):
    from align import config

    pairs = stage(spec) != "sft"
    shape = spec["shape_cfg"]
    common = dict(
        output_dir=out, max_steps=spec["warmup"] + spec["steps"] + spec.get("profile_steps", 0) + bool(spec.get("memory_step")), per_device_train_batch_size=shape[
            "pairs" if pairs else "batch"], gradient_accumulation_steps=1, learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, save_strategy="no", report_to="none",
        # window timing: one log line at the end of the timed steps (a log line reads the loss on the host)
        logging_steps=spec["warmup"] + spec["steps"] if spec.get("timing") == "window" else 1,
        bf16=cuda, use_cpu=not cuda, gradient_checkpointing=spec["gradient_checkpointing"], seed=spec["seed"],
        data_seed=spec["seed"], disable_tqdm=True, dataloader_num_workers=0, eval_strategy="no",
        use_liger_kernel=spec["path"] == "stock_liger",
    )
    if stage(spec) == "dpo":
        return config.DPOArguments(max_length=shape["prompt"] + shape["completion"], beta=0.1, **common)
    if stage(spec) == "rm":
        return config.RewardArguments(max_length=shape["prompt"] + shape["completion"], **common)
    cls = config.SFTConfig if spec["path"].startswith("stock") else config.SFTArguments
    return cls(max_length=shape["seq"], assistant_only_loss=False, **common)


class Meter:
    """Trainer callback: synchronized step times, peak memory from the start of training, tokens per step (counted
    by a wrapper around the trainer's collator: one batch per step, no gradient accumulation).

    `window=(w, last)`: the GPU is synchronized only at the end of steps w and last (the timed window), so the
    host may run ahead of the GPU as in a real run; per-step times are then host times and only the window's
    tokens/s is a measurement."""

    def __init__(self, torch, cuda, window: tuple[int, int] | None = None):
        self.torch, self.cuda, self.window = torch, cuda, window
        self.begin, self.end, self.batch_tokens = [], [], []

    def count(self, collate, stage: str, rows: int | None = None):
        """`collate`, counting the tokens of each batch of `rows` examples: with `passes_per_batch` the trainer's
        collator also collates each pass's part of the batch (fewer examples), not counted again."""
        def counted(examples):
            batch = collate(examples)
            if rows and len(examples) < rows:  # a pass's part of a batch already counted
                return batch
            if stage == "sft":
                n = sum(len(e["input_ids"]) for e in examples)
            else:  # the tokens of TRL's padded pair rows (prompt + chosen, prompt + rejected), after any truncation
                n = int(batch["attention_mask"].sum())
            self.batch_tokens.append(n)
            return batch

        return counted

    def _sync(self, edge: bool = True):
        """The host clock, after the GPU has caught up when `edge` (every step, or only the window's ends)."""
        if self.cuda and edge:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if meter.cuda:
                    meter.torch.cuda.empty_cache()
                    meter.torch.cuda.reset_peak_memory_stats()
                meter.start = meter._sync()

            def on_step_begin(self, args, state, control, **kw):
                meter.begin.append(meter._sync(meter.window is None))

            def on_step_end(self, args, state, control, **kw):
                meter.end.append(meter._sync(meter.window is None or state.global_step in meter.window))

        return _CB()


def grad_sketch_callback(torch, out: dict, k: int = 32):
    """A trainer callback that keeps, at the first optimizer step, a `k`-number sketch of every trainable
    parameter's gradient (its dot products with `k` fixed Gaussian vectors seeded by the parameter's name) in `out`,
    as base64 of float32 (one JSON line per parameter). The same gradient gives the same sketch on every path, so
    `compare` can set two paths' step-1 gradients side by side as cosines without either process writing them
    whole. Both paths start from the same weights and batch; gradient clipping scales all gradients alike."""
    import zlib

    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if state.global_step or out:
                return
            for name, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    g = p.grad.detach().float().flatten()
                    gen = torch.Generator(g.device).manual_seed(zlib.crc32(name.encode()))
                    out[name] = pack_floats((torch.randn(k, g.numel(), generator=gen, device=g.device) @ g).tolist())

    return _CB()


def pack_floats(values) -> str:
    """Numbers as base64 of little-endian float32: one short JSON string instead of a line per number."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def unpack_floats(text: str) -> tuple:
    raw = base64.b64decode(text)
    return struct.unpack(f"<{len(raw) // 4}f", raw)


def grad_cosines(a: dict, b: dict) -> dict:
    """Per parameter, the cosine of two runs' gradient sketches (`grad_sketch_callback`); parameters whose gradient
    is zero on both runs (LoRA A at step 1, where B is zero) are left out, zero on one run only counts as 0."""
    cos = {}
    for name in a.keys() & b.keys():
        x, y = unpack_floats(a[name]), unpack_floats(b[name])
        nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
        if nx == ny == 0:
            continue
        cos[name] = sum(u * v for u, v in zip(x, y)) / (nx * ny) if nx and ny else 0.0
    return cos


def inductor_config(text: str) -> dict:
    """`key=value,key=value` (values Python literals) as a dict of torch._inductor.config keys."""
    import ast

    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"inductor config {item!r}: expected key=value")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def apply_inductor_config(config: dict) -> None:
    """Set torch._inductor.config keys (dotted for sub-configs, e.g. triton.cudagraphs); keys starting `dynamo.`
    or `functorch.` set torch._dynamo.config / torch._functorch.config ones, and `align.` ones a module constant of
    align (e.g. align.fused_lora.COMPILED_ACCUMULATE='op'). An unknown key is an error."""
    import torch._dynamo.config as dynamo
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    import align

    roots = {"dynamo": dynamo, "functorch": functorch, "align": align}  # align.<module>.<NAME>: align's own switches
    for key, value in config.items():
        *parents, name = key.split(".")
        target = roots[parents.pop(0)] if parents and parents[0] in roots else inductor
        try:
            for p in parents:
                target = getattr(target, p) if hasattr(target, p) else importlib.import_module(f"{target.__name__}.{p}")
        except ImportError:
            target = None
        if not hasattr(target, name):
            raise ValueError(f"no config key {key!r} (torch._inductor.config, or dynamo. / functorch. ones)")
        setattr(target, name, value)


def worker(spec: dict) -> dict:
    import torch
    import transformers
    import trl

    sys.path.insert(0, spec.get("align_src") or REPO)  # --align_src: another checkout's align (A/B runs)
    from align import speed

    apply_inductor_config(spec.get("inductor") or {})
    if spec.get("fill_uninitialized"):  # new tensors' memory filled with NaN: a read of unwritten memory shows
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if spec.get("cpu_varlen") and not cuda:  # a CPU stand-in of the GPU's flash-varlen attention (align.testing)
        from align.testing import use_cpu_varlen

        use_cpu_varlen()
    t0 = time.perf_counter()
    shape = spec["shape_cfg"]
    tok = word_tokenizer(shape["config"]["vocab_size"])
    data = make_data(spec, shape["config"]["vocab_size"])
    model = build_model(spec, device)
    build_s = time.perf_counter() - t0
    dpo, kind = spec["case"].startswith("dpo"), stage(spec)
    out = tempfile.mkdtemp(prefix="throughput-")
    args = trainer_args(spec, out, cuda)
    options, budget = (), None
    if spec["path"].startswith("stock"):
        from peft import LoraConfig

        cls = {"dpo": trl.DPOTrainer, "rm": trl.RewardTrainer, "sft": trl.SFTTrainer}[kind]
        kwargs = dict(ref_model=None) if dpo else {}
        torch.manual_seed(spec["seed"])  # the LoRA A initialisation, the same on both paths
        trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok,
                      peft_config=LoraConfig(**lora_kwargs(spec)), **kwargs)
    else:
        from align import config, modeling, stacking, training

        model_args = config.ModelArguments(use_peft=True, lora_r=16, lora_alpha=32,
                                           lora_dropout=spec.get("lora_dropout", 0.0),
                                           lora_target_modules=["all-linear"], lora_task_type=task_type(spec),
                                           load_in_4bit=spec["case"].endswith("qlora"))
        options = speed.resolve(spec["align_options"], stage=kind, model_args=model_args)
        if model_args.load_in_4bit:  # what align's load_model does after loading a 4-bit base
            model = modeling.prepare_for_kbit_training(model, modeling.quantization_config(model_args))
        model = speed.prepare_model(model, options)
        torch.manual_seed(spec["seed"])
        model = stacking.attach_trainable_adapter(model, model_args)
        training.mark_base_frozen(model)
        speed.prepare_args(args, options, stage=kind)
        if kind == "rm":
            from align.rm import AlignRewardTrainer as cls

            trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok)
        elif dpo:
            from align.dpo import AlignDPOTrainer as cls

            trainer = cls(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok)
        else:
            from align.sft import AlignSFTTrainer as cls

            trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok)
        budget = spec.get("lean_memory_budget")
        passes = {"passes_per_batch": spec["passes_per_batch"]} if spec.get("passes_per_batch") else {}
        speed.finish(trainer, options, *([budget] if budget else []), **passes)  # an --align_src checkout may lack
        # the later arguments
        if "lean" in options:  # the budget the stage used (an --align_src checkout may not record it)
            budget = getattr(trainer, "align_lean_memory_budget", None) or (
                speed.lean_budget(trainer, budget) if hasattr(speed, "lean_budget") else budget)
    step_bits = None
    if spec.get("step_bits") in ("record", "light"):  # the first two forwards (DPO: step 1's reference and policy) kept
        from benchmarks.dpo_step_bits import recorder

        step_bits = recorder(trainer, light=spec["step_bits"] == "light")
    elif spec.get("step_bits"):  # benchmarks/dpo_step_bits.py: the first step's forwards, bit for bit
        from benchmarks.dpo_step_bits import trace

        return trace(trainer, torch, train=spec["step_bits"] == "train")
    window = spec.get("timing") == "window"
    meter = Meter(torch, cuda, (spec["warmup"], spec["warmup"] + spec["steps"]) if window else None)
    trainer.data_collator = meter.count(trainer.data_collator, kind,
                                        rows=shape["pairs" if kind in ("dpo", "rm") else "batch"])
    trainer.add_callback(meter.callback())
    profiler = StepProfiler(torch, cuda, first=spec["warmup"] + spec["steps"], steps=spec.get("profile_steps", 0),
                            stack=spec.get("profile_stack", False))
    if profiler.steps:
        trainer.add_callback(profiler.callback())
    sketch = {}
    trainer.add_callback(grad_sketch_callback(torch, sketch))
    memory = {}
    if spec.get("memory_step"):  # the step after the timed (and profiled) ones
        trainer.add_callback(memory_step_callback(torch, spec["warmup"] + spec["steps"] + profiler.steps, memory,
                                                  cuda))
    setup_s = time.perf_counter() - t0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    w, n = spec["warmup"], spec["steps"]
    step_s = [e - b for b, e in zip(meter.begin, meter.end)]
    tokens = meter.batch_tokens[: w + n]
    timed_tokens = sum(tokens[w:])
    timed_s = meter.end[w + n - 1] - meter.end[w - 1] if w > 0 else meter.end[w + n - 1] - meter.start
    gib = 1024**3
    return dict(
        path=spec["path"], lean_memory_budget=budget, options=list(options) if spec["path"].startswith("align") else (
            ["use_liger_kernel"] if spec["path"] == "stock_liger" else []),
        inductor=spec.get("inductor") or None, passes_per_batch=getattr(trainer, "passes_per_batch", None),
        tokens_per_s=timed_tokens / timed_s, step_s_mean=sum(step_s[w:w + n]) / max(1, len(step_s[w:w + n])),
        tokens_per_step=tokens, step_s=step_s, losses=losses,
        first_log=next((h for h in trainer.state.log_history if "loss" in h), None),  # DPO: step 1's rewards, logps
        peak_allocated_gib=torch.cuda.max_memory_allocated() / gib if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / gib if cuda else None,
        build_s=build_s, setup_s=setup_s, warmup_s=(meter.end[w - 1] - meter.start) if w > 0 else 0.0,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
                      peft=__import__("peft").__version__),
        profile=profiler.summary(meter) if profiler.steps else None,
        memory_step=memory or None,
        grad_sketch=sketch or None,
        dynamo=_dynamo_counters(),
        step_bits=_step_bits(step_bits),
    )


def _step_bits(passes) -> dict | None:
    """The first two recorded forwards compared (`--step_bits`), None when not recorded."""
    if passes is None or len(passes) < 2:
        return None
    from benchmarks.dpo_step_bits import diff

    return diff(passes[0], passes[1])


def _dynamo_counters() -> dict:
    """torch.compile's counters: graphs compiled, recompilations and graph breaks (by reason)."""
    from torch._dynamo.utils import counters

    return {k: dict(counters[k]) for k in ("stats", "graph_break", "recompiles") if counters.get(k)}


# Kernel names (CUDA) or op names (CPU) -> where the time goes. First match wins.
PROFILE_CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa"),
    ("gemm", r"gemm|xmma|nvjet|cutlass|cublas|matmul|aten::mm|aten::addmm|aten::bmm|aten::linear"),
    ("nccl", r"nccl"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("copy", r"memcpy|memset|copy_|aten::to\b|_to_copy"),
    ("compiled (triton)", r"triton"),
    ("4-bit dequantize", r"dequant|kgemm_4bit|bnb"),
    ("elementwise / reduce", r"elementwise|vectorized|reduce|unrolled|softmax|norm|silu|mul|add|cat|index|rsqrt|pow|mean"),
)


def memory_step_callback(torch, step: int, out: dict, cuda: bool = True):
    """A trainer callback that records the allocations of optimizer step `step` (0-based) into `out`
    (`memory_peak.summarize`: the step's peak and what holds it): the CUDA allocator's history, or on a CPU the
    profiler's allocation events (`memory_peak.CpuRecorder`)."""
    import memory_peak
    from transformers import TrainerCallback

    rec = memory_peak.Recorder(torch) if cuda else None

    class _CB(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            nonlocal rec
            if state.global_step == step and not out:
                rec = rec or memory_peak.CpuRecorder(torch, track=[m for m in (model, optimizer) if m is not None])
                rec.start()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step + 1 and not out:
                out.update(rec.stop())

    return _CB()


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after the first `first` (warm-up): time per category of
    kernels (op names on a CPU), the top kernels, and the GPU-idle share of the wall time (kernel time summed,
    so overlapping streams can read above 100%)."""

    def __init__(self, torch, cuda, first: int, steps: int, stack: bool = False):
        self.torch, self.cuda, self.first, self.steps, self.stack = torch, cuda, first, steps, stack
        self.prof, self.done, self.gaps = None, False, None

    def callback(self):
        from transformers import TrainerCallback

        me = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == me.first and me.prof is None:
                    acts = [me.torch.profiler.ProfilerActivity.CPU]
                    if me.cuda:
                        acts.append(me.torch.profiler.ProfilerActivity.CUDA)
                    me.prof = me.torch.profiler.profile(activities=acts, with_stack=me.stack)
                    me.prof.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if me.prof is not None and not me.done and state.global_step >= me.first + me.steps:
                    if me.cuda:
                        me.torch.cuda.synchronize()
                    me.prof.__exit__(None, None, None)
                    me.done = True
                    if me.cuda:  # the GPU's span, idle gaps and kernel count (with stacks: charged to the frames)
                        from profile_gaps import analyze

                        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
                            me.prof.export_chrome_trace(fh.name)
                            me.gaps = analyze(fh.name, steps=me.steps)

        return _CB()

    def summary(self, meter) -> dict | None:
        import re

        if not self.done:
            return None
        per_cat, top = {}, []
        for e in self.prof.key_averages():
            if self.cuda:
                if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                    continue
                us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            else:
                us = e.self_cpu_time_total
            if not us:
                continue
            name = e.key
            cat = next((c for c, rx in PROFILE_CATEGORIES if re.search(rx, name, re.IGNORECASE)), "other")
            per_cat[cat] = per_cat.get(cat, 0.0) + us / 1000 / self.steps
            top.append((us / 1000 / self.steps, e.count // self.steps, cat, name[:120]))
        top.sort(reverse=True)
        wall = sum(e - b for b, e in zip(meter.begin[self.first:self.first + self.steps],
                                         meter.end[self.first:self.first + self.steps])) * 1000 / self.steps
        busy = sum(per_cat.values())
        return {"steps": self.steps, "wall_ms_per_step": wall, "busy_ms_per_step": busy,
                "idle_share": max(0.0, 1 - busy / wall) if wall else None, "unit": "kernel" if self.cuda else "cpu op",
                "ms_per_step": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
                "top": [dict(ms_per_step=t[0], calls_per_step=t[1], category=t[2], name=t[3]) for t in top[:40]],
                "gaps": self.gaps}


# --- driver ---------------------------------------------------------------------------------------------------

def run_worker(spec: dict, timeout: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        result_path = fh.name
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--result", result_path]
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, check=False)
        tail = (proc.stdout + proc.stderr)[-3000:]
        if os.environ.get("THROUGHPUT_WORKER_LOG"):  # the worker's whole output kept (e.g. under TORCH_LOGS)
            with open(os.environ["THROUGHPUT_WORKER_LOG"], "a") as log:
                log.write(f"=== {spec['shape']}:{spec['case']}:{spec['path']}\n{proc.stdout}{proc.stderr}")
        with open(result_path) as fh:
            result = json.load(fh) if os.path.getsize(result_path) else {"error": f"exit {proc.returncode}: {tail}"}
        if proc.returncode and "error" not in result:
            result["error"] = f"exit {proc.returncode}: {tail}"
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout} s"}
    finally:
        os.unlink(result_path)
    result.update(shape=spec["shape"], case=spec["case"], wall_s=round(time.time() - started, 1),
                  data=spec["data"], path=spec["path"], rows=spec["rows"])
    if spec.get("timing") == "window":
        result["timing"] = "window"
    if spec.get("lora_dropout"):
        result["lora_dropout"] = spec["lora_dropout"]
    return result


def key(r, **kw):
    """shape:case:path:data, :window for runs timed without a sync per step (`--timing window`) and :dropoutP for
    runs with LoRA dropout P (`--lora_dropout`)."""
    r = {**r, **kw}
    timing = ":window" if r.get("timing") == "window" else ""
    dropout = f":dropout{r['lora_dropout']:g}" if r.get("lora_dropout") else ""
    return f"{r['shape']}:{r['case']}:{r['path']}:{r.get('data', 'fixed')}{timing}{dropout}"


def merge_runs(sources: list[list[dict]]) -> list[dict]:
    """The runs of several result files, later ones replacing earlier ones of the same key. A later stock run of a
    case also drops the earlier runs of that case, which were measured against another stock run: every row of
    the merged table compares paths of the same call (the dropped runs stay in their own call's file)."""
    merged = {}
    for runs in sources:
        restocked = {key(r, path="") for r in runs if r["path"] == "stock"}
        merged = {k: r for k, r in merged.items() if key(r, path="") not in restocked}
        merged.update({key(r): r for r in runs})
    return list(merged.values())


def run_passes(run: dict) -> int:
    """The passes each batch of a run went through (`passes_per_batch`; Call34 set it as a class attribute)."""
    return int(run.get("passes_per_batch") or (run.get("inductor") or {}).get(
        "align.batch_passes.BatchPasses.passes_per_batch") or 1)


def compare(runs: list[dict]) -> list[dict]:
    """One row per (shape, case, data, path other than stock): ratios to stock and the largest loss difference."""
    by = {key(r): r for r in runs}
    rows = []
    for r in sorted(runs, key=lambda r: (r["shape"], r["case"], r.get("data", "fixed"), r.get("timing", "step"),
                                          r["path"])):
        if r["path"] == "stock":
            continue
        data = r.get("data", "fixed")
        stock = by.get(key(r, path="stock"))
        row = dict(shape=r["shape"], case=r["case"], data=data, timing=r.get("timing", "step"), path=r["path"],
                   lora_dropout=r.get("lora_dropout", 0.0),
                   options=[f"lean@{r['lean_memory_budget']:g}" if o == "lean" and r.get("lean_memory_budget")
                            else o for o in r.get("options") or []] + (
                       [f"passes={run_passes(r)}"] if run_passes(r) > 1 else []),
                   stock=_summary(stock), other=_summary(r))
        if stock and "error" not in stock and "error" not in r:
            row["speedup"] = r["tokens_per_s"] / stock["tokens_per_s"]
            if r.get("peak_allocated_gib"):
                row["memory_ratio"] = r["peak_allocated_gib"] / stock["peak_allocated_gib"]
            limit = arithmetic_limit(r)
            if limit:
                row["limit_tokens_per_s"], row["limit_share"] = limit, r["tokens_per_s"] / limit
            # losses are comparable when both saw the same rows (the data depend on the number of steps)
            if _rows(r) == _rows(stock):
                pairs = list(zip(r["losses"], stock["losses"]))
                row["loss_max_abs_diff"] = max((abs(a - b) for a, b in pairs), default=None)
                row["first_loss_abs_diff"] = abs(pairs[0][0] - pairs[0][1]) if pairs else None
                a, b = r.get("grad_sketch") or {}, stock.get("grad_sketch") or {}
                cos = grad_cosines(a, b) if a.keys() == b.keys() else {}  # the same parameter names on both paths
                if cos:
                    row["grad_cosine_min"], row["grad_cosine_params"] = min(cos.values()), len(cos)
        if r["case"].startswith("dpo"):  # against the SFT step of the same shape on the same path
            sft_case = f"sft_{r['case'][4:]}"
            sft = by.get(key(r, case=sft_case))
            plain = by.get(key(r, path="align"))
            if sft is None and plain and r["path"].startswith("align_") and plain.get("options") == r.get("options"):
                sft = by.get(key(r, path="align", case=sft_case))  # a lean-budget variant of align: align's SFT
            if sft and "error" not in sft and "error" not in r and sft.get("peak_allocated_gib"):
                row["dpo_memory_vs_sft"] = r["peak_allocated_gib"] / sft["peak_allocated_gib"]
        rows.append(row)
    return rows


def median_run(repeats: list[dict]) -> dict:
    """One path's repeats as one run: the repeat with the median tokens/s (its losses, memory and profile), with
    every repeat's tokens/s and the spread ((max - min) / median) recorded; a failed repeat fails the run."""
    if len(repeats) == 1:
        return repeats[0]
    failed = next((r for r in repeats if "error" in r), None)
    if failed:
        return failed
    ordered = sorted(repeats, key=lambda r: r["tokens_per_s"])
    run = dict(ordered[(len(ordered) - 1) // 2])
    values = [r["tokens_per_s"] for r in repeats]
    run.update(repeats_tokens_per_s=values, repeat_spread=(max(values) - min(values)) / run["tokens_per_s"],
               wall_s=round(sum(r["wall_s"] for r in repeats), 1))
    return run


def _rows(r):
    """Rows of the run's data: recorded, else implied by its number of logged steps (one batch per step)."""
    return r.get("rows") or len(r.get("losses", []))


def _summary(r):
    if r is None:
        return None
    if "error" in r:
        return {"error": r["error"][-500:]}
    return {k: r.get(k) for k in ("tokens_per_s", "step_s_mean", "peak_allocated_gib", "peak_reserved_gib",
                                  "repeats_tokens_per_s", "repeat_spread")}


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Throughput: align vs stock TRL + PEFT ({meta['device']})", "",
        *([meta["note"], ""] if meta.get("note") else []),
        (f"Versions: {meta.get('versions')}. LoRA r=16 alpha=32 on all linear layers, dropout 0 unless a row names "
         "it (the same on both paths; their masks differ, so the step-1 grad cosine falls), "
         f"{'fp32' if meta['device'] == 'cpu' else 'bf16'}, random "
         "weights and tokens, sdpa attention. Tokens/s over the timed steps (DPO: prompt+chosen and prompt+rejected "
         "tokens of each pair); peak = `torch.cuda.max_memory_allocated` (reserved in brackets) from the start of "
         f"training. Goals: tokens/s >= {GOALS['speedup']}x stock; SFT peak <= {GOALS['sft_memory']}x stock; DPO "
         f"peak <= {GOALS['dpo_memory_vs_sft']}x the SFT peak of the same shape and path (a DPO path that differs from "
         f"`align` only in its lean budget: against `align`'s SFT); 8B at >= {GOALS['limit_share_8b']:.0%} of the "
         "arithmetic limit (share of limit: tokens/s against the rate at 790 TFLOP/s of issue 6's 4 x parameters + "
         "attention FLOPs per token, `flops_per_token`; fixed-length rows on an H100 or H200). Step-1 grad cosine: "
         "the smallest, over the trainable "
         "parameters, of the cosine between this path's and stock's first-step gradients (32-number sketches of "
         "each; gradients that are zero on both paths, LoRA A at step 1, are left out); '-' where a run predates it."), "",
        ("| shape | case | data | path | stock tok/s | tok/s | speedup | stock peak GiB | peak GiB | memory ratio "
         "| DPO/SFT memory | share of limit | step-1 loss diff | max abs loss diff | step-1 grad cosine (min) | options |"),
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    def dropout(row):
        return f", LoRA dropout {row['lora_dropout']:g}" if row.get("lora_dropout") else ""

    for row in result["comparisons"]:
        s, a = row["stock"] or {"error": "not run"}, row["other"] or {}
        tps = lambda d: "error" if "error" in d else _f(d.get("tokens_per_s"), ",.0f") + (
            f" (median of {len(d['repeats_tokens_per_s'])}, spread {d['repeat_spread']:.0%})"
            if d.get("repeats_tokens_per_s") else "")
        peak = lambda d: "error" if "error" in d else (
            f"{_f(d.get('peak_allocated_gib'), '.1f')} ({_f(d.get('peak_reserved_gib'), '.1f')})")
        lines.append(
            f"| {row['shape']} | {row['case']} | {row['data']}{' (window)' if row.get('timing') == 'window' else ''}"
            f"{dropout(row)} "
            f"| {row['path']} | {tps(s)} | {tps(a)} "
            f"| {_f(row.get('speedup'), '.2f')}x | {peak(s)} | {peak(a)} | {_f(row.get('memory_ratio'), '.2f')}x "
            f"| {_f(row.get('dpo_memory_vs_sft'), '.2f')} | {_f(row.get('limit_share'), '.0%')} "
            f"| {_f(row.get('first_loss_abs_diff'), '.1e')} "
            f"| {_f(row.get('loss_max_abs_diff'), '.1e')} | {_f(row.get('grad_cosine_min'), '.4f')} "
            f"| {','.join(row.get('options') or []) or 'none'} |")
    profiled = [r for r in result["runs"] if r.get("profile")]
    if profiled:
        lines += ["", "Where a step's time goes (torch.profiler, ms per step by kernel category; idle = wall time "
                  "with no kernel running, i.e. launch / Python overhead):", ""]
        for r in profiled:
            p = r["profile"]
            cats = ", ".join(f"{c} {ms:.1f}" for c, ms in p["ms_per_step"].items())
            lines.append(f"- {key(r)}: wall {p['wall_ms_per_step']:.1f} ms, busy {p['busy_ms_per_step']:.1f} ms "
                         f"(idle {_f(p.get('idle_share'), '.0%')}): {cats}")
            g = p.get("gaps")
            if g and "kernels_per_step" in g:
                lines.append(f"  - GPU span {g['gpu_span_ms_per_step']:.1f} ms per step: idle {g['idle_ms_per_step']:.1f} "
                             f"ms in gaps over 2 us, {g['short_gaps_ms_per_step']:.1f} ms between back-to-back "
                             f"kernels; {g['kernels_per_step']:,.0f} kernels, copies and fills")
            if g and g.get("by_leaf"):
                leaves = "; ".join(f"{x['frame']} {x['ms_per_step']:.1f}" for x in g["by_leaf"][:6])
                lines.append(f"  - GPU waiting for the CPU {g['cpu_bound_idle_ms_per_step']:.1f} ms per step, issued "
                             f"from: {leaves}")
    recorded = [r for r in result["runs"] if r.get("memory_step")]
    if recorded:
        lines += ["", "What holds a step's peak (`--memory_step`: the allocator history of one step after the timed "
                  "ones; GiB live at its peak by the code that allocated them, beyond what was live before it):", ""]
        for r in recorded:
            m = r["memory_step"]
            sites = "; ".join(f"{s} {g:.2f}" for s, g in m["by_site"][:8])
            lines.append(f"- {key(r)}: peak {m['peak_gib']:.2f} GiB, {m['before_gib']:.2f} before the step: {sites}")
    errors = [r for r in result["runs"] if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {key(r)}: {r['error'][-300:]!r}" for r in errors]
    return "\n".join(lines) + "\n"


def gpu_tag(device: str) -> str:
    d = device.lower()
    for name in ("h200", "h100", "a100", "l40s", "a10g", "l4", "4090", "3090", "mi300"):
        if name in d:
            return name
    return "cpu" if d == "cpu" else "".join(c if c.isalnum() else "_" for c in d)[:24]


def _model_config(text: str) -> dict:
    """`key=value,...` (ints, floats, true/false) as a dict."""
    out = {}
    for item in filter(None, text.split(",")):
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--model_config: {item!r} is not key=value")
        out[k.strip()] = json.loads(v.lower() if v.lower() in ("true", "false") else v)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="sft_lora,sft_qlora,dpo_lora", help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--shapes", default="1b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--runs", default=None, help="explicit shape:case list, instead of cases x shapes")
    ap.add_argument("--paths", default="stock,align", help="stock, stock_liger, align, align_<name> (see variants)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--align_options", default="auto", help="align/speed.py options: auto, none or a comma list")
    ap.add_argument("--align_variants", default="", help="`name=opt,opt;name2=...`: paths align_<name> (ablations); `opts@0.3`: with lean, "
                    "that activation memory budget (default: align's per stage, speed.LEAN_BUDGET); `opts!key=value,key=value`: "
                    "torch._inductor.config keys for that path (e.g. cpp_wrapper=True; dynamo.* and functorch.* keys set "
                    "torch._dynamo.config / torch._functorch.config)")
    ap.add_argument("--data", choices=("fixed", "real"), default="fixed",
                    help="fixed: every row the shape's full length; real: log-normal lengths, so batches carry padding")
    ap.add_argument("--batch", type=int, help="SFT rows per batch (default: the shape's)")
    ap.add_argument("--pairs", type=int, help="DPO pairs per batch (default: the shape's)")
    ap.add_argument("--seq", type=int, help="SFT row length; DPO prompt and completion are half of it each")
    ap.add_argument("--model_config", default="",
                    help="`key=value,...` over the shape's model config (e.g. num_hidden_layers=2,vocab_size=32768)")
    ap.add_argument("--lr", type=float, default=2e-4, help="SFT learning rate")
    ap.add_argument("--dpo_lr", type=float, default=5e-6, help="DPO learning rate (higher makes the DPO loss jump "
                    "around on random data, and the loss comparison meaningless)")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="on for both paths (default off)")
    ap.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout on both paths (the shipped recipes "
                    "have 0.05; default 0, as issue 6 measures)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="torch.profiler over this many extra steps after the timed ones: time per kernel category, top "
                    "kernels and GPU-idle share, in the result JSON and the table (the timed steps are not profiled)")
    ap.add_argument("--profile_stack", action="store_true",
                    help="with --profile: Python stacks in the trace, and the GPU-idle gaps charged to the frames that "
                    "issued the late launches (benchmarks/profile_gaps.py)")
    ap.add_argument("--timing", choices=("step", "window"), default="step",
                    help="step: GPU synchronized around every step and a log line per step (per-step times and "
                         "losses); window: synchronized only around the timed steps and one log line, so the host "
                         "runs ahead of the GPU as in a real run (tokens/s only; loss = the mean over all steps)")
    ap.add_argument("--step_bits", nargs="?", const="record", choices=("record", "light"),
                    help="keep the first two forwards (DPO: step 1's reference and policy) and compare them bit for "
                         "bit, layer by layer (benchmarks/dpo_step_bits.py); the result's `step_bits`; `light`: only the "
                         "packed ids and the log-probabilities")
    ap.add_argument("--fill_uninitialized", action="store_true",
                    help="torch's deterministic mode with fill_uninitialized_memory: every new tensor's memory is "
                         "filled with NaN (floats) before use, so a kernel reading memory it did not write shows as "
                         "NaN (slower; a diagnosis, not a timing)")
    ap.add_argument("--align_src", default=None,
                    help="import align from this checkout instead (a before/after run: its results go to --out)")
    ap.add_argument("--memory_step", action="store_true", help="record the allocations of one more step after the "
                    "timed ones (CUDA: the allocator's history; CPU: the profiler's allocation events) and report "
                    "what holds its peak (benchmarks/memory_peak.py)")
    ap.add_argument("--cpu_varlen", action="store_true", help="on a CPU: packed rows of unequal segments (DPO, "
                    "RM) through a stand-in of the GPU's flash-varlen attention, inside the compiled layers as there "
                    "(`align.testing.cpu_varlen_attn`), instead of per-segment calls outside them")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each path, interleaved across paths; the "
                    "median (lower middle) is reported with every repeat's tokens/s and their spread")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--merge", nargs="*", default=[], help="result JSONs of earlier runs to merge into --out")
    ap.add_argument("--note", default=None, help="a sentence kept in the result's meta (how it was measured)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        try:
            result = worker(json.loads(args.worker))
        except Exception:  # noqa: BLE001  (the driver reports it and carries on with the other runs)
            result = {"error": traceback.format_exc()[-4000:]}
        with open(args.result, "w") as fh:
            json.dump(result, fh)
        return 0

    variants = dict(v.split("=", 1) for v in args.align_variants.split(";") if v.strip())
    paths = args.paths.split(",") + [f"align_{name}" for name in variants if f"align_{name}" not in args.paths]
    unknown = [p for p in paths if p not in ("stock", "stock_liger", "align") and p[len("align_"):] not in variants]
    if unknown:
        raise SystemExit(f"unknown paths {unknown}: stock, stock_liger, align, or align_<name> of --align_variants")
    pairs = ([tuple(x.split(":")) for x in args.runs.split(",")] if args.runs else
             [(s, c) for s in args.shapes.split(",") for c in args.cases.split(",")] if not args.merge else [])
    runs = []
    for shape, case in pairs:
        if shape not in SHAPES or case not in CASES:
            raise SystemExit(f"unknown shape or case {shape}:{case}; shapes {list(SHAPES)}, cases {list(CASES)}")
        shape_cfg = dict(SHAPES[shape])
        named = f"{shape}[{args.model_config}]" if args.model_config else shape  # its own rows in the results
        if args.model_config:
            shape_cfg["config"] = {**shape_cfg["config"], **_model_config(args.model_config)}
        for k in ("batch", "pairs"):
            if getattr(args, k):
                shape_cfg[k] = getattr(args, k)
        if args.seq:
            shape_cfg.update(seq=args.seq, prompt=args.seq // 2, completion=args.seq - args.seq // 2)
        rows_per_step = shape_cfg["batch" if case.startswith("sft") else "pairs"]
        repeated = {}
        for path in [p for _ in range(args.repeats) for p in paths]:  # interleaved: stock, align, stock, align...
            options = args.align_options if path == "align" else variants.get(path[len("align_"):], "none")
            options, _, inductor = options.partition("!")  # `opts!cpp_wrapper=True`: torch._inductor.config keys
            options, _, passes = options.partition("#")  # `opts#2`: passes_per_batch
            options, _, budget = options.partition("@")  # `opts@0.3`: lean's memory budget
            spec = dict(shape=named, case=case, path=path, shape_cfg=shape_cfg, steps=args.steps, warmup=args.warmup,
                        rows=rows_per_step * (args.steps + args.warmup + args.profile + args.memory_step),
                        align_options=options, data=args.data, memory_step=args.memory_step,
                        lr=args.dpo_lr if case.startswith("dpo") else args.lr,
                        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                        lora_dropout=args.lora_dropout,
                        profile_steps=args.profile, profile_stack=args.profile_stack, timing=args.timing,
                        align_src=args.align_src and os.path.abspath(args.align_src), cpu_varlen=args.cpu_varlen,
                        lean_memory_budget=float(budget) if budget else None, step_bits=args.step_bits,
                        passes_per_batch=int(passes) if passes else None,
                        fill_uninitialized=args.fill_uninitialized,
                        inductor=inductor_config(inductor))
            print(f"[throughput] {shape} {case} {path} ...", flush=True)
            r = run_worker(spec, args.timeout)
            msg = r["error"].strip().splitlines()[-1] if "error" in r else (
                f"{r['tokens_per_s']:,.0f} tok/s, peak {_f(r.get('peak_allocated_gib'), '.1f')} GiB, "
                f"losses {[round(x, 4) for x in r['losses'][:4]]}")
            print(f"[throughput] {shape} {case} {path}: {msg} ({r['wall_s']} s)", flush=True)
            repeated.setdefault(path, []).append(r)
            # written after every run, so a run cut short (a device call's time limit) keeps what it measured
            write_results(args, runs + [median_run(rs) for rs in repeated.values()], quiet=True)
        runs += [median_run(rs) for rs in repeated.values()]
    return write_results(args, runs)


def write_results(args, runs, quiet=False):
    """Merge `runs` with the earlier results in --out (and --merge files) into throughput_<gpu>.{json,md}."""
    if args.merge and not runs:
        with open(args.merge[0]) as fh:
            runs_meta = json.load(fh)["meta"]
        device, versions = runs_meta["device"], runs_meta.get("versions")
        args.note = args.note or runs_meta.get("note")  # a merge alone keeps how the runs were measured
    else:
        device = next((r["device"] for r in runs if "device" in r), "unknown")
        versions = next((r["versions"] for r in runs if "versions" in r), None)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"throughput_{gpu_tag(device)}")
    sources = []
    for earlier in ([base + ".json"] if os.path.isfile(base + ".json") else []) + args.merge:
        with open(earlier) as fh:
            sources.append(json.load(fh).get("runs", []))
    all_runs = merge_runs(sources + [runs])
    result = dict(meta=dict(device=device, versions=versions,
                            argv=sys.argv[1:], goals=GOALS, time=time.strftime("%Y-%m-%d %H:%M:%S"), note=args.note),
                  comparisons=compare(all_runs), runs=all_runs)
    for ext, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        with open(base + ext + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(base + ext + ".tmp", base + ext)
    if not quiet:
        print(markdown(result))
        print(f"[throughput] wrote {base}.json and {base}.md")
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
