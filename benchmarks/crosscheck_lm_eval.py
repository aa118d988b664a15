"""Cross-check align's log-likelihood scorer against lm-evaluation-harness on a real model and the shipped suite.

    python benchmarks/crosscheck_lm_eval.py --model .cache/models/SmolLM2-135M-Instruct --limit 20 \
        [--suite recipes/eval/general_quick.yaml] [--output benchmarks/results/crosscheck_lm_eval.json]

Both score the same local files with the same prompts (lm-eval through generated task YAMLs, `dataset_path:
json`); the script prints each task's metrics from both and the largest per-item log-likelihood difference.
tests/test_eval.py runs the same comparison on a tiny random model (where lm-eval is installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from align.eval.lm_eval_backend import run_lm_eval  # noqa: E402
from align.eval.models import load_causal_lm, resolve_model  # noqa: E402
from align.eval.scorer import LogLikelihoodScorer, score_choice_task  # noqa: E402
from align.eval.suites import GENERAL_FORMATS, load_docs, load_suite  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model or adapter directory")
    p.add_argument("--suite", default="recipes/eval/general_quick.yaml")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", default=None, help="write the comparison as JSON here")
    args = p.parse_args(argv)

    suite = load_suite(args.suite)
    suite = suite.select([t.name for t in suite.tasks if t.format in GENERAL_FORMATS]).with_limit(args.limit)
    model, tokenizer = load_causal_lm(resolve_model("model", args.model), dtype=args.dtype)
    started = time.time()
    theirs = run_lm_eval(model, tokenizer, suite, batch_size=args.batch_size, log_samples=True)
    lm_eval_s = time.time() - started
    scorer = LogLikelihoodScorer(model, tokenizer, batch_size=args.batch_size)
    started = time.time()
    ours = {t.name: score_choice_task(scorer, t, load_docs(t)) for t in suite.tasks}
    native_s = time.time() - started

    rows = {}
    for task in suite.tasks:
        mine, lm = ours[task.name], theirs[task.name]
        diffs = []
        for s, r in zip(mine["samples"], lm["samples"]):
            values = s["logprobs"] if "logprobs" in s else [s["logprob"]]
            diffs += [abs(a - b[0]) for a, b in zip(values, r)]
        rows[task.name] = {
            "native": {k: mine[k] for k in ("acc", "acc_norm", "perplexity") if k in mine},
            "lm_eval": {k: lm[k] for k in ("acc", "acc_norm", "perplexity") if k in lm},
            "max_abs_loglik_diff": max(diffs) if diffs else None, "n": mine["n"],
        }
        print(f"{task.name:16s} native {rows[task.name]['native']}  lm-eval {rows[task.name]['lm_eval']}  "
              f"max|Δll| {rows[task.name]['max_abs_loglik_diff']:.2e}")
    print(f"time: native {native_s:.1f}s, lm-eval {lm_eval_s:.1f}s")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"model": args.model, "limit": args.limit, "tasks": rows, "native_s": native_s,
                       "lm_eval_s": lm_eval_s}, fh, indent=2)


if __name__ == "__main__":
    main()
