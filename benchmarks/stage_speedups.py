"""A real stage run with and without speed options, side by side: `align/sft.py` or `align/dpo.py` on a recipe,
once per `--speedups` value, each in its own process, then tokens/s, median step time, wall time and the losses
and metrics of every run (from its `run.json`), with the ratios against the first value.

    # the demo's SFT and DPO stages on SmolLM2-135M-Instruct and the shipped data, on the CPU
    python benchmarks/stage_speedups.py --out benchmarks/results/stage_speedups_cpu.json
    # the reward-model stage (rm.py) at the demo DPO stage's sizes
    python benchmarks/stage_speedups.py --runs "rm:none|rm:shared_prompt" --out benchmarks/results/stage_speedups_rm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = "--save_strategy no --report_to none --disable_tqdm true"  # after the demo's own overrides
METRICS = ("train_tokens_per_s", "train_step_s_median", "train_loss", "before_eval_loss", "eval_loss",
           "eval_rewards/accuracies", "eval_rewards/margins", "eval_accuracy", "eval_margin")


def demo_args() -> tuple[list[str], list[str]]:
    """The SFT and DPO overrides `make demo` runs its stages with (the Makefile is their one place)."""
    lines = subprocess.run(["make", "-s", "-C", REPO, "demo-args", "DEMO=cpu"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return lines[0].split(), lines[1].split()


def timed_run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` in the repository (its own process), output captured; its wall seconds. Exits on a failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc, wall


def run_stage(stage: str, recipe: str, out: str, speedups: str, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "align", f"{stage}.py"), "--config", recipe, "--output_dir", out,
           "--resume", "false", "--speedups", speedups, *extra]
    print(f"[stage_speedups] {stage} {speedups} ...", flush=True)
    _, wall = timed_run(cmd)
    with open(os.path.join(out, "run.json")) as fh:
        run = json.load(fh)
    metrics = {k: run["metrics"][k] for k in METRICS if k in run["metrics"]}
    print(f"[stage_speedups] {stage} {speedups}: {metrics} ({wall} s)", flush=True)
    return dict(stage=stage, speedups=speedups, applied=run["lineage"]["speedups"]["options"], wall_s=wall,
                metrics=metrics)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, ".cache", "models", "SmolLM2-135M-Instruct"))
    ap.add_argument("--runs", default="sft:none|sft:padding_free,head_grad|dpo:none|dpo:shared_prompt,head_grad",
                    help="stage:speedups pairs separated by |; each stage's first one is the baseline")
    ap.add_argument("--workdir", default="/tmp/stage_speedups")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--extra", default="", help="more overrides for every stage run, e.g. `--data_seed 1` (a "
                    "different batch order, the same held-out rows: the run-to-run spread of the metrics)")
    args = ap.parse_args(argv)

    demo_sft, demo_dpo = demo_args()
    common = [*COMMON.split(), "--model_name_or_path", args.model, *args.extra.split()]
    rows, sft_adapter = [], None
    for item in args.runs.split("|"):
        stage, speedups = item.split(":", 1)
        out = os.path.join(args.workdir, f"{stage}_{speedups.replace(',', '_')}")
        if stage == "sft":
            row = run_stage("sft", "recipes/smollm2/sft_lora.yaml", out, speedups, [*demo_sft, *common])
            sft_adapter = sft_adapter or out  # DPO starts from the first SFT run's adapter
        elif stage == "rm":  # not a demo stage: the demo DPO stage's sizes, on the base
            row = run_stage("rm", "recipes/smollm2/rm_lora.yaml", out, speedups, [*demo_dpo, *common])
        else:
            if sft_adapter is None:
                raise SystemExit("dpo runs need an sft run before them (its adapter is the DPO policy's start)")
            row = run_stage("dpo", "recipes/smollm2/dpo_lora.yaml", out, speedups,
                            [*demo_dpo, *common, "--sft_adapter", sft_adapter])
        base = next(r for r in rows + [row] if r["stage"] == stage)
        row["speedup_vs_first"] = round(row["metrics"]["train_tokens_per_s"] / base["metrics"]["train_tokens_per_s"], 2)
        row["wall_ratio_vs_first"] = round(row["wall_s"] / base["wall_s"], 2)
        compared = [k for k in METRICS[2:] if k in base["metrics"]]  # losses and reward metrics
        row["max_metric_diff_vs_first"] = max((abs(row["metrics"][k] - base["metrics"][k]) for k in compared),
                                              default=None)
        rows.append(row)
    import torch

    result = dict(argv=sys.argv[1:], device="cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
                  time=time.strftime("%Y-%m-%d %H:%M:%S"), rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    for r in rows:
        print(f"{r['stage']} {r['speedups']:>26}: {r['metrics']['train_tokens_per_s']:>7} tok/s "
              f"({r['speedup_vs_first']}x), wall {r['wall_s']} s, max loss/reward diff {r['max_metric_diff_vs_first']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
