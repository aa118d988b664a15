"""Evaluation suites: a YAML list of tasks over local files, and the documents of each task.

    suite = load_suite("recipes/eval/general_quick.yaml")
    docs = load_docs(suite.tasks[0])        # validated rows, cut to the task's limit, few-shot prefix applied

A suite file:

    name: general_quick
    defaults: {limit: 50, num_fewshot: 0}       # optional; any task key
    tasks:
      - name: arc_easy
        path: data/benchmarks/arc_easy.jsonl    # relative paths: to the repository root, else to the YAML file
        format: multiple_choice
        metric: acc_norm                        # the task's headline number (forgetting checks use it)

Formats and their rows (the layout of llm-foundry's eval-gauntlet files):

    multiple_choice  {query, choices: [str], gold: int}         log-likelihood of each choice after the query
    schema           {context_options: [str], continuation, gold} log-likelihood of the continuation after each
                                                                 context (WinoGrande / WSC partial scoring)
    lambada          {context, continuation}                     greedy match and perplexity of the last word
    gsm8k            {question, answer: "... #### <number>"}     greedy chat generation, exact match of the number
    perplexity       {<text_field>: str}                         token perplexity and bits per byte of the text
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from align.data import read_records
from align.paths import REPO_ROOT

FORMATS = ("multiple_choice", "schema", "lambada", "gsm8k", "perplexity")
GENERAL_FORMATS = ("multiple_choice", "schema", "lambada")  # counted in forgetting checks by default
DEFAULT_METRIC = {
    "multiple_choice": "acc", "schema": "acc", "lambada": "acc", "gsm8k": "exact_match", "perplexity": "perplexity",
}
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


class SuiteError(ValueError):
    """A suite file or task row that cannot be used, named by file, task and row."""


@dataclass
class TaskSpec:
    """One task of a suite; every key can be set per task in the YAML file (or under `defaults`)."""

    name: str
    path: str
    format: str
    limit: int | None = None  # first N rows (None: all)
    num_fewshot: int = 0  # examples from the rows after the evaluated ones, joined by `fewshot_delimiter`
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "  # between context and continuation, as lm-eval's `target_delimiter`
    metric: str | None = None  # headline metric; DEFAULT_METRIC of the format when unset
    general: bool | None = None  # counts in forgetting checks; default: the format is in GENERAL_FORMATS
    text_field: str = "text"  # perplexity: the column holding the text
    max_new_tokens: int = 256  # gsm8k: generation length
    lm_eval_task: str | None = None  # --backend lm-eval: a registered lm-eval task to run instead of this file

    def __post_init__(self):
        if self.format not in FORMATS:
            raise SuiteError(f"task {self.name}: unknown format {self.format!r} (choose from {', '.join(FORMATS)})")
        self.metric = self.metric or DEFAULT_METRIC[self.format]
        if self.general is None:
            self.general = self.format in GENERAL_FORMATS

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def fingerprint(self) -> str:
        """Hash of the task definition and its data file: a cached result is reused only for the same both."""
        spec = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("limit", "general", "lm_eval_task")}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        with open(self.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()[:16]


@dataclass
class Suite:
    name: str
    path: str
    tasks: list[TaskSpec] = field(default_factory=list)

    def select(self, names: list[str] | None) -> Suite:
        """The suite restricted to `names` (a quick check on a subset), in the suite's order."""
        if not names:
            return self
        unknown = sorted(set(names) - {t.name for t in self.tasks})
        if unknown:
            raise SuiteError(f"{self.path}: no task {', '.join(unknown)} (tasks: {', '.join(t.name for t in self.tasks)})")
        return Suite(self.name, self.path, [t for t in self.tasks if t.name in names])

    def with_limit(self, limit: int | None) -> Suite:
        """Every task cut to at most `limit` rows (None leaves the suite's limits)."""
        if limit is None:
            return self
        tasks = [dataclasses.replace(t, limit=limit if t.limit is None else min(t.limit, limit)) for t in self.tasks]
        return Suite(self.name, self.path, tasks)


_TASK_KEYS = {f.name for f in dataclasses.fields(TaskSpec)}


def _resolve_path(path: str, suite_path: str) -> str:
    if os.path.isabs(path):
        return path
    for root in (REPO_ROOT, os.path.dirname(os.path.abspath(suite_path)), os.getcwd()):
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return os.path.abspath(os.path.join(REPO_ROOT, path))


