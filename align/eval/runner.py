"""Run a suite, preference evaluation and win rates over several models, one model in memory at a time.

    settings = EvalSettings(batch_size=16, limit=50)
    session = ModelSession(resolve_model("sft", "outputs/demo/sft"), settings)
    session.suite_scores(suite)                       # {task: metrics}; cached per (fingerprint, task, limit)
    results = evaluate_models([("base", ...), ("sft", ...)], suite, settings, preference_data=...)

A model is loaded only when something is not in the cache, and released before the next one loads.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from align.eval import preference, scorer, tasks
from align.eval.cache import ResultCache, default_cache_dir
from align.eval.gate import check_forgetting, general_scores
from align.eval.models import ModelRef, fingerprint, load_causal_lm, pick_device, resolve_model
from align.eval.report import read_training_log
from align.eval.suites import GENERAL_FORMATS, Suite, TaskSpec, load_docs

logger = logging.getLogger("align")

BACKENDS = ("native", "lm-eval")


@dataclass
class EvalSettings:
    """How models are loaded and scored (the same for every model of one evaluation)."""

    batch_size: int = 16  # log-likelihood batch
    gen_batch_size: int = 8  # generation batch (GSM8K, win-rate responses)
    dtype: str = "float32"
    device: str = "auto"
    limit: int | None = None  # at most this many rows per task (on top of the suite's own limits)
    max_length: int | None = None  # scoring window; default: the model's max_position_embeddings
    pack_scoring: bool | str = "auto"  # options sharing a context in packed rows (same numbers; scorer.py)
    cache_dir: str | None = field(default_factory=default_cache_dir)  # None: no cache
    backend: str = "native"  # native | lm-eval (general tasks through lm-evaluation-harness)
    max_new_tokens: int = 128  # win-rate responses
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def load_key(self) -> dict:
        return {"dtype": self.dtype}


def strip_samples(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "samples"}


class ModelSession:
    """One model under evaluation: loaded on first use, its results cached under its fingerprint."""

    def __init__(self, ref: ModelRef, settings: EvalSettings, with_reference: bool = False):
        self.ref, self.settings, self.with_reference = ref, settings, with_reference
        self.cache = ResultCache(settings.cache_dir)
        self.fingerprint = fingerprint(ref, **settings.load_key())
        self.samples: dict[str, list] = {}
        self._loaded = None

    # -------------------------------------------------------------------------------------------------- loading
    @property
    def loaded(self):
        if self._loaded is None:
            started = time.time()
            self._loaded = load_causal_lm(self.ref, dtype=self.settings.dtype, device=self.settings.device,
                                          with_reference=self.with_reference)
            logger.info("loaded %s (%s) in %.1fs", self.ref.name, self.ref.path, time.time() - started)
        return self._loaded

    def close(self) -> None:
        self._loaded = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _key(self, what: str, **extra) -> dict:
        return {"model": self.fingerprint, "task": what, "backend": self.settings.backend,
                "max_length": self.settings.max_length, **extra}

    # ---------------------------------------------------------------------------------------------------- suite
    def _task_key(self, task: TaskSpec) -> dict:
        backend = self.settings.backend if task.format in GENERAL_FORMATS else "native"
        return {**self._key(task.name, task_fp=task.fingerprint(), limit=task.limit), "backend": backend}

    def run_task(self, task: TaskSpec) -> dict:
        """Score one task with align's scorer (no cache)."""
        model, tokenizer = self.loaded
        docs = load_docs(task)
        if task.format == "gsm8k":
            return tasks.score_gsm8k(model, tokenizer, task, docs, batch_size=self.settings.gen_batch_size)
        ll = scorer.LogLikelihoodScorer(model, tokenizer, self.settings.batch_size, self.settings.max_length,
                                        pack=self.settings.pack_scoring)
        if task.format == "perplexity":
            return tasks.score_perplexity(ll, docs)
        return scorer.score_choice_task(ll, task, docs)

    def suite_scores(self, suite: Suite) -> dict[str, dict]:
        """{task: metrics} for every task of the suite, from the cache where possible."""
        out, missing = {}, []
        for task in suite.tasks:
            hit = self.cache.get(self._task_key(task))
            if hit is not None:
                out[task.name] = hit
            else:
                missing.append(task)
        lm_eval_tasks = [t for t in missing if self.settings.backend == "lm-eval" and t.format in GENERAL_FORMATS]
        if lm_eval_tasks:
            from align.eval.lm_eval_backend import run_lm_eval

            model, tokenizer = self.loaded
            scored = run_lm_eval(model, tokenizer, Suite(suite.name, suite.path, lm_eval_tasks),
                                 batch_size=self.settings.batch_size)
            for task in lm_eval_tasks:
                out[task.name] = scored[task.name]
                self.cache.put(self._task_key(task), scored[task.name])
        for task in missing:
            if task in lm_eval_tasks:
                continue
            started = time.time()
            out[task.name] = self.run_task(task)
            logger.info("%s / %s: %.1fs", self.ref.name, task.name, time.time() - started)
            self.cache.put(self._task_key(task), out[task.name])
        self.samples.update({name: m["samples"] for name, m in out.items() if "samples" in m})
        return {t.name: strip_samples(out[t.name]) for t in suite.tasks}

    # ----------------------------------------------------------------------------------------------- preference
    def implicit_rewards(self, pairs: list[dict], pairs_key: str) -> dict:
        key = self._key("implicit_reward", pairs=pairs_key, beta=self.ref.beta)
        hit = self.cache.get(key)
        if hit is None:
            model, tokenizer = self.loaded
            hit = preference.implicit_reward_accuracy(model, tokenizer, pairs, beta=self.ref.beta or 0.1,
                                                      batch_size=self.settings.batch_size,
                                                      pack=self.settings.pack_scoring)
            self.cache.put(key, hit)
        return hit

    def responses(self, prompts: list[list[dict]], prompts_key: str) -> list[str]:
        s = self.settings
        key = self._key("responses", prompts=prompts_key, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_p=s.top_p, seed=s.seed)
        hit = self.cache.get(key)
        if hit is None:
            model, tokenizer = self.loaded
            hit = {"responses": tasks.generate(model, tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                                               batch_size=s.gen_batch_size, do_sample=True,
                                               temperature=s.temperature, top_p=s.top_p, seed=s.seed)}
            self.cache.put(key, hit)
        return hit["responses"]


