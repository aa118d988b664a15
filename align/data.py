"""One path from any supported data file to chat messages (SFT) or preference pairs (DPO, reward model).

    read_records(source)            .jsonl/.json/.json.gz/.jsonl.gz/.parquet/.csv, a directory, or a hub name
    to_messages(record)             any SFT row format (below)  -> chat messages
    to_preference(record)           explicit or implicit prompt, ShareGPT pairs  -> prompt / chosen / rejected
    ensure_chat_template(tok)       the tokenizer's template, a file, a Jinja string, or DEFAULT_CHAT_TEMPLATE
    tokenize_conversation(...)      chat template -> input_ids, labels on assistant tokens (with end of turn)
    build_sft_datasets(...)         all of the above, split and filtered with counts -> datasets.Dataset
    build_preference_datasets(...)  the same for pairs -> TRL's conversational prompt/chosen/rejected columns

Row formats (`dataset_format: auto` picks one per row from its columns, see `detect_format`):

    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    sharegpt           {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value"}, ...]}
    alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    prompt_completion  {"prompt", "completion"}: strings, or message lists
    hh                 {"chosen" or "text": "\\n\\nHuman: ...\\n\\nAssistant: ..."}  (HH-RLHF dialogue text)
    gsm8k              {"question", "answer"}
    text               {"text"}: plain text, trained on whole (not a conversation; only `build_sft_datasets`)
    preference         {"prompt"?, "chosen", "rejected"} or {"conversations", "chosen", "rejected"};
                       for SFT, the prompt followed by the chosen response

Malformed rows raise `DataError` naming file, row (from 1) and field. Rows dropped on purpose are counted in
a `DataReport` (logged, and written into run.json): too long, chosen equal to rejected, nothing to train on,
and an empty response (`EmptyResponseError`; real sets have a few, e.g. Alpaca's empty outputs).
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

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "hh", "gsm8k", "text")
LOCAL_SUFFIXES = (".jsonl", ".json", ".json.gz", ".jsonl.gz", ".parquet", ".csv")
TEMPLATE_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt")

# The documented default for tokenizers without a chat template (base models): Zephyr-like plain-text role
# markers, so no new tokens need embeddings, and every turn closed by the tokenizer's EOS token so a tuned
# model learns to stop.
#   <|system|>\n{content}{eos}\n   <|user|>\n{content}{eos}\n   <|assistant|>\n{content}{eos}\n
# Generation prompt: "<|assistant|>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------------------
# Errors and records


class DataError(ValueError):
    """A row or file that cannot be used, named by file, row (from 1) and field."""

    def __init__(
        self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None
    ):
        self.file, self.row, self.field, self.reason = file, row, field, message
        where = [file, f"row {row}" if row is not None else None, f"field '{field}'" if field else None]
        where = ", ".join(w for w in where if w)
        super().__init__(f"{where}: {message}" if where else message)


class EmptyResponseError(DataError):
    """An assistant turn without text. The builders count these rows as `empty` instead of stopping."""


@dataclass
class Record:
    """One row as read: where it came from (file, row from 1) and its columns."""

    source: str
    row: int
    data: dict

    def error(self, message: str, field: str | None = None, cls: type[DataError] = DataError) -> DataError:
        return cls(message, file=self.source, row=self.row, field=field)


# ------------------------------------------------------------------------------------------------------------
# Reading files


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _row(path: str, row: int, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"a row must be a JSON object, got {type(obj).__name__}", file=path, row=row)
    return Record(path, row, obj)


def _read_jsonl(path: str) -> list[Record]:
    records = []
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"not valid JSON: {err.msg} (column {err.colno})", file=path, row=line_no
                ) from None
            records.append(_row(path, line_no, obj))
    return records


def _read_json(path: str) -> list[Record]:
    with _open_text(path) as fh:
        text = fh.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and "\n{" in text:  # JSON lines saved as .json
            return _read_jsonl(path)
        raise DataError(
            f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})", file=path
        ) from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                "a JSON file must hold a list of rows, or an object holding exactly one list", file=path
            )
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError("a JSON file must hold a list of rows", file=path)
    return [_row(path, i, r) for i, r in enumerate(obj, start=1)]


def _read_table(path: str) -> list[Record]:
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    return [Record(path, i, dict(r)) for i, r in enumerate(rows, start=1)]


def _read_hub(name: str, split: str, config: str | None) -> list[Record]:
    import datasets

    ds = datasets.load_dataset(name, config, split=split)
    return [Record(f"{name}:{split}", i, dict(r)) for i, r in enumerate(ds, start=1)]


def read_records(source: str, split: str = "train", config: str | None = None) -> list[Record]:
    """Rows of a local file, of every supported file in a directory (sorted by name), or of a hub dataset.

    `split` and `config` apply to hub datasets only (`datasets.load_dataset(source, config, split=split)`).
    """
    source = os.path.expanduser(source)
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
    return _read_hub(source, split, config)


# ------------------------------------------------------------------------------------------------------------
# Row formats -> chat messages


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip(" ").startswith(("\n\nHuman:", "Human:"))


def detect_format(row: dict, kind: str = "sft") -> str:
    """The row format from the columns; `kind="preference"` checks for a chosen/rejected pair."""
    keys = set(row)
    pair = {"chosen", "rejected"} <= keys
    if kind == "preference":
        if not pair:
            raise DataError(f"a preference row needs 'chosen' and 'rejected' columns, got {sorted(keys)}")
        return "preference"
    if "messages" in keys:
        return "messages"
    if pair:
        return "hh" if _is_hh(row["chosen"]) and row.get("prompt") is None else "preference"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "text" in keys:
        return "hh" if _is_hh(row["text"]) else "text"
    raise DataError(f"cannot tell the format from the columns {sorted(keys)}; set dataset_format")


def _field(record: Record, name: str) -> Any:
    if record.data.get(name) is None:
        raise record.error("missing field", name)
    return record.data[name]


def _turn(record: Record, role: str, value: Any, fld: str) -> dict:
    """One message; assistant text must be non-empty (`EmptyResponseError`), any text must be a string."""
    if not isinstance(value, str):
        raise record.error(f"expected a string, got {type(value).__name__}", fld)
    if role == "assistant" and not value.strip():
        raise record.error("empty assistant turn", fld, EmptyResponseError)
    return {"role": role, "content": value}


def _messages(record: Record, value: Any, fld: str) -> list[dict]:
    """A list of {"role", "content"} messages; roles strictly system/user/assistant."""
    if not isinstance(value, list) or not value:
        raise record.error("expected a non-empty list of messages", fld)
    out = []
    for i, m in enumerate(value):
        at = f"{fld}[{i}]"
        if not isinstance(m, dict):
            raise record.error("expected an object with 'role' and 'content'", at)
        for key in ("role", "content"):
            if key not in m:
                raise record.error("missing field", f"{at}.{key}")
        if m["role"] not in ROLES:
            raise record.error(f"unknown role {m['role']!r} (expected system/user/assistant)", f"{at}.role")
        out.append(_turn(record, m["role"], m["content"], f"{at}.content"))
    return out


def _sharegpt_turn(record: Record, turn: Any, at: str) -> dict:
    if not isinstance(turn, dict):
        raise record.error("expected an object with 'from' and 'value'", at)
    for key in ("from", "value"):
        if key not in turn:
            raise record.error("missing field", f"{at}.{key}")
    role = SHAREGPT_ROLES.get(turn["from"])
    if role is None:
        raise record.error(
            f"unknown role {turn['from']!r} (expected {'/'.join(SHAREGPT_ROLES)})", f"{at}.from"
        )
    return _turn(record, role, turn["value"], f"{at}.value")


def _sharegpt(record: Record, value: Any, fld: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise record.error("expected a non-empty list of turns", fld)
    return [_sharegpt_turn(record, t, f"{fld}[{i}]") for i, t in enumerate(value)]


_HH_MARKER = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh(record: Record, text: Any, fld: str) -> list[dict]:
    """HH-RLHF dialogue text '\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages (contents stripped)."""
    if not isinstance(text, str):
        raise record.error(f"expected a string, got {type(text).__name__}", fld)
    parts = _HH_MARKER.split("\n\n" + text.lstrip(" \n"))
    if parts[0].strip() or len(parts) < 3:
        raise record.error("not an HH-RLHF dialogue ('\\n\\nHuman: ...\\n\\nAssistant: ...')", fld)
    speakers, contents = parts[1::2], parts[2::2]
    return [
        _turn(record, "user" if s == "Human" else "assistant", c.strip(), fld)
        for s, c in zip(speakers, contents)
    ]


