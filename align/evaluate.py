"""Evaluate base, adapter-tuned and fully fine-tuned models side by side, or gate a stage on forgetting.

    python align/evaluate.py --models base=.cache/models/SmolLM2-135M-Instruct sft=outputs/demo/sft \
        dpo=outputs/demo/dpo --suite recipes/eval/general_quick.yaml \
        --preference_data data/preference/hh_rlhf_harmless_test.jsonl.gz --output_dir outputs/demo/report
    python align/evaluate.py --gate outputs/demo/sft --suite recipes/eval/general_quick.yaml --threshold 0.02 \
        --mode fail                                    # exit status 1 when the average general drop is larger
    python align/evaluate.py --report_from outputs/demo/report/results.json --output_dir outputs/demo/report

A model is a directory: a base or merged/full model (config.json), or an adapter (adapter_config.json; its base
comes from run.json's lineage or adapter_config.json). Reward-model adapters get their pairwise accuracy on the
preference data; DPO adapters their implicit-reward accuracy against their reference (the parent SFT adapter);
with --reward_model, every model's sampled responses are judged against the baseline's (win rate).

Writes to --output_dir: results.json (scores without per-item samples), samples/<model>.json (per-item
predictions), responses.json (win-rate generations), report.md, report.html, plots/*.png.
Sections: arguments -> resolve models and suite -> evaluate (cached per model fingerprint, task and limit) ->
results.json -> report. `--gate` evaluates a tuned model and its base and applies `check_forgetting`.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not the sibling files (nor HF `evaluate`)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import json
import logging

from align.eval.cache import default_cache_dir
from align.paths import REPO_ROOT

DEFAULT_SUITE = os.path.join(REPO_ROOT, "recipes", "eval", "general_quick.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    what = p.add_argument_group("what to evaluate")
    what.add_argument("--models", nargs="+", default=[], metavar="NAME=DIR",
                      help="models as name=directory (base, merged/full model, or adapter directory)")
    what.add_argument("--suite", default=DEFAULT_SUITE, help="suite YAML ('none' for no general suite)")
    what.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    what.add_argument("--limit", type=int, default=None, help="at most this many rows per task (quick checks)")
    what.add_argument("--preference_data", default=None, help="held-out preference pairs (any align.data format)")
    what.add_argument("--preference_limit", type=int, default=200, help="use the first N usable pairs")
    what.add_argument("--reward_model", default=None, help="reward-model adapter judging win rates vs the baseline")
    what.add_argument("--win_rate_limit", type=int, default=32, help="prompts (from the preference data) for win rates")
    what.add_argument("--baseline", default=None, help="model deltas are taken against (default: 'base')")
    how = p.add_argument_group("how")
    how.add_argument("--backend", choices=("native", "lm-eval"), default="native",
                     help="score general tasks with align's scorer or with lm-evaluation-harness")
    how.add_argument("--batch_size", type=int, default=16)
    how.add_argument("--gen_batch_size", type=int, default=None,
                     help="generation batch (GSM8K, win rates); default 64 on a GPU, 8 on the CPU (generation of "
                          "a small model is bound by per-token overhead on a GPU: 8 made GSM8K take minutes)")
    how.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, float16")
    how.add_argument("--device", default="auto")
    how.add_argument("--max_length", type=int, default=None, help="scoring window (default: the model's)")
    how.add_argument("--pack_scoring", type=lambda v: {"auto": "auto", "true": True, "false": False}.get(v, v),
                     choices=("auto", True, False), default="auto", help="score the options of a question (and a pair's responses) in packed "
                     "rows, the shared context once: true, false (one padded row per option, as lm-eval does) or "
                     "auto (default: on a CPU, where it was measured)")
    how.add_argument("--max_new_tokens", type=int, default=128, help="win-rate response length")
    how.add_argument("--temperature", type=float, default=0.7)
    how.add_argument("--top_p", type=float, default=0.9)
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--cache_dir", default=default_cache_dir(), help="result cache")
    how.add_argument("--no_cache", action="store_true", help="recompute everything, cache nothing")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default=None)
    out.add_argument("--forgetting_threshold", "--threshold", type=float, default=0.02,
                     help="average general-suite drop (metric units; 0.02 = 2 points) that counts as forgetting")
    out.add_argument("--report_from", default=None, help="only re-render the report from a saved results.json")
    gate = p.add_argument_group("forgetting gate")
    gate.add_argument("--gate", default=None, metavar="DIR", help="gate this tuned model against its base")
    gate.add_argument("--base", default=None, help="--gate: the base directory (default: from the model's lineage)")
    gate.add_argument("--mode", choices=("warn", "fail"), default="warn", help="--gate: warn, or fail (exit 1)")
    return p


def _settings(args):
    import torch

    from align.eval.runner import EvalSettings

    gen_batch_size = args.gen_batch_size or (64 if torch.cuda.is_available() and args.device != "cpu" else 8)
    return EvalSettings(batch_size=args.batch_size, gen_batch_size=gen_batch_size, dtype=args.dtype,
                        device=args.device, limit=args.limit, max_length=args.max_length,
                        pack_scoring=args.pack_scoring,
                        cache_dir=None if args.no_cache else args.cache_dir, backend=args.backend,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)


def save_results(results: dict, output_dir: str) -> str:
    """results.json without per-item samples and generations, which go to samples/ and responses.json."""
    from align.manifest import write_json_atomic

    results = dict(results)
    for name, samples in (results.pop("samples", None) or {}).items():
        if samples:
            write_json_atomic(os.path.join(output_dir, "samples", f"{name}.json"), samples)
    responses = results.pop("responses", None)
    if responses:
        write_json_atomic(os.path.join(output_dir, "responses.json"), responses)
    path = os.path.join(output_dir, "results.json")
    write_json_atomic(path, results)
    return path


def run_gate_cli(args) -> int:
    from align.eval.gate import ForgettingError, run_gate

    settings = {k: v for k, v in vars(_settings(args)).items()}
    try:
        result = run_gate(args.gate, args.base, args.suite, args.forgetting_threshold, args.mode, **settings)
        status = 0
    except ForgettingError as err:
        result, status = err.result, 1
        print(f"evaluate: {err}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.output_dir:
        from align.manifest import write_json_atomic

        write_json_atomic(os.path.join(args.output_dir, "gate.json"), result)
    return status


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from align.eval.report import write_report

    # 1. Re-render only.
    if args.report_from:
        with open(args.report_from) as fh:
            results = json.load(fh)
        paths = write_report(results, args.output_dir or os.path.dirname(os.path.abspath(args.report_from)))
        print(f"evaluate: wrote {paths['md']} and {paths['html']}")
        return 0
    # 2. Forgetting gate.
    if args.gate:
        return run_gate_cli(args)
    # 3. Models x suite (+ preference, win rate).
    if not args.models or not args.output_dir:
        build_parser().error("give --models NAME=DIR ... and --output_dir (or --gate DIR, or --report_from FILE)")
    from align.eval.models import parse_model_args
    from align.eval.runner import evaluate_models
    from align.eval.suites import load_suite

    suite = None
    if args.suite and args.suite.lower() != "none":
        suite = load_suite(args.suite).select(args.tasks.split(",") if args.tasks else None).with_limit(args.limit)
    results = evaluate_models(
        parse_model_args(args.models), suite, _settings(args), preference_data=args.preference_data,
        preference_limit=args.preference_limit, reward_model=args.reward_model, win_rate_limit=args.win_rate_limit,
        baseline=args.baseline, forgetting_threshold=args.forgetting_threshold,
    )
    # 4. Results and report.
    path = save_results(results, args.output_dir)
    paths = write_report(results, args.output_dir)
    print(f"evaluate: wrote {path}, {paths['md']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
