"""Evaluation: general-ability suites (forgetting checks), preference evaluation, task hooks and reports.

    suites.py          suite YAML -> tasks -> documents (multiple_choice, schema, lambada, gsm8k, perplexity)
    scorer.py          batched log-likelihoods; acc / acc_norm as lm-eval computes them
    tasks.py           GSM8K exact match (greedy chat generation), perplexity of held-out text
    lm_eval_backend.py the same suite through lm-evaluation-harness (`--backend lm-eval`)
    models.py          a directory (base, full model, adapter) -> what it is, its fingerprint, the loaded model
    preference.py      DPO implicit-reward accuracy, reward-model pairwise accuracy, win rate by a reward model
    cache.py           results cached per (model fingerprint, task, limit)
    runner.py          all of the above over several models, one in memory at a time
    gate.py            check_forgetting / run_gate: warn or fail when general scores drop
    report.py          report.md, self-contained report.html, plots

Entry point: `python align/evaluate.py` (see its docstring).
"""

from align.eval.gate import ForgettingError, ForgettingWarning, check_forgetting, run_gate

__all__ = ["ForgettingError", "ForgettingWarning", "check_forgetting", "run_gate"]