def _alpaca(record: Record) -> list[dict]:
    d = record.data
    instruction = _turn(record, "user", _field(record, "instruction"), "instruction")["content"]
    extra = d.get("input") or ""
    if not isinstance(extra, str):
        raise record.error(f"expected a string, got {type(extra).__name__}", "input")
    msgs = [_turn(record, "system", d["system"], "system")] if d.get("system") else []
    history = d.get("history") or []
    if not isinstance(history, list):
        raise record.error("expected a list of [user, assistant] pairs", "history")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise record.error("expected a [user, assistant] pair", f"history[{i}]")
        msgs += [
            _turn(record, "user", pair[0], f"history[{i}][0]"),
            _turn(record, "assistant", pair[1], f"history[{i}][1]"),
        ]
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return msgs + [
        {"role": "user", "content": user},
        _turn(record, "assistant", _field(record, "output"), "output"),
    ]


def _prompt_completion(record: Record) -> list[dict]:
    p, c = _field(record, "prompt"), _field(record, "completion")
    prompt = _messages(record, p, "prompt") if isinstance(p, list) else [_turn(record, "user", p, "prompt")]
    completion = (
        _messages(record, c, "completion")
        if isinstance(c, list)
        else [_turn(record, "assistant", c, "completion")]
    )
    return prompt + completion