def _task(entry: Any, defaults: dict, suite_path: str, index: int) -> TaskSpec:
    if not isinstance(entry, dict):
        raise SuiteError(f"{suite_path}: tasks[{index}] must be a mapping of task keys")
    merged = {**defaults, **entry}
    unknown = sorted(set(merged) - _TASK_KEYS)
    if unknown:
        raise SuiteError(f"{suite_path}: tasks[{index}]: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_TASK_KEYS))})")
    for key in ("name", "path", "format"):
        if not merged.get(key):
            raise SuiteError(f"{suite_path}: tasks[{index}]: missing key '{key}'")
    merged["path"] = _resolve_path(str(merged["path"]), suite_path)
    if not os.path.isfile(merged["path"]):
        raise SuiteError(f"{suite_path}: task {merged['name']}: data file {merged['path']} not found")
    return TaskSpec(**merged)


def load_suite(path: str) -> Suite:
    """Parse a suite YAML file; task keys are checked, data paths resolved and checked."""
    if not os.path.isfile(path):
        raise SuiteError(f"suite file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise SuiteError(f"{path}: a suite is a mapping with a non-empty 'tasks' list")
    defaults = data.get("defaults") or {}
    tasks = [_task(t, defaults, path, i) for i, t in enumerate(data["tasks"])]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise SuiteError(f"{path}: task names must be unique, got {names}")
    return Suite(name=data.get("name") or os.path.splitext(os.path.basename(path))[0], path=os.path.abspath(path),
                 tasks=tasks)


# ------------------------------------------------------------------------------------------------------ documents


@dataclass
class Doc:
    """One evaluated row: `contexts` x `continuations` to score (one of them has length 1), the gold index."""

    contexts: list[str]
    continuations: list[str]
    gold: int = 0
    choice_texts: list[str] = field(default_factory=list)  # acc_norm lengths: the choices without the delimiter
    raw: dict = field(default_factory=dict)


def _need(task: TaskSpec, rec, key: str, kind: type | tuple):
    value = rec.data.get(key)
    if not isinstance(value, kind):
        raise SuiteError(f"{rec.source}, row {rec.row}, field '{key}': expected {getattr(kind, '__name__', kind)} "
                         f"for a {task.format} task, got {type(value).__name__}")
    return value


def _gold(task: TaskSpec, rec, n: int) -> int:
    gold = _need(task, rec, "gold", int)
    if not 0 <= gold < n:
        raise SuiteError(f"{rec.source}, row {rec.row}, field 'gold': {gold} is not an index of {n} options")
    return gold


def _example(task: TaskSpec, rec) -> str:
    """A solved row, as a few-shot example: the gold context followed by the gold continuation."""
    d = _doc(task, rec, "")
    context = d.contexts[d.gold] if len(d.contexts) > 1 else d.contexts[0]
    continuation = d.continuations[d.gold] if len(d.continuations) > 1 else d.continuations[0]
    return context + continuation


def _doc(task: TaskSpec, rec, prefix: str) -> Doc:
    sep = task.target_delimiter
    if task.format == "multiple_choice":
        query, choices = _need(task, rec, "query", str), _need(task, rec, "choices", list)
        return Doc([prefix + query], [sep + c for c in choices], _gold(task, rec, len(choices)), list(choices),
                   rec.data)
    if task.format == "schema":
        options = _need(task, rec, "context_options", list)
        cont = _need(task, rec, "continuation", str)
        return Doc([prefix + o for o in options], [sep + cont], _gold(task, rec, len(options)), list(options),
                   rec.data)
    if task.format == "lambada":
        ctx, cont = _need(task, rec, "context", str), _need(task, rec, "continuation", str)
        return Doc([prefix + ctx], [sep + cont], 0, [cont], rec.data)
    if task.format == "gsm8k":
        _need(task, rec, "question", str), _need(task, rec, "answer", str)
        return Doc([rec.data["question"]], [rec.data["answer"]], 0, [], rec.data)
    return Doc([_need(task, rec, task.text_field, str)], [], 0, [], rec.data)


def load_docs(task: TaskSpec) -> list[Doc]:
    """The task's first `limit` rows as Docs; few-shot examples come from the rows after them, the same for all."""
    records = read_records(task.path)
    evaluated = records[: task.limit] if task.limit is not None else records
    prefix = ""
    if task.num_fewshot:
        if task.format not in GENERAL_FORMATS:
            raise SuiteError(f"task {task.name}: num_fewshot is for {', '.join(GENERAL_FORMATS)} tasks")
        shots = records[len(evaluated): len(evaluated) + task.num_fewshot]
        if len(shots) < task.num_fewshot:
            raise SuiteError(f"task {task.name}: {task.num_fewshot} few-shot examples need rows beyond the "
                             f"{len(evaluated)} evaluated ones; {task.path} has {len(records)}")
        prefix = "".join(_example(task, r) + task.fewshot_delimiter for r in shots)
    return [_doc(task, r, prefix) for r in evaluated]
