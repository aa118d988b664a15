"""Every stage under every accelerate launch config: does it start, shard, train and save a usable adapter?

    python benchmarks/launch_matrix.py --out DIR [--configs single_gpu,deepspeed_zero3,...] [--stages sft,dpo,rm]
        [--num_processes 1] [--max_steps 8] [--parallel 6] [--model .cache/models/SmolLM2-135M-Instruct] [--keep]

Each (config, stage) is one `accelerate launch --config_file recipes/accelerate/<config>.yaml align/<stage>.py`
process on the stage's SmolLM2 recipe (LoRA; the `*_qlora` configs take the QLoRA recipe with
`--bnb_4bit_quant_storage bfloat16`, as their header says; no QLoRA reward-model recipe), `--max_steps` steps, a loss logged every step. Then,
in this process, for each saved adapter: align.launch.check_saved_adapter (tensors present, finite, LoRA B
trained), a load on one device with PEFT on top of a plain base (logits must differ from the base's), and the
per-step training losses against the `single_gpu` run of the same recipe (`single_gpu_qlora` for QLoRA: same
recipe, one plain process). Runs of a wave share the GPU, so no timings are taken here (the 2-GPU issue measures
those). Writes DIR/launch_matrix.json and DIR/launch_matrix.md.
"""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DPO_FIRST_STEP_ATOL = 4e-3  # |first DPO loss - log 2|: bf16 rounding of a logged 0.69 is 3.9e-3
SPEED_KEYS = ("train_tokens_per_s", "train_step_s_median", "train_peak_memory_gib", "train_peak_memory_gib_per_rank")
RECIPES = {"sft": "sft_{q}lora.yaml", "dpo": "dpo_{q}lora.yaml", "rm": "rm_lora.yaml"}