def _conversation(record: Record, fmt: str) -> tuple[list[dict], str]:
    """The messages of a row in chat format `fmt`, and the field they came from (for errors)."""
    if fmt == "messages":
        return _messages(record, _field(record, "messages"), "messages"), "messages"
    if fmt == "sharegpt":
        return _sharegpt(record, _field(record, "conversations"), "conversations"), "conversations"
    if fmt == "alpaca":
        return _alpaca(record), "output"
    if fmt == "prompt_completion":
        return _prompt_completion(record), "completion"
    if fmt == "hh":
        key = "chosen" if "chosen" in record.data else "text"
        return parse_hh(record, _field(record, key), key), key
    if fmt == "gsm8k":
        return [
            _turn(record, "user", _field(record, "question"), "question"),
            _turn(record, "assistant", _field(record, "answer"), "answer"),
        ], "answer"
    if fmt == "preference":
        pair = to_preference(record)
        return pair["prompt"] + pair["chosen"], "chosen"
    if fmt == "text":
        raise record.error(
            "a 'text' row is plain text, not a conversation (build_sft_datasets trains on it whole)"
        )
    raise record.error(f"unknown format {fmt!r} (choose from {', '.join(SFT_FORMATS)}, preference)")


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def _row_format(record: Record, fmt: str, kind: str = "sft") -> str:
    if fmt != "auto":
        return fmt
    try:
        return detect_format(record.data, kind)
    except DataError as err:
        raise record.error(err.reason) from None


