"""One path from any supported data file to chat messages (SFT) or preference pairs (DPO, reward model).

    read_records(source)            local .jsonl/.json/.json.gz/.jsonl.gz/.parquet/.csv, a directory, or a hub name
    to_messages(record)             messages | sharegpt | alpaca | prompt_completion | hh | gsm8k  -> chat messages
    to_preference(record)           prompt/chosen/rejected (explicit or implicit prompt), ShareGPT pairs -> messages
    tokenize_conversation(...)      chat template -> input_ids, labels on assistant tokens (end-of-turn included)
    build_sft_datasets(...)         all of the above, split, filtered with counts  -> datasets.Dataset
    build_preference_datasets(...)  the same for pairs -> TRL's conversational prompt/chosen/rejected columns

A malformed row raises `DataError` naming file, row and field. Rows dropped on purpose (too long, chosen equal
to rejected, nothing to train on) are counted in a `DataReport`, logged, and written into run.json.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("align.data")

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bing": "assistant", "chatgpt": "assistant"}
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "hh", "gsm8k", "text")
LOCAL_SUFFIXES = (".jsonl", ".json", ".json.gz", ".jsonl.gz", ".parquet", ".csv")

# The documented default for models whose tokenizer has no chat template: plain-text role markers (no new
# tokens to learn), every turn closed by the tokenizer's EOS token so a tuned model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class DataError(ValueError):
    """A row that cannot be used, named by file, row (from 1) and field."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field, self.reason = file, row, field, message
        where = ", ".join(x for x in (file, f"row {row}" if row is not None else None,
                                      f"field '{field}'" if field else None) if x)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class Record:
    source: str
    row: int
    data: dict

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.source, row=self.row, field=field)


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _read_jsonl(path: str) -> list[Record]:
    out = []
    with _open_text(path) as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON: {err.msg} (column {err.colno})", file=path, row=i) from err
            if not isinstance(obj, dict):
                raise DataError(f"a row must be a JSON object, got {type(obj).__name__}", file=path, row=i)
            out.append(Record(path, i, obj))
    return out


def _read_json(path: str) -> list[Record]:
    with _open_text(path) as fh:
        text = fh.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if "\n{" in text.strip():  # JSON lines saved as .json
            return _read_jsonl(path)
        raise DataError(f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})", file=path) from err
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("a JSON file must hold a list of rows, or an object with exactly one list", file=path)
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError("a JSON file must hold a list of rows", file=path)
    out = []
    for i, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise DataError(f"a row must be a JSON object, got {type(row).__name__}", file=path, row=i)
        out.append(Record(path, i, row))
    return out


def _read_table(path: str) -> list[Record]:
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    return [Record(path, i, dict(r)) for i, r in enumerate(rows, start=1)]