def job(config: str, stage: str, args, port: int) -> dict:
    qlora = config.endswith("_qlora")
    launch_config = "single_gpu" if config == "single_gpu_qlora" else config
    recipe = RECIPES[stage].format(q="q" if qlora else "")
    out = os.path.join(args.out, f"{config}__{stage}")
    # the plain reference is one process with the same global batch: N times the gradient accumulation
    single = launch_config == "single_gpu"
    procs = 1 if single else args.num_processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           f"recipes/accelerate/{launch_config}.yaml", "--num_processes", str(procs)]
    if single:  # one GPU (waves() spreads side-by-side references over the GPUs)
        cmd += ["--gpu_ids", "0"]
    else:
        cmd += ["--main_process_port", str(port)]
    cmd += [f"align/{stage}.py", "--config", f"recipes/smollm2/{recipe}", "--model_name_or_path", args.model,
            "--output_dir", out, "--max_steps", str(args.max_steps), "--logging_steps", "1", "--eval_strategy", "no",
            "--save_steps", str(max(args.max_steps // 2, 1)), "--report_to", "none"]
    if single and args.num_processes > 1:
        cmd += ["--gradient_accumulation_steps", str(recipe_value(recipe, "gradient_accumulation_steps", 1)
                                                     * args.num_processes)]
    if qlora:
        cmd += ["--bnb_4bit_quant_storage", "bfloat16"]
    if args.data_files:
        train, held_out = args.data_files["sft" if stage == "sft" else "preference"]
        cmd += ["--dataset_name", train, "--eval_dataset_name", held_out]
    cmd += args.extra
    return {"config": config, "stage": stage, "recipe": recipe, "output_dir": out, "cmd": cmd,
            "engine": engine_of(launch_config), "num_processes": procs}


def recipe_value(recipe: str, key: str, default=None):
    import yaml

    with open(os.path.join(ROOT, "recipes", "smollm2", recipe)) as fh:
        return (yaml.safe_load(fh) or {}).get(key, default)


RANDOM_SHAPES = {
    "1b": {"label": "Llama-3.2-1B", "config": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5)},
    "tiny": {"label": "2 layers, hidden 64", "config": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)},
}


def build_random_model(shape: str, tokenizer_dir: str, out: str) -> str:
    """A Llama of `shape` with random weights (seed 0, bf16) and `tokenizer_dir`'s tokenizer and chat template."""
    import torch
    import transformers

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = transformers.LlamaConfig(**RANDOM_SHAPES[shape]["config"], bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if len(tok) > cfg.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer_dir} has {len(tok)} tokens, the {shape} shape {cfg.vocab_size}")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def template_tokens(tok) -> int:
    """The chat template's own tokens around one prompt and one answer (+8 for merges at the joins)."""
    try:
        empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        ids = tok.apply_chat_template(empty, tokenize=True, return_dict=True)["input_ids"]
        return len(ids) + 8
    except Exception:  # no chat template: a generous allowance
        return 64


def write_random_data(model_dir: str, out: str, rows: int, tokens: int) -> dict:
    """Chats and preference pairs of random tokens (decoded to text; at most `tokens` tokens a templated row, half
    of them prompt), train and held-out files: {"sft": (train, eval), "preference": (train, eval)}."""
    import random

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special][256:]

    def text(n):  # decoded random ids re-tokenize longer: trim until the text is at most n tokens again
        pick = [rng.choice(ids) for _ in range(n)]
        while True:
            s = tok.decode(pick, skip_special_tokens=True)
            extra = len(tok(s, add_special_tokens=False)["input_ids"]) - n
            if extra <= 0:
                return s
            pick = pick[:-extra]

    # a templated row (prompt + answer) stays within `tokens`; at least 64 spare on long rows (the committed 2-GPU
    # matrix was made with that, and its kept rows need the same data)
    half = max((tokens - max(template_tokens(tok), min(64, tokens // 2))) // 2, 1)

    os.makedirs(out, exist_ok=True)
    files = {}
    for kind in ("sft", "preference"):
        pair = []
        for split, n in (("train", rows), ("eval", max(rows // 10, 8))):
            path = os.path.join(out, f"{kind}_{split}.jsonl")
            with open(path, "w") as fh:
                for _ in range(n):
                    prompt = [{"role": "user", "content": text(half)}]
                    if kind == "sft":
                        row = {"messages": prompt + [{"role": "assistant", "content": text(half)}]}
                    else:
                        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": text(half)}],
                               "rejected": [{"role": "assistant", "content": text(half)}]}
                    fh.write(json.dumps(row) + "\n")
            pair.append(path)
        files[kind] = tuple(pair)
    return files


def engine_of(launch_config: str) -> str:
    """The engine an accelerate config asks for: NO / MULTI_GPU / DEEPSPEED zero-N / FSDP vN."""
    import yaml

    with open(os.path.join(ROOT, "recipes", "accelerate", f"{launch_config}.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    kind = str(cfg.get("distributed_type"))
    if kind == "DEEPSPEED":
        return f"DeepSpeed ZeRO-{cfg['deepspeed_config'].get('zero_stage')}"
    if kind == "FSDP":
        return f"FSDP{cfg['fsdp_config'].get('fsdp_version', 1)}"
    return {"NO": "one process", "MULTI_GPU": "DDP"}.get(kind, kind)


_RUNNING: list = []  # launches of the current wave (own process groups): stopped with this process


def _stop_running(signum, frame):
    """SIGTERM/SIGINT (a `timeout` around this script): kill the wave's launches with their children, which run
    in their own sessions and would otherwise keep the GPUs, then exit."""
    for p in _RUNNING:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_wave(jobs: list[dict], timeout: int) -> None:
    # NVLink multicast stays off on shared multi-GPU hosts (a program using it can take the host's GPUs down)
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    procs = []
    for j in jobs:
        os.makedirs(j["output_dir"], exist_ok=True)
        log = open(os.path.join(j["output_dir"] + ".log"), "w")
        procs.append((j, subprocess.Popen(j["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True),
                      time.time(), log))
        _RUNNING.append(procs[-1][1])
        print(f"[{time.strftime('%X')}] start {j['config']} {j['stage']}", flush=True)
    for j, p, t0, log in procs:
        try:
            j["returncode"] = p.wait(timeout=max(timeout - (time.time() - t0), 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and the stage process it started
            p.wait()
            j["returncode"] = "timeout"
        j["seconds"] = round(time.time() - t0, 1)
        log.close()
        print(f"[{time.strftime('%X')}] {j['config']} {j['stage']}: exit {j['returncode']} ({j['seconds']} s)",
              flush=True)
    _RUNNING.clear()


def waves(todo: list[dict], parallel: int) -> list[list[dict]]:
    """Groups of `parallel` runs. With --parallel 1 on a host of several GPUs, the one-process references still
    run side by side, each on a GPU of its own (its --gpu_ids is set here; their timings stay clean), and every
    multi-process run alone."""
    import torch

    gpus = torch.cuda.device_count()
    if parallel > 1 or gpus < 2:
        return [todo[i:i + parallel] for i in range(0, len(todo), parallel)]
    singles = [j for j in todo if j["num_processes"] == 1]
    out = [singles[i:i + gpus] for i in range(0, len(singles), gpus)]
    for wave in out:
        for gpu, j in enumerate(wave):
            j["cmd"][j["cmd"].index("--gpu_ids") + 1] = str(gpu)
    return out + [[j] for j in todo if j["num_processes"] > 1]


def root_error(text: str) -> str | None:
    """The stage's own exception line (`[rank0]: ValueError: ...`), not the launcher's ChildFailedError."""
    found = re.findall(r"^(?:\[rank\d+\]: )?((?:[\w.]+)(?:Error|Exception): .*)$", text, flags=re.MULTILINE)
    found = [f for f in found if "ChildFailedError" not in f]
    return found[-1][:400] if found else None


def inspect(j: dict, base_logits) -> None:
    """Adapter checks, engine seen in the log, per-step losses."""
    import torch
    from peft import PeftModel

    from align import launch

    with open(j["output_dir"] + ".log", errors="replace") as fh:
        text = fh.read()
    j["error"] = root_error(text) if j["returncode"] != 0 else None
    state = os.path.join(j["output_dir"], "trainer_state.json")
    history = []
    if os.path.isfile(state):
        with open(state) as fh:
            history = json.load(fh)["log_history"]
    j["losses"] = [e["loss"] for e in history if "loss" in e and "step" in e]
    run_json = os.path.join(j["output_dir"], "run.json")
    if os.path.isfile(run_json):  # align.run_stats: tokens/s after 2 warm-up steps, peak GPU memory per process
        with open(run_json) as fh:
            metrics = json.load(fh).get("metrics") or {}
        j["speed"] = {k[len("train_"):]: metrics[k] for k in SPEED_KEYS if k in metrics}
    try:
        j["adapter"] = launch.check_saved_adapter(j["output_dir"])
    except Exception as exc:  # noqa: BLE001 - reported in the table
        j["adapter"] = {"error": f"{type(exc).__name__}: {exc}"}
        return
    if base_logits is None:
        return
    base, ids, ref = base_logits
    try:
        model = PeftModel.from_pretrained(base, j["output_dir"], adapter_name=j["config"] + j["stage"])
        with torch.no_grad():
            logits = model(ids).logits.float()
        j["adapter"]["loads_on_one_device"] = True
        j["adapter"]["max_logit_change_vs_base"] = float((logits - ref).abs().max())
        model.delete_adapter(j["config"] + j["stage"])
    except Exception as exc:  # noqa: BLE001
        j["adapter"]["loads_on_one_device"] = f"{type(exc).__name__}: {exc}"


def load_base(model_dir: str):
    """(base model, prompt ids, base logits) for the one-device load check, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)("The capital of France is", return_tensors="pt").input_ids
    ids = ids.to(device)
    with torch.no_grad():
        return base, ids, base(ids).logits.float()


def kept_runs(out: str, jobs: list[dict]) -> list[dict]:
    """Runs of an earlier call on the same OUT that finished (exit 0) and are asked for again: `--keep` skips
    them, so a matrix longer than one session's call can be run in parts."""
    path = os.path.join(out, "launch_matrix.json")
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        earlier = {(r["config"], r["stage"]): r for r in json.load(fh)["runs"] if r.get("returncode") == 0}
    kept = []
    for j in jobs:
        r = earlier.get((j["config"], j["stage"]))
        if r is not None:
            kept.append(dict(r, cmd=j["cmd"]))  # the command as a list again, as for a fresh run
    return kept


def write_results(args, jobs: list[dict]) -> str:
    """launch_matrix.json and .md for the runs finished so far (rewritten after every wave)."""
    import torch

    compare(jobs, args.rtol)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    meta = {"gpu": gpu, "gpus": torch.cuda.device_count(), "model_label": args.model_label,
            "num_processes": args.num_processes, "max_steps": args.max_steps, "rtol": args.rtol,
            "dpo_first_step_atol": DPO_FIRST_STEP_ATOL, "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    runs = [dict(j, cmd=" ".join(j["cmd"][1:])) for j in jobs]
    with open(os.path.join(args.out, "launch_matrix.json"), "w") as fh:
        json.dump({"meta": meta, "runs": runs}, fh, indent=2)
    md = markdown(jobs, meta)
    with open(os.path.join(args.out, "launch_matrix.md"), "w") as fh:
        fh.write(md)
    return md


def compare(jobs: list[dict], rtol: float) -> None:
    """j["loss_check"]: SFT and RM per-step losses against the plain run of the same recipe (relative `rtol`);
    DPO: the first loss is log 2 (see DPO_FIRST_STEP_ATOL), the per-step differences reported, not judged."""
    def key(j):  # runs of the same recipe: LoRA or QLoRA, and the stage
        return ("qlora" if j["config"].endswith("_qlora") else "lora"), j["stage"]

    reference = {key(j): j for j in jobs if j["config"] in ("single_gpu", "single_gpu_qlora")}
    for j in jobs:
        if not j.get("losses"):
            continue
        check = {}
        ref = reference.get(key(j))
        if ref is not None and ref is not j and ref.get("losses"):
            pairs = list(zip(j["losses"], ref["losses"]))
            check.update(reference=ref["config"], steps=len(pairs),
                         max_rel_diff=max(abs(a - b) / max(abs(b), 1e-8) for a, b in pairs),
                         max_abs_diff=max(abs(a - b) for a, b in pairs))
            mine, theirs = (x.get("speed", {}).get("tokens_per_s") for x in (j, ref))
            if mine and theirs:
                j["speed"]["scaling_vs_single"] = mine / theirs
        if j["stage"] == "dpo":
            # A DPO loss stays within ~0.02 of log 2 over a few steps and bf16 noise moves it by about as much (two
            # identical plain runs differed by up to 7e-3), so per-step losses cannot tell engines apart. What
            # must hold under every engine is the start: the reference is the policy, so the first loss is log 2.
            check["first_step_minus_log2"] = abs(j["losses"][0] - math.log(2))
            check["ok"] = check["first_step_minus_log2"] <= DPO_FIRST_STEP_ATOL
        elif "max_rel_diff" in check:
            check["ok"] = check["max_rel_diff"] <= rtol
        j["loss_check"] = check


def markdown(jobs: list[dict], meta: dict) -> str:
    lines = [f"# Launch configs, {meta['num_processes']} process(es) on {meta['gpu']}", "",
             f"{meta.get('model_label', 'SmolLM2-135M-Instruct')}, {meta['max_steps']} steps. Loss check: SFT and RM per-step losses against the "
             f"plain one-process run of the same recipe (relative tolerance {meta['rtol']}); DPO: the first loss is "
             f"log 2 within {meta['dpo_first_step_atol']} (reference = policy at the start), later per-step "
             "differences reported only (bf16 noise is as large as the signal).", "",
             "| config | stage | exit | engine | adapter tensors | loads on one device | max logit change | "
             "loss check | max rel. diff | max abs. diff | tokens/s | x single | peak GiB/GPU | error |",
             "| --- | --- | --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    nan = float("nan")
    for j in jobs:
        a = j.get("adapter") or {}
        c = j.get("loss_check") or {}
        v = j.get("speed") or {}
        verdict = "-" if "ok" not in c else ("ok" if c["ok"] else "DIFFERS")
        if "first_step_minus_log2" in c:
            verdict += f" (step 1: log 2 {c['first_step_minus_log2']:+.1e})"
        lines.append(
            f"| {j['config']} | {j['stage']} | {j['returncode']} | {j.get('engine')} | "
            f"{a.get('tensors', '-')} | {a.get('loads_on_one_device', '-')} | "
            f"{a.get('max_logit_change_vs_base', nan):.3g} | {verdict} | {c.get('max_rel_diff', nan):.2e} | "
            f"{c.get('max_abs_diff', nan):.2e} | {v.get('tokens_per_s', nan):.0f} | "
            f"{v.get('scaling_vs_single', nan):.2f} | {v.get('peak_memory_gib', nan):.1f} | "
            f"{(j.get('error') or '').replace('|', '/')[:160]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default="single_gpu,single_gpu_qlora,multi_gpu,deepspeed_zero2,deepspeed_zero3,"
                                        "deepspeed_zero3_qlora,fsdp,fsdp_qlora")
    p.add_argument("--stages", default="sft,dpo,rm")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--rtol", type=float, default=0.02)
    p.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct")
    p.add_argument("--no_load", action="store_true", help="skip the one-device load check")
    p.add_argument("--keep", action="store_true",
                   help="keep the finished runs of OUT/launch_matrix.json and run only the others (a matrix in parts)")
    p.add_argument("--random_model", choices=sorted(RANDOM_SHAPES),
                   help="train a random-weights model of this shape (built in OUT, bf16) instead of --model")
    p.add_argument("--tokenizer", default=".cache/models/SmolLM2-135M-Instruct",
                   help="tokenizer and chat template given to the random model")
    p.add_argument("--random_data", metavar="ROWS:TOKENS",
                   help="random-token chats and preference pairs of about TOKENS tokens instead of the recipes' data")
    p.add_argument("extra", nargs="*", help="more recipe overrides for every run (after --)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_running)
    signal.signal(signal.SIGINT, _stop_running)
    os.makedirs(args.out, exist_ok=True)
    args.model_label = os.path.basename(os.path.normpath(args.model))
    if args.random_model:
        args.model = build_random_model(args.random_model, args.tokenizer, os.path.join(args.out, "_model"))
        args.model_label = f"random-weights {args.random_model} shape ({RANDOM_SHAPES[args.random_model]['label']})"
    args.data_files = None
    if args.random_data:
        rows, tokens = (int(x) for x in args.random_data.split(":"))
        args.data_files = write_random_data(args.model, os.path.join(args.out, "_data"), rows, tokens)
        args.model_label += f", random tokens ({rows} rows of ~{tokens} tokens)"
    pairs = [(c, s) for c in args.configs.split(",") for s in args.stages.split(",")
             if not (s == "rm" and c.endswith("_qlora"))]  # no QLoRA reward-model recipe
    jobs = [job(c, s, args, 29600 + i) for i, (c, s) in enumerate(pairs)]
    done = kept_runs(args.out, jobs) if args.keep else []
    todo = [j for j in jobs if (j["config"], j["stage"]) not in {(d["config"], d["stage"]) for d in done}]
    if done:
        print(f"keeping {len(done)} finished runs of {args.out}/launch_matrix.json; running {len(todo)}", flush=True)
    base_logits = None if args.no_load or not todo else load_base(args.model)
    md = write_results(args, done) if done else ""
    for wave in waves(todo, args.parallel):  # results are written after every wave: a cut run keeps them
        run_wave(wave, args.timeout)
        for j in wave:
            inspect(j, base_logits)
        done += wave
        md = write_results(args, done)
    print(md)
    ok = all(j["returncode"] == 0 and "error" not in (j.get("adapter") or {"error": 1})
             and (j.get("loss_check") or {}).get("ok", True) for j in done)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