def to_messages(record: Record, fmt: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """A row as a conversation with at least one assistant turn, ending with one.

    `fmt` is one of SFT_FORMATS except "text" (which is not a conversation and raises DataError), or
    "preference" (the prompt followed by the chosen response), or "auto". `system_prompt` is prepended when
    the conversation has no system message.
    """
    msgs, fld = _conversation(record, _row_format(record, fmt))
    if not any(m["role"] == "assistant" for m in msgs):
        raise record.error("no assistant turn", fld)
    if msgs[-1]["role"] != "assistant":
        raise record.error(f"the conversation must end with an assistant turn, not {msgs[-1]['role']}", fld)
    return _with_system(msgs, system_prompt)


# ------------------------------------------------------------------------------------------------------------
# Preference rows -> prompt / chosen / rejected


def _response(record: Record, value: Any, fld: str) -> list[dict]:
    """One side of an explicit pair: a string (one assistant turn), a ShareGPT turn, or a message list."""
    if isinstance(value, str):
        return [_turn(record, "assistant", value, fld)]
    if isinstance(value, dict):
        return [_sharegpt_turn(record, value, fld)]
    return _messages(record, value, fld)


def _dialogue(record: Record, value: Any, fld: str) -> list[dict]:
    """One side of an implicit-prompt pair: HH dialogue text or a full message list."""
    return parse_hh(record, value, fld) if isinstance(value, str) else _messages(record, value, fld)


_HH_OPEN_ASSISTANT = re.compile(r"\n\nAssistant:\s*$")


def _explicit_prompt(record: Record, value: Any) -> list[dict]:
    """A prompt string (one user turn), HH dialogue text (a trailing open 'Assistant:' dropped), messages."""
    if isinstance(value, list):
        return _messages(record, value, "prompt")
    if _is_hh(value):
        return parse_hh(record, _HH_OPEN_ASSISTANT.sub("", value), "prompt")
    return [_turn(record, "user", value, "prompt")]


def _drop_prefix(prefix: list[dict], side: list[dict]) -> list[dict]:
    """UltraFeedback-style sides repeat the prompt before the answer: keep the answer only."""
    if len(side) > len(prefix) and side[: len(prefix)] == prefix:
        return side[len(prefix) :]
    return side


def _split_common_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Implicit prompt: the longest run of equal leading turns, leaving at least one turn on each side."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _pair_parts(record: Record) -> tuple[list[dict], list[dict], list[dict]]:
    d = record.data
    chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
    if d.get("conversations") is not None:  # LLaMA-Factory ShareGPT pairs
        prompt = _sharegpt(record, d["conversations"], "conversations")
        return prompt, _response(record, chosen, "chosen"), _response(record, rejected, "rejected")
    if d.get("prompt") is not None:
        prompt = _explicit_prompt(record, d["prompt"])
        return (
            prompt,
            _drop_prefix(prompt, _response(record, chosen, "chosen")),
            _drop_prefix(prompt, _response(record, rejected, "rejected")),
        )
    return _split_common_prefix(_dialogue(record, chosen, "chosen"), _dialogue(record, rejected, "rejected"))


def to_preference(record: Record, system_prompt: str | None = None) -> dict:
    """A preference row as {"prompt": messages ending with a user turn, "chosen": [...], "rejected": [...]}.

    The prompt is explicit (`prompt`: a string or messages; chosen/rejected message lists that repeat it have
    it stripped), ShareGPT (`conversations` with `chosen`/`rejected` turns), or implicit: the turns that the
    chosen and rejected dialogues (HH-RLHF text or message lists) share, the rest being the two responses.
    """
    prompt, chosen, rejected = _pair_parts(record)
    if not prompt:
        raise record.error(
            "no prompt: chosen and rejected share no leading turns and there is no 'prompt'", "prompt"
        )
    if prompt[-1]["role"] != "user":
        raise record.error(f"the prompt must end with a user turn, not {prompt[-1]['role']}", "prompt")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant":
            raise record.error(f"must end with an assistant turn, not {side[-1]['role']}", name)
    return {"prompt": _with_system(prompt, system_prompt), "chosen": chosen, "rejected": rejected}


# ------------------------------------------------------------------------------------------------------------
# Chat template and tokenization


def _template_text(tokenizer, chat_template: str | None) -> str:
    if chat_template is None:
        if tokenizer.chat_template:
            return tokenizer.chat_template
        logger.info(
            "the tokenizer has no chat template: using align's default (align.data.DEFAULT_CHAT_TEMPLATE)"
        )
        return DEFAULT_CHAT_TEMPLATE
    if chat_template == "default":
        return DEFAULT_CHAT_TEMPLATE
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as fh:
            return fh.read()
    if chat_template.endswith(TEMPLATE_FILE_SUFFIXES):
        raise FileNotFoundError(f"chat_template file not found: {chat_template}")
    if "{{" not in chat_template and "{%" not in chat_template:
        raise ValueError(
            f"chat_template {chat_template[:80]!r} is neither a file, 'default', nor a Jinja template"
        )
    return chat_template


def ensure_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """Set `tokenizer.chat_template` and a pad token; return the template's sha256 (hex) for lineage.

    chat_template: None keeps the tokenizer's own (DEFAULT_CHAT_TEMPLATE when it has none); "default" forces
    DEFAULT_CHAT_TEMPLATE; a path to a .jinja/.txt file is read; anything else is used as a Jinja template.
    """
    tokenizer.chat_template = _template_text(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn, end-of-turn marker included.

    Turn i spans from render(messages[:i], add_generation_prompt=True) to render(messages[:i+1]).
    """
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                "the chat template is not prefix-consistent: rendering the first turns of a conversation "
                f"does not give a prefix of the whole (at message {i}), so assistant tokens cannot be "
                "located. Use `chat_template: default` or a template that does not rewrite earlier turns."
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _turn_of_tokens(offsets, spans: list[tuple[int, int]]) -> list[int]:
    """For each token, the index of the assistant span it overlaps, or -1.

    Overlap rather than containment, as TRL's assistant masks do: a token that BPE merged across the boundary
    (the generation prompt's newline with a reply's leading newlines) still carries the reply's text.
    """
    turns, span = [], 0
    for start, end in offsets:
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        inside = span < len(spans) and end > start and end > spans[span][0]
        turns.append(span if inside else -1)
    return turns


def tokenize_conversation(messages: list[dict], tokenizer, *, assistant_only_loss: bool = True) -> dict:
    """{"input_ids", "labels"}: labels are the ids on assistant turns (end-of-turn included), -100 elsewhere.

    With `assistant_only_loss` off, every token is a label.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_conversation needs a fast tokenizer (character offsets of tokens)")
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not assistant_only_loss:
        return {"input_ids": ids, "labels": list(ids)}
    turns = _turn_of_tokens(enc["offset_mapping"], spans)
    return {"input_ids": ids, "labels": [i if t >= 0 else -100 for i, t in zip(ids, turns)]}


def check_template_ends_turns_with_eos(tokenizer) -> None:
    """Raise ValueError unless the EOS token is among each assistant turn's target tokens.

    A model tuned on targets without EOS never learns to stop. Run once before building datasets.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token; set `eos_token` to the token that ends an assistant turn"
        )
    probe = [
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": "pong"},
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": "pong"},
    ]
    text, spans = assistant_spans(probe, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    turns = _turn_of_tokens(enc["offset_mapping"], spans)
    for k, (s, e) in enumerate(spans):
        if not any(t == k and i == tokenizer.eos_token_id for i, t in zip(enc["input_ids"], turns)):
            raise ValueError(
                f"the chat template does not end an assistant turn with the EOS token {tokenizer.eos_token!r}"
                f" (a turn renders as {text[s:e]!r}). Set `eos_token` to the template's end-of-turn token"
                " (e.g. <|eot_id|>, <end_of_turn>, <|end|>), or use `chat_template: default`."
            )


# ------------------------------------------------------------------------------------------------------------
# Reports and splits


@dataclass
class DataReport:
    """What happened to the rows: total = kept + sum(filtered); kept = train + eval."""

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
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items())) or "none"
        return (
            f"{self.source}: {self.total} rows, kept {self.kept} (train {self.train}, eval {self.eval}); "
            f"dropped: {dropped}"
        )


def split_train_eval(records: list, eval_split_size: float, seed: int) -> tuple[list, list]:
    """Hold out a fraction (<1) or a count (>=1) of rows, chosen by a shuffle seeded with `seed`; 0: none.

    Both parts keep the input order. A fraction holds out at least one row and leaves one for training.
    """
    if eval_split_size < 0:
        raise ValueError(f"eval_split_size must be >= 0, got {eval_split_size}")
    if eval_split_size == 0 or len(records) < 2:
        return list(records), []
    if eval_split_size < 1:
        n_eval = min(max(round(len(records) * eval_split_size), 1), len(records) - 1)
    else:
        n_eval = int(eval_split_size)
        if n_eval >= len(records):
            raise DataError(f"eval_split_size {n_eval} leaves no training rows out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


# ------------------------------------------------------------------------------------------------------------
# Datasets


def _cap(records: list, limit: int | None, reason: str, report: DataReport) -> list:
    if limit is not None and len(records) > limit:
        report.filtered[reason] = len(records) - limit
        return records[:limit]
    return records


def _split_records(data_args, report: DataReport, seed: int) -> tuple[list[Record], list[Record]]:
    """Training and eval records: a separate eval source or a seeded split, then the max_*_samples caps."""
    if not data_args.dataset_name:
        raise DataError("no dataset: set dataset_name (a local file or directory, or a hub dataset)")
    train = read_records(data_args.dataset_name, data_args.dataset_train_split, data_args.dataset_config)
    if data_args.eval_dataset_name:
        evals = read_records(
            data_args.eval_dataset_name, data_args.dataset_test_split, data_args.dataset_config
        )
    else:
        train, evals = split_train_eval(train, data_args.eval_split_size, seed)
    report.total = len(train) + len(evals)
    train = _cap(train, data_args.max_train_samples, "max_train_samples", report)
    evals = _cap(evals, data_args.max_eval_samples, "max_eval_samples", report)
    return train, evals


def _convert(records: list[Record], example, report: DataReport) -> list[dict]:
    """example(record) -> a row, or the reason it is dropped; rows with an empty response count as `empty`."""
    rows = []
    for rec in records:
        try:
            out = example(rec)
        except EmptyResponseError:
            out = "empty"
        if isinstance(out, str):
            report.drop(out)
        else:
            rows.append(out)
    return rows


def _build(data_args, example, seed: int):
    import datasets

    source = data_args.dataset_name + (
        f" + {data_args.eval_dataset_name}" if data_args.eval_dataset_name else ""
    )
    report = DataReport(source=source)
    train_recs, eval_recs = _split_records(data_args, report, seed)
    train, evals = _convert(train_recs, example, report), _convert(eval_recs, example, report)
    report.train, report.eval = len(train), len(evals)
    report.kept = report.train + report.eval
    if not train:
        raise DataError(f"no training rows left ({report.summary()})", file=data_args.dataset_name)
    (logger.warning if report.filtered else logger.info)("data: %s", report.summary())
    return datasets.Dataset.from_list(train), (datasets.Dataset.from_list(evals) if evals else None), report


def _tokenize_text(record: Record, tokenizer) -> dict:
    text = _turn(record, "assistant", _field(record, "text"), "text")["content"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def build_sft_datasets(
    data_args, tokenizer, *, max_length: int | None, assistant_only_loss: bool = True, seed: int = 42
):
    """(train, eval or None, DataReport): datasets of `input_ids` and `labels` (assistant tokens, or all).

    Call `ensure_chat_template` first. Rows over `max_length` tokens are dropped as `too_long`, rows without a
    trainable token as `no_assistant_tokens`, rows with an empty response as `empty`; malformed rows raise.
    """
    fmt = data_args.dataset_format
    if fmt != "text":
        check_template_ends_turns_with_eos(tokenizer)

    def example(rec: Record):
        if _row_format(rec, fmt) == "text":
            row = _tokenize_text(rec, tokenizer)
        else:
            msgs = to_messages(rec, fmt, data_args.system_prompt)
            row = tokenize_conversation(msgs, tokenizer, assistant_only_loss=assistant_only_loss)
        if max_length and len(row["input_ids"]) > max_length:
            return "too_long"
        if all(label == -100 for label in row["labels"]):
            return "no_assistant_tokens"
        return row

    return _build(data_args, example, seed)


def build_preference_datasets(data_args, tokenizer, *, max_length: int | None, seed: int = 42):
    """(train, eval or None, DataReport): TRL's conversational `prompt`, `chosen`, `rejected` message lists.

    Call `ensure_chat_template` first. Pairs whose responses are equal are dropped as
    `chosen_equals_rejected`; pairs whose prompt plus longer response renders to more than `max_length` tokens
    as `too_long`; pairs with an empty response as `empty`. Malformed rows raise.
    """
    check_template_ends_turns_with_eos(tokenizer)

    def n_tokens(messages):
        return len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])

    def example(rec: Record):
        _row_format(rec, data_args.dataset_format, kind="preference")
        pair = to_preference(rec, data_args.system_prompt)
        if pair["chosen"] == pair["rejected"]:
            return "chosen_equals_rejected"
        if (
            max_length
            and max(n_tokens(pair["prompt"] + pair[side]) for side in ("chosen", "rejected")) > max_length
        ):
            return "too_long"
        return pair

    return _build(data_args, example, seed)