def read_records(source: str, split: str = "train", config: str | None = None) -> list[Record]:
    """Rows of a local file or directory, or of a hub dataset (`datasets.load_dataset(source, config, split)`)."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(LOCAL_SUFFIXES))
        if not files:
            raise DataError(f"no data files ({', '.join(LOCAL_SUFFIXES)}) in this directory", file=source)
        return [r for f in files for r in read_records(f)]
    if os.path.isfile(source):
        if source.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(source)
        if source.endswith((".json", ".json.gz")):
            return _read_json(source)
        if source.endswith((".parquet", ".csv")):
            return _read_table(source)
        raise DataError(f"unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}", file=source)
    if source.startswith((".", "/")) or source.endswith(LOCAL_SUFFIXES):
        raise DataError("file not found", file=source)
    import datasets

    ds = datasets.load_dataset(source, config, split=split)
    return [Record(f"{source}:{split}", i, dict(r)) for i, r in enumerate(ds, start=1)]


# ---------------------------------------------------------------------------------------------------------------
# Rows -> chat messages


def detect_format(row: dict, kind: str = "sft") -> str:
    keys = set(row)
    if kind == "preference":
        return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "gsm8k"
    if "chosen" in keys and isinstance(row["chosen"], str) and "\n\nHuman:" in row["chosen"]:
        return "hh"
    if "text" in keys and isinstance(row["text"], str) and "\n\nHuman:" in row["text"]:
        return "hh"
    if "text" in keys:
        return "text"
    raise DataError(f"cannot tell the format from the columns {sorted(keys)}; set dataset_format")


def _text(record: Record, value: Any, fld: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__}", fld)
    if not allow_empty and not value.strip():
        raise record.error("empty text", fld)
    return value


def _field(record: Record, name: str):
    if name not in record.data or record.data[name] is None:
        raise record.error("missing field", name)
    return record.data[name]


def _check_messages(record: Record, messages, fld: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise record.error("expected a non-empty list of messages", fld)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise record.error("a message must be an object with role and content", f"{fld}[{i}]")
        if "role" not in m:
            raise record.error("missing field", f"{fld}[{i}].role")
        if "content" not in m:
            raise record.error("missing field", f"{fld}[{i}].content")
        role = m["role"]
        if role not in ROLES:
            raise record.error(f"unknown role {role!r} (expected system/user/assistant)", f"{fld}[{i}].role")
        content = _text(record, m["content"], f"{fld}[{i}].content", allow_empty=role != "assistant")
        out.append({"role": role, "content": content})
    return out


def _sharegpt(record: Record, turns, fld: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise record.error("expected a non-empty list of turns", fld)
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise record.error("a turn must be an object with 'from' and 'value'", f"{fld}[{i}]")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise record.error(f"unknown role {t['from']!r} (expected human/gpt/system)", f"{fld}[{i}].from")
        out.append({"role": role, "content": _text(record, t["value"], f"{fld}[{i}].value",
                                                   allow_empty=role != "assistant")})
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(record: Record, text: str, fld: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' dialogue text -> messages."""
    text = _text(record, text, fld)
    if not text.startswith("\n\n"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise record.error("not an HH-RLHF dialogue ('\\n\\nHuman: ...\\n\\nAssistant: ...')", fld)
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        out.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return out


def _check_conversation(record: Record, messages: list[dict], fld: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise record.error("no assistant turn", fld)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise record.error("empty assistant turn", f"{fld}[{i}].content")
    if messages[-1]["role"] != "assistant":
        raise record.error("the conversation must end with an assistant turn", fld)
    return messages


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def to_messages(record: Record, fmt: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """An SFT row as a conversation that ends with an assistant turn."""
    d = record.data
    fmt = detect_format(d) if fmt == "auto" else fmt
    if fmt == "messages":
        msgs, fld = _check_messages(record, _field(record, "messages"), "messages"), "messages"
    elif fmt == "sharegpt":
        msgs, fld = _sharegpt(record, _field(record, "conversations"), "conversations"), "conversations"
    elif fmt == "alpaca":
        instruction = _text(record, _field(record, "instruction"), "instruction")
        extra = d.get("input") or ""
        user = instruction + ("\n\n" + _text(record, extra, "input") if extra.strip() else "")
        msgs = []
        if d.get("system"):
            msgs.append({"role": "system", "content": _text(record, d["system"], "system")})
        for i, pair in enumerate(d.get("history") or []):
            if not isinstance(pair, list) or len(pair) != 2:
                raise record.error("expected [user, assistant] pairs", f"history[{i}]")
            msgs += [{"role": "user", "content": _text(record, pair[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _text(record, pair[1], f"history[{i}][1]")}]
        msgs += [{"role": "user", "content": user},
                 {"role": "assistant", "content": _text(record, _field(record, "output"), "output")}]
        fld = "output"
    elif fmt == "prompt_completion":
        p, c = _field(record, "prompt"), _field(record, "completion")
        prompt = _check_messages(record, p, "prompt") if isinstance(p, list) else [
            {"role": "user", "content": _text(record, p, "prompt")}]
        completion = _check_messages(record, c, "completion") if isinstance(c, list) else [
            {"role": "assistant", "content": _text(record, c, "completion")}]
        msgs, fld = prompt + completion, "completion"
    elif fmt == "hh":
        key = "chosen" if "chosen" in d else "text"
        msgs, fld = parse_hh(record, _field(record, key), key), key
    elif fmt == "gsm8k":
        msgs = [{"role": "user", "content": _text(record, _field(record, "question"), "question")},
                {"role": "assistant", "content": _text(record, _field(record, "answer"), "answer")}]
        fld = "answer"
    else:
        raise DataError(f"format {fmt!r} is not a chat format (choose from {', '.join(SFT_FORMATS[:-1])})",
                        file=record.source, row=record.row)
    return _with_system(_check_conversation(record, msgs, fld), system_prompt)


def _as_turns(record: Record, value, fld: str) -> list[dict]:
    """A preference side: a string (one assistant turn), a message list, an HH dialogue, or a ShareGPT turn."""
    if isinstance(value, str):
        if "\n\nHuman:" in value:
            return parse_hh(record, value, fld)
        return [{"role": "assistant", "content": _text(record, value, fld)}]
    if isinstance(value, dict) and "from" in value:
        return _sharegpt(record, [value], fld)
    return _check_messages(record, value, fld)


def _split_common_prefix(record: Record, chosen: list[dict], rejected: list[dict]):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise record.error("chosen and rejected share no prompt turns", "chosen")
    return prompt, c, r


def to_preference(record: Record, system_prompt: str | None = None) -> dict:
    """A preference row as {"prompt": messages, "chosen": [assistant turn(s)], "rejected": [...]}."""
    d = record.data
    chosen = _as_turns(record, _field(record, "chosen"), "chosen")
    rejected = _as_turns(record, _field(record, "rejected"), "rejected")
    if "conversations" in d:
        prompt = _sharegpt(record, d["conversations"], "conversations")
    elif "prompt" in d and d["prompt"] is not None:
        p = d["prompt"]
        prompt = _check_messages(record, p, "prompt") if isinstance(p, list) else (
            parse_hh(record, p, "prompt") if "\n\nHuman:" in p else [{"role": "user", "content": _text(record, p, "prompt")}])
        # message lists that repeat the prompt before the answer (UltraFeedback style): keep the answer only
        if chosen[: len(prompt)] == prompt:
            chosen = chosen[len(prompt):]
        if rejected[: len(prompt)] == prompt:
            rejected = rejected[len(prompt):]
    else:  # implicit prompt: the shared prefix of the two dialogues
        prompt, chosen, rejected = _split_common_prefix(record, chosen, rejected)
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant":
            raise record.error("must end with an assistant turn", name)
        if not side[-1]["content"].strip():
            raise record.error("empty assistant turn", name)
    if prompt[-1]["role"] == "assistant":
        raise record.error("the prompt must end with a user turn", "prompt")
    return {"prompt": _with_system(prompt, system_prompt), "chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------------------------------------------------------
# Chat template and tokenization


def ensure_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """Set the tokenizer's template (its own, `default`, a file or a Jinja string); return the template's sha256."""
    if chat_template == "default":
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    elif chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template) as fh:
                chat_template = fh.read()
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        logger.info("the tokenizer has no chat template: using align's default (data.DEFAULT_CHAT_TEMPLATE)")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (with its end-of-turn marker)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise ValueError(
                "the chat template is not prefix-consistent (rendering a conversation's first turns does not give "
                "a prefix of the whole), so assistant tokens cannot be located; use `chat_template: default` or a "
                "template without history-dependent rewriting"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_conversation(messages: list[dict], tokenizer, *, assistant_only_loss: bool = True) -> dict:
    """Token ids and labels: labels are -100 outside assistant turns (all tokens when `assistant_only_loss` is off)."""
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not assistant_only_loss:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [-100] * len(ids)
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        if any(s <= start and end <= e and end > start for s, e in spans):
            labels[k] = ids[k]
    return {"input_ids": ids, "labels": labels}


def check_template_ends_turns_with_eos(tokenizer) -> None:
    """Every assistant turn must end with the EOS token in the targets, or a tuned model will not stop."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    text, spans = assistant_spans(probe, tokenizer)
    s, e = spans[-1]
    if tokenizer.eos_token not in text[s:e]:
        raise ValueError(
            f"the chat template does not end an assistant turn with the EOS token {tokenizer.eos_token!r} "
            f"(an assistant turn renders as {text[s:e]!r}). Set `eos_token` to the template's end-of-turn token "
            "(e.g. <|eot_id|>, <end_of_turn>, <|end|>), or use `chat_template: default`."
        )


# ---------------------------------------------------------------------------------------------------------------
# Splits, counts and datasets


@dataclass
class DataReport:
    source: str
    total: int = 0
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    train: int = 0
    eval: int = 0

    def drop(self, reason: str) -> None:
        self.filtered[reason] = self.filtered.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered.items())) or "none"
        return (f"{self.source}: {self.total} rows, kept {self.kept} (train {self.train}, eval {self.eval}); "
                f"filtered: {dropped}")


def split_train_eval(items: list, eval_split_size: float, seed: int) -> tuple[list, list]:
    """Deterministic split: a fraction (<1) or a count (>=1) of rows held out, chosen by a seeded shuffle."""
    if not eval_split_size:
        return list(items), []
    n_eval = int(round(len(items) * eval_split_size)) if eval_split_size < 1 else int(eval_split_size)
    n_eval = max(1, min(n_eval, len(items) - 1))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _records(data_args) -> tuple[list[Record], list[Record] | None]:
    if not data_args.dataset_name:
        raise DataError("no dataset: set dataset_name (a local file or directory, or a hub dataset)")
    train = read_records(data_args.dataset_name, data_args.dataset_train_split, data_args.dataset_config)
    evals = None
    if data_args.eval_dataset_name:
        evals = read_records(data_args.eval_dataset_name, data_args.dataset_test_split, data_args.dataset_config)
    return train, evals


def _split(data_args, report: DataReport, train: list, evals: list | None, seed: int):
    if evals is None:
        train, evals = split_train_eval(train, data_args.eval_split_size, seed)
    if data_args.max_train_samples:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples:
        evals = evals[: data_args.max_eval_samples]
    if not train:
        raise DataError(f"no training rows left after filtering ({report.summary()})")
    report.train, report.eval = len(train), len(evals)
    logger.info("data: %s", report.summary())
    return train, evals


def build_sft_datasets(data_args, tokenizer, *, max_length: int | None, assistant_only_loss: bool = True,
                       seed: int = 42):
    """Tokenized SFT datasets (`input_ids`, `labels`) and the report of what was kept and filtered."""
    import datasets

    check_template_ends_turns_with_eos(tokenizer)
    train_recs, eval_recs = _records(data_args)
    report = DataReport(source=data_args.dataset_name)

    def convert(records):
        rows = []
        for rec in records:
            report.total += 1
            if data_args.dataset_format == "text" or (data_args.dataset_format == "auto" and detect_format(rec.data) == "text"):
                ids = tokenizer(_text(rec, _field(rec, "text"), "text"), add_special_tokens=False)["input_ids"]
                ids = ids + [tokenizer.eos_token_id]
                row = {"input_ids": ids, "labels": list(ids)}
            else:
                msgs = to_messages(rec, data_args.dataset_format, data_args.system_prompt)
                row = tokenize_conversation(msgs, tokenizer, assistant_only_loss=assistant_only_loss)
            if max_length and len(row["input_ids"]) > max_length:
                report.drop("too_long")
            elif all(x == -100 for x in row["labels"]):
                report.drop("no_assistant_tokens")
            else:
                rows.append(row)
        report.kept += len(rows)
        return rows

    train = convert(train_recs)
    evals = convert(eval_recs) if eval_recs is not None else None
    train, evals = _split(data_args, report, train, evals, seed)
    to_ds = datasets.Dataset.from_list
    return to_ds(train), (to_ds(evals) if evals else None), report


def build_preference_datasets(data_args, tokenizer, *, max_length: int | None, seed: int = 42):
    """Preference datasets in TRL's conversational form (`prompt`, `chosen`, `rejected` message lists)."""
    import datasets

    check_template_ends_turns_with_eos(tokenizer)
    train_recs, eval_recs = _records(data_args)
    report = DataReport(source=data_args.dataset_name)

    def length(msgs):
        return len(tokenizer(_render(tokenizer, msgs), add_special_tokens=False)["input_ids"])

    def convert(records):
        rows = []
        for rec in records:
            report.total += 1
            pair = to_preference(rec, data_args.system_prompt)
            if pair["chosen"] == pair["rejected"]:
                report.drop("chosen_equals_rejected")
            elif max_length and max(length(pair["prompt"] + pair["chosen"]),
                                    length(pair["prompt"] + pair["rejected"])) > max_length:
                report.drop("too_long")
            else:
                rows.append(pair)
        report.kept += len(rows)
        return rows

    train = convert(train_recs)
    evals = convert(eval_recs) if eval_recs is not None else None
    train, evals = _split(data_args, report, train, evals, seed)
    to_ds = datasets.Dataset.from_list
    return to_ds(train), (to_ds(evals) if evals else None), report