# ------------------------------------------------------------------------------------------------- orchestration


def pick_baseline(refs: list[ModelRef], name: str | None = None) -> str:
    """The model deltas are taken against: `name`, else one named "base", else the first of kind base."""
    names = [r.name for r in refs]
    if name is not None:
        if name not in names:
            raise ValueError(f"baseline {name!r} is not among the models {names}")
        return name
    if "base" in names:
        return "base"
    return next((r.name for r in refs if r.kind == "base"), next(r.name for r in refs if r.is_causal_lm))


def pick_full(refs: list[ModelRef]) -> str | None:
    """The full fine-tune, if any: a model named "full", else the first of kind full."""
    if any(r.name == "full" for r in refs):
        return "full"
    return next((r.name for r in refs if r.kind == "full"), None)


def _file_key(path: str, limit: int | None) -> str:
    import hashlib

    h = hashlib.sha256(f"{limit}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read())
    return h.hexdigest()[:16]


def _judge(adapter_dir: str, settings: EvalSettings):
    """A reward model (RewardScorer) on the evaluation device; a 4-bit one is already placed by its loader."""
    from align.reward import RewardScorer

    judge = RewardScorer.from_pretrained(adapter_dir, batch_size=settings.batch_size)
    device = pick_device(settings.device)
    if not getattr(judge.model, "is_loaded_in_4bit", False) and not getattr(judge.model, "is_loaded_in_8bit", False):
        judge.model.to(device)
    return judge


def _is_dpo(ref: ModelRef) -> bool:
    return ref.kind == "adapter" and (ref.stage == "dpo" or ref.reference is not None)


def evaluate_models(models: list[tuple[str, str]], suite: Suite | None, settings: EvalSettings, *,
                    preference_data: str | None = None, preference_limit: int | None = 200,
                    reward_model: str | None = None, win_rate_limit: int = 32, baseline: str | None = None,
                    forgetting_threshold: float = 0.02) -> dict:
    """Everything the report shows, as one JSON-safe dict (see evaluate.py for the layout)."""
    refs = [resolve_model(n, p) for n, p in models]
    base_name, full_name = pick_baseline(refs, baseline), pick_full(refs)
    pairs, skipped, pairs_key = [], {}, None
    if preference_data:
        pairs, skipped = preference.load_pairs(preference_data, preference_limit)
        pairs_key = _file_key(preference_data, preference_limit)
    prompts = [p["prompt"] for p in pairs[:win_rate_limit]] if reward_model else []
    prompts_key = _file_key(preference_data, win_rate_limit) if prompts else None

    results: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": asdict(settings),
        "suite": {"name": suite.name, "path": suite.path, "tasks": [asdict(t) for t in suite.tasks]} if suite else None,
        "baseline": base_name, "full": full_name, "models": {}, "scores": {}, "preference": {}, "win_rate": {},
        "forgetting": {}, "training": {}, "samples": {},
        "preference_data": {"path": os.path.abspath(preference_data), "pairs": len(pairs), "skipped": skipped}
        if preference_data else None,
        "reward_model": os.path.abspath(reward_model) if reward_model else None,
        "forgetting_threshold": forgetting_threshold,
    }
    responses = {}
    for ref in refs:
        results["models"][ref.name] = ref.as_dict()
        log = read_training_log(ref.path)
        if log:
            results["training"][ref.name] = log
        if not ref.is_causal_lm:
            if pairs:
                judge = _judge(ref.path, settings)
                results["preference"][ref.name] = preference.reward_model_accuracy(judge, pairs)
            continue
        session = ModelSession(ref, settings, with_reference=bool(pairs) and _is_dpo(ref))
        results["models"][ref.name]["fingerprint"] = session.fingerprint
        if suite is not None:
            results["scores"][ref.name] = session.suite_scores(suite)
            results["samples"][ref.name] = session.samples
        if pairs and _is_dpo(ref):
            results["preference"][ref.name] = session.implicit_rewards(pairs, pairs_key)
        if prompts:
            responses[ref.name] = session.responses(prompts, prompts_key)
        session.close()

    if prompts and base_name in responses:
        judge = _judge(reward_model, settings)
        for name, answers in responses.items():
            if name != base_name:
                results["win_rate"][name] = {**preference.win_rate(judge, prompts, answers, responses[base_name]),
                                             "baseline": base_name}
        results["responses"] = {"prompts": prompts, **responses}

    if suite is not None and base_name in results["scores"]:
        base_general = general_scores(results["scores"][base_name], suite)
        for name, scores in results["scores"].items():
            if name != base_name and base_general:
                results["forgetting"][name] = check_forgetting(base_general, general_scores(scores, suite),
                                                               forgetting_threshold, mode="warn")
    return results
