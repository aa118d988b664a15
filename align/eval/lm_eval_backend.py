"""`--backend lm-eval`: score a suite with EleutherAI's lm-evaluation-harness instead of align's scorer.

    results = run_lm_eval(model, tokenizer, suite, batch_size=16)    # {task: {"acc", "acc_norm", ...}}

Each suite task becomes an lm-eval task YAML over the same local file (`dataset_path: json` with `data_files`),
with the same prompts: `doc_to_text` is the query (or, for schema rows, the gold index with the context options as
choices), the target delimiter is the task's. A task with `lm_eval_task: NAME` runs lm-eval's registered task of
that name instead (which may need its data set from the hub). lm-eval draws few-shot examples at random, so
results with num_fewshot > 0 differ from align's scorer, which takes the rows after the evaluated ones.
"""

from __future__ import annotations

import json
import os
import tempfile

import yaml

from align.eval.suites import GENERAL_FORMATS, Suite, TaskSpec

PREFIX = "align_"


def task_config(task: TaskSpec) -> dict:
    """The lm-eval task YAML (as a dict) that scores `task`'s local file as align's scorer does."""
    if task.format not in GENERAL_FORMATS:
        raise ValueError(f"task {task.name}: the lm-eval backend runs {', '.join(GENERAL_FORMATS)} tasks only")
    cfg = {
        "task": PREFIX + task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(task.path)}},
        "test_split": "test",
        "target_delimiter": task.target_delimiter,
        "fewshot_delimiter": task.fewshot_delimiter,
        "num_fewshot": task.num_fewshot,
    }
    if task.num_fewshot:
        cfg["fewshot_split"] = "test"
    acc = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
    if task.format == "multiple_choice":
        cfg.update(output_type="multiple_choice", doc_to_text="{{query}}", doc_to_choice="{{choices}}",
                   doc_to_target="{{gold}}",
                   metric_list=[acc, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    elif task.format == "schema":
        cfg.update(output_type="multiple_choice", doc_to_text="{{gold}}", doc_to_choice="{{context_options}}",
                   doc_to_target="{{continuation}}", metric_list=[acc])
    else:  # lambada: a loglikelihood task puts no delimiter before the target, so the target carries it
        cfg.update(output_type="loglikelihood", doc_to_text="{{context}}", target_delimiter="",
                   doc_to_target="{{ " + json.dumps(task.target_delimiter) + " + continuation }}",
                   metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                acc])
    return cfg


def write_task_configs(suite: Suite, directory: str) -> dict[str, str]:
    """Write one YAML per task that has no `lm_eval_task`; returns {suite task name: lm-eval task name}."""
    names = {}
    for task in suite.tasks:
        if task.lm_eval_task:
            names[task.name] = task.lm_eval_task
            continue
        cfg = task_config(task)
        with open(os.path.join(directory, f"{cfg['task']}.yaml"), "w") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
        names[task.name] = cfg["task"]
    return names


def _metrics(block: dict) -> dict:
    """lm-eval's `{"acc,none": x, "acc_stderr,none": s}` as `{"acc": x, "acc_stderr": s}`."""
    out = {}
    for key, value in block.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)):
            out[metric] = float(value)
    return out


def run_lm_eval(model, tokenizer, suite: Suite, *, batch_size: int = 16, log_samples: bool = False) -> dict:
    """Score `suite` with lm-eval's HFLM over the already loaded `model`; returns {task name: metrics}.

    With `log_samples`, each task's metrics carry lm-eval's per-doc log-likelihoods as `samples`
    ([[logprob, greedy], ...] per doc, in doc order) for comparison with align's scorer."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="align-lm-eval-") as tmp:
        names = write_task_configs(suite, tmp)
        limits = {t.limit for t in suite.tasks}
        if len(limits) > 1:
            raise ValueError(f"lm-eval takes one limit for all tasks; this suite has {sorted(limits, key=str)}: "
                             "give --limit")
        out = simple_evaluate(model=lm, tasks=list(names.values()), task_manager=TaskManager(include_path=tmp),
                              limit=limits.pop(), log_samples=log_samples, bootstrap_iters=0,
                              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    results = {}
    for task in suite.tasks:
        name = names[task.name]
        metrics = _metrics(out["results"][name])
        if log_samples:
            docs = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            metrics["samples"] = [[list(map(float, r)) if isinstance(r, (list, tuple)) else r
                                   for r in json.loads(json.dumps(s["filtered_resps"], default=str))]
                                  for s in docs]
        metrics["n"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
        results[task.name] = metrics
    return results
