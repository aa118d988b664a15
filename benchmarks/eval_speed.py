"""The evaluation report's scoring with and without packed rows, side by side: `align/evaluate.py` on the same
models, once with `--pack_scoring false` (one padded row per option, as lm-eval scores) and once packed (the
options of a question after their context, in shared rows), each in its own process without the result cache;
wall time, per-task seconds from the log, and whether every score is the same.

    make demo   # the demo's models (outputs/demo/{sft,dpo}) and held-out pairs
    python benchmarks/eval_speed.py --out benchmarks/results/eval_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from stage_speedups import REPO, timed_run

DEMO = os.path.join(REPO, "outputs", "demo")
TASK_TIME = re.compile(r"align: (\S+) / (\S+): ([0-9.]+)s")


def run(pack: bool, models: list[str], extra: list[str], out: str) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "align", "evaluate.py"), "--models", *models, "--output_dir", out,
           "--no_cache", "--pack_scoring", str(pack).lower(), *extra]
    print(f"[eval_speed] pack_scoring={pack} ...", flush=True)
    proc, wall = timed_run(cmd)
    tasks = {f"{m}/{t}": float(s) for m, t, s in TASK_TIME.findall(proc.stderr + proc.stdout)}
    with open(os.path.join(out, "results.json")) as fh:
        results = json.load(fh)
    print(f"[eval_speed] pack_scoring={pack}: {wall} s", flush=True)
    return dict(pack_scoring=pack, wall_s=wall, task_s=tasks, scores=results["scores"],
                preference=results.get("preference"))


def max_difference(a, b) -> float:
    """Largest absolute difference between the numbers of two results trees of the same shape."""
    if isinstance(a, dict):
        return max((max_difference(a[k], b.get(k)) for k in a), default=0.0)
    if isinstance(a, list):
        return max((max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, (int, float)):
        return abs(a - b)
    return 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[
        f"base={os.path.join(REPO, '.cache', 'models', 'SmolLM2-135M-Instruct')}", f"sft={DEMO}/sft",
        f"dpo={DEMO}/dpo"])
    ap.add_argument("--eval_args", default=f"--preference_data {DEMO}/dpo/heldout_pairs.jsonl --limit 20 "
                                           "--preference_limit 24", help="the rest of evaluate.py's arguments")
    ap.add_argument("--workdir", default="/tmp/eval_speed")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)

    plain, packed = (run(p, args.models, args.eval_args.split(), os.path.join(args.workdir, f"pack_{p}"))
                     for p in (False, True))
    import torch

    result = dict(argv=sys.argv[1:], device="cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
                  time=time.strftime("%Y-%m-%d %H:%M:%S"), runs=[plain, packed],
                  speedup=round(plain["wall_s"] / packed["wall_s"], 2),
                  max_score_difference=max_difference(plain["scores"], packed["scores"]),
                  max_preference_difference=max_difference(plain["preference"] or {}, packed["preference"] or {}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wall {plain['wall_s']} s -> {packed['wall_s']} s ({result['speedup']}x); largest score difference "
          f"{result['max_score_difference']:.2e}, preference {result['max_preference_difference']:.2e}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
