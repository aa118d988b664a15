"""Forgetting gate: does a tuned model lose general ability against its base?

    check_forgetting({"arc_easy": 0.60, "piqa": 0.70}, {"arc_easy": 0.52, "piqa": 0.69}, threshold=0.02,
                     mode="fail")      # average drop 0.045 > 0.02: raises ForgettingError
    run_gate("outputs/demo/sft", None, "recipes/eval/general_quick.yaml", 0.02, "warn")   # evaluates both first

Scores are each general task's headline metric (higher is better, e.g. accuracy as a fraction); the drop of a task
is base - tuned, and the gate looks at the average drop over the tasks both have. `threshold` is in the metric's
units: 0.02 is two accuracy points. mode "warn" logs and warns (`ForgettingWarning`), "fail" raises.
"""

from __future__ import annotations

import logging
import os
import warnings

logger = logging.getLogger("align")

MODES = ("warn", "fail")


class ForgettingWarning(UserWarning):
    """The average general-suite drop of a tuned model exceeds the threshold (mode "warn")."""


class ForgettingError(RuntimeError):
    """The average general-suite drop of a tuned model exceeds the threshold (mode "fail")."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def check_forgetting(base_scores: dict[str, float], tuned_scores: dict[str, float], threshold: float,
                     mode: str = "warn") -> dict:
    """Compare general-suite scores; returns {"average_drop", "drops", "threshold", "exceeded", "passed", "mode",
    "worst_task"} and warns or raises (per `mode`) when the average drop exceeds `threshold`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    common = [t for t in base_scores if t in tuned_scores]
    if not common:
        raise ValueError(f"no task in common: base has {sorted(base_scores)}, tuned has {sorted(tuned_scores)}")
    drops = {t: float(base_scores[t]) - float(tuned_scores[t]) for t in common}
    average = sum(drops.values()) / len(drops)
    worst = max(drops, key=drops.get)
    exceeded = average > threshold
    result = {"average_drop": average, "drops": drops, "threshold": threshold, "exceeded": exceeded,
              "passed": not exceeded, "mode": mode, "worst_task": worst,
              "tasks_missing": sorted(set(base_scores) ^ set(tuned_scores))}
    if exceeded:
        message = (f"forgetting: the average general-suite drop {average:.4f} exceeds {threshold:.4f} over "
                   f"{len(drops)} tasks (worst: {worst}, {drops[worst]:+.4f} lost)")
        if mode == "fail":
            raise ForgettingError(message, result)
        logger.warning(message)
        warnings.warn(message, ForgettingWarning, stacklevel=2)
    return result


def general_scores(task_results: dict[str, dict], suite) -> dict[str, float]:
    """{task: headline metric} of the suite's general tasks, from one model's `{task: metrics}`."""
    out = {}
    for task in suite.tasks:
        metrics = task_results.get(task.name)
        if task.general and task.higher_is_better and metrics and task.metric in metrics:
            out[task.name] = float(metrics[task.metric])
    return out


def default_base(model_dir: str) -> str:
    """The base a tuned directory came from: an adapter's base, a full fine-tune's `model_name_or_path`."""
    from align import manifest
    from align.eval.models import resolve_model

    ref = resolve_model("tuned", model_dir)
    if ref.base:
        return ref.base
    run = manifest.read_run(model_dir) or {}
    base = ((run.get("config") or {}).get("ModelArguments") or {}).get("model_name_or_path") or (
        (run.get("lineage") or {}).get("base_model"))
    if not base:
        raise ValueError(f"{model_dir}: cannot tell its base model; give base_dir")
    return base


def run_gate(model_dir: str, base_dir: str | None, suite_path: str, threshold: float, mode: str = "warn",
             **settings) -> dict:
    """Evaluate `model_dir` and its base (`base_dir`, default: the base its run.json / adapter_config names) on
    the suite's general tasks (cached), then `check_forgetting`. `settings` go to `runner.EvalSettings`
    (limit, batch_size, dtype, device, cache_dir, ...). Returns the check's result plus both models' scores."""
    from align.eval import runner
    from align.eval.models import resolve_model
    from align.eval.suites import load_suite

    suite = load_suite(suite_path)
    suite = suite.select([t.name for t in suite.tasks if t.general])
    cfg = runner.EvalSettings(**settings)
    suite = suite.with_limit(cfg.limit)
    base_dir = base_dir or default_base(model_dir)
    scores = {}
    for name, path in (("base", base_dir), ("tuned", model_dir)):
        ref = resolve_model(name, path)
        scores[name] = general_scores(runner.ModelSession(ref, cfg).suite_scores(suite), suite)
    extra = {"base": os.path.abspath(base_dir) if os.path.isdir(base_dir) else base_dir,
             "model": os.path.abspath(model_dir), "suite": suite.path, "base_scores": scores["base"],
             "tuned_scores": scores["tuned"]}
    try:
        result = check_forgetting(scores["base"], scores["tuned"], threshold, mode)
    except ForgettingError as err:
        err.result.update(extra)
        raise
    result.update(extra)
    return result
