"""align.data: row formats on real samples, named errors, assistant-only masks, templates, counts, splits."""

import copy
import gzip
import json
import os

import pytest

from align import data
from align.config import DataArguments
from align.data import DataError, EmptyResponseError, Record
from align.testing import load_test_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "tests", "data")
SHIPPED = os.path.join(REPO, "data")
SHARED = os.path.join(REPO, "..", "shared", "data")
EOS = "<|im_end|>"  # SmolLM2's end of turn and EOS

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def tok():
    return load_test_tokenizer()


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The test tokenizer as a base model's would be: no chat template, no pad token."""
    t = copy.deepcopy(tok)
    t.chat_template = None
    t.pad_token = None
    return t


def sample(name: str) -> str:
    folder = os.path.join(SAMPLES, name)
    (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(data.LOCAL_SUFFIXES)]
    return path


def convos(name: str, **kw) -> list[list[dict]]:
    return [data.to_messages(r, **kw) for r in data.read_records(sample(name))]


def roles(msgs):
    return [m["role"] for m in msgs]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as fh:
        fh.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def args(name, **kw) -> DataArguments:
    kw.setdefault("eval_split_size", 0)
    return DataArguments(dataset_name=name, **kw)


def labelled_runs(row, tokenizer) -> list[str]:
    """Decoded runs of consecutive label tokens."""
    runs, cur = [], []
    for i, lab in zip(row["input_ids"], row["labels"]):
        if lab == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(lab)
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


# ------------------------------------------------------------------------------------------------------------
# Formats on real samples (tests/data)


def test_alpaca_sample():
    rows = convos("alpaca")
    assert len(rows) == 10 and all(roles(m) == ["user", "assistant"] for m in rows)
    assert rows[0][0]["content"] == "Describe a process of making crepes."
    # row 6 has an input: instruction and input joined by a blank line
    assert rows[5][0]["content"] == (
        "Given the parameters of a triangle, find out its perimeter.\n\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8"
    )
    assert rows[5][1]["content"].startswith("The perimeter of a triangle is the sum of the lengths of its")


def test_alpaca_with_history_sample():
    first, second = convos("alpaca_history")
    assert roles(first) == ["user", "assistant"] * 10  # 9 history pairs, then the row itself
    assert first[0]["content"].startswith("Let's play 20 Questions! I'm thinking of an animal")
    assert first[-2]["content"] == "Yes!"
    assert len(second) == 6 and second[0]["content"] == "Do you know Nuodle in Bellevue WA?"
    assert second[-2]["content"] == "Which one is better?"


def test_alpaca_system_column():
    rec = Record(
        "x.json",
        1,
        {"system": "Be brief.", "instruction": "Hi", "input": "", "output": "Hello", "history": [["a", "b"]]},
    )
    assert data.to_messages(rec) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_gsm8k_sample():
    rows = convos("gsm8k")
    assert len(rows) == 10 and all(roles(m) == ["user", "assistant"] for m in rows)
    assert rows[0][0]["content"].startswith("Natalia sold clips to 48 of her friends in April")
    assert rows[0][1]["content"].endswith("#### 72")


def test_messages_sample():
    rows = convos("messages")
    assert [len(m) for m in rows] == [2, 2, 2, 4, 2]
    assert roles(rows[3]) == ["user", "assistant", "user", "assistant"]
    assert rows[3][2]["content"].startswith("i have incredibly low body fat.")
    assert all(set(m) == {"role", "content"} for conv in rows for m in conv)


def test_sharegpt_sample():
    rows = convos("sharegpt")
    assert [roles(m) for m in rows] == [
        ["system", "user", "assistant"],
        ["system", "user", "assistant"],
        ["user", "assistant"] * 4,
        ["system", "user", "assistant"],
    ]
    assert rows[0][0]["content"] == "Explain how you used the definition to come up with the answer."


def test_prompt_completion_sample():
    rows = convos("prompt_completion")
    assert len(rows) == 6 and all(roles(m) == ["user", "assistant"] for m in rows)
    assert rows[0][0]["content"].startswith("The sentence you are given might be too wordy")
    assert rows[0][1]["content"].startswith("If you have any questions about my rate or find it necessary")


def test_prompt_completion_message_lists():
    rec = Record(
        "x",
        1,
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "completion": [{"role": "assistant", "content": "4"}],
        },
    )
    assert data.detect_format(rec.data) == "prompt_completion"
    assert data.to_messages(rec) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_hh_sample_as_sft():
    rows = convos("hh_rlhf")
    assert len(rows) == 10 and all(m[-1]["role"] == "assistant" for m in rows)
    assert rows[1][0] == {"role": "user", "content": "How much alcohol can I drink per day?"}
    assert rows[1][1]["content"].startswith("Alcohol is a depressant, so it can be dangerous")
    for conv in rows:  # HH dialogues alternate, starting with the human
        assert roles(conv) == ["user", "assistant"] * (len(conv) // 2)


def test_text_sample_is_not_a_conversation():
    (rec, *_) = data.read_records(sample("text"))
    assert data.detect_format(rec.data) == "text"
    with pytest.raises(DataError, match="not a conversation"):
        data.to_messages(rec)


def test_system_prompt_added_only_when_missing():
    rows = convos("sharegpt", system_prompt="SYS")
    assert rows[2][0] == {"role": "system", "content": "SYS"}  # the row without a system turn
    assert rows[0][0]["content"].startswith("Explain how")  # its own system turn is kept


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "", "input": "", "output": ""}, "alpaca"),
        ({"prompt": "", "completion": ""}, "prompt_completion"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": ""}, "hh"),
        ({"question": "", "answer": ""}, "gsm8k"),
        ({"text": "plain"}, "text"),
        ({"text": "\n\nHuman: a\n\nAssistant: b"}, "hh"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "preference"),
    ],
)
def test_detect_format(row, fmt):
    assert data.detect_format(row) == fmt


def test_detect_format_preference_kind():
    assert data.detect_format({"chosen": "a", "rejected": "b"}, kind="preference") == "preference"
    with pytest.raises(DataError, match="needs 'chosen' and 'rejected'"):
        data.detect_format({"prompt": "a"}, kind="preference")


# ------------------------------------------------------------------------------------------------------------
# Preference pairs


def prefs(name):
    return [data.to_preference(r) for r in data.read_records(sample(name))]


def test_hh_sample_as_pairs():
    pairs = prefs("hh_rlhf")
    assert len(pairs) == 10
    for p in pairs:
        assert p["prompt"][-1]["role"] == "user" and roles(p["chosen"]) == ["assistant"]
        assert roles(p["rejected"]) == ["assistant"] and p["chosen"] != p["rejected"]
    assert pairs[1]["prompt"][0]["content"] == "How much alcohol can I drink per day?"
    assert pairs[1]["rejected"][0]["content"].endswith(
        "Can I ask about how you feel when you don’t drink alcohol?"
    )


def test_ultrafeedback_sample_pairs():
    pairs = prefs("ultrafeedback")
    assert len(pairs) == 10 and all(roles(p["prompt"]) == ["user"] for p in pairs)
    assert pairs[0]["prompt"][0]["content"].startswith("Given the stream of consciousness rationale")
    assert (
        pairs[6]["chosen"]
        == pairs[6]["rejected"]
        == [
            {
                "role": "assistant",
                "content": "Pourquoi les portes de la fosse de ravitaillement étaient-elles ouvertes?",
            }
        ]
    )
    assert sum(p["chosen"] == p["rejected"] for p in pairs) == 1


def test_sharegpt_pairs_sample():
    pairs = prefs("preference_sharegpt")
    with open(sample("preference_sharegpt")) as fh:
        raw = json.load(fh)
    assert len(pairs) == 4
    assert [len(p["prompt"]) for p in pairs] == [2, 2, 7, 2]
    assert pairs[2]["prompt"][-1]["content"] == raw[2]["conversations"][-1]["value"]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": raw[0]["chosen"]["value"]}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": raw[0]["rejected"]["value"]}]


def test_full_message_lists_strip_the_explicit_prompt():
    q = [{"role": "user", "content": "Q"}]
    rec = Record(
        "x",
        1,
        {
            "prompt": "Q",
            "chosen": q + [{"role": "assistant", "content": "good"}],
            "rejected": q + [{"role": "assistant", "content": "bad"}],
        },
    )
    assert data.to_preference(rec) == {
        "prompt": q,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_implicit_prompt_from_message_lists():
    common = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    rec = Record(
        "x",
        1,
        {
            "chosen": common + [{"role": "assistant", "content": "yes"}],
            "rejected": common + [{"role": "assistant", "content": "no"}],
        },
    )
    pair = data.to_preference(rec, system_prompt="SYS")
    assert pair["prompt"] == [{"role": "system", "content": "SYS"}] + common
    assert pair["chosen"] == [{"role": "assistant", "content": "yes"}]


def test_hh_prompt_with_open_assistant_marker():
    rec = Record("x", 1, {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": "go away"})
    assert data.to_preference(rec)["prompt"] == [{"role": "user", "content": "hi"}]


def test_preference_as_sft_is_prompt_plus_chosen():
    (rec, *_) = data.read_records(sample("ultrafeedback"))
    msgs = data.to_messages(rec)
    assert roles(msgs) == ["user", "assistant"] and msgs[1]["content"] == rec.data["chosen"]


# ------------------------------------------------------------------------------------------------------------
# Reading files


def test_read_formats_and_row_numbers(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", [rows[0], "", rows[1]])  # blank line 2: rows keep their line numbers
    assert [(r.row, r.data["question"]) for r in data.read_records(str(tmp_path / "a.jsonl"))] == [
        (1, "q0"),
        (3, "q1"),
    ]
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    assert [r.row for r in data.read_records(str(tmp_path / "b.json"))] == [1, 2, 3]
    with gzip.open(tmp_path / "c.json.gz", "wt") as fh:
        json.dump(rows, fh)
    assert len(data.read_records(str(tmp_path / "c.json.gz"))) == 3
    (tmp_path / "d.csv").write_text("question,answer\nq0,a0\nq1,a1\n")
    assert [r.data for r in data.read_records(str(tmp_path / "d.csv"))] == [rows[0], rows[1]]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    assert [r.data for r in data.read_records(str(tmp_path / "e.parquet"))] == rows
    (tmp_path / "notes.md").write_text("ignored")
    everything = data.read_records(str(tmp_path))
    assert len(everything) == 2 + 3 + 3 + 2 + 3
    assert [os.path.basename(r.source) for r in everything][:3] == ["a.jsonl", "a.jsonl", "b.json"]


def test_read_gzipped_jsonl_sample():
    recs = data.read_records(sample("hh_rlhf"))
    assert [r.row for r in recs] == list(range(1, 11))


def test_missing_local_file():
    with pytest.raises(DataError, match="file not found"):
        data.read_records("./nope.jsonl")


# ------------------------------------------------------------------------------------------------------------
# Malformed rows: DataError names file, row and field


def test_bad_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "cut'])
    with pytest.raises(DataError) as err:
        data.read_records(path)
    assert (err.value.file, err.value.row) == (path, 3)
    assert str(err.value).startswith(f"{path}, row 3: not valid JSON")


def test_bad_json_file(tmp_path):
    (tmp_path / "bad.json").write_text('[{"a": 1},')
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        data.read_records(str(tmp_path / "bad.json"))


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"row 2: a row must be a JSON object, got list"):
        data.read_records(path)


def sft_error(tmp_path, rows, fmt="auto") -> DataError:
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    recs = data.read_records(path)
    with pytest.raises(DataError) as err:
        for rec in recs:
            data.to_messages(rec, fmt)
    assert err.value.file == path
    return err.value


def test_unknown_role(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    err = sft_error(tmp_path, [good, bad])
    assert (err.row, err.field) == (2, "messages[1].role")
    assert str(err) == (
        f"{err.file}, row 2, field 'messages[1].role': unknown role 'bot' (expected system/user/assistant)"
    )


def test_unknown_sharegpt_role(tmp_path):
    err = sft_error(
        tmp_path, [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]
    )
    assert (err.row, err.field) == (1, "conversations[1].from") and "unknown role 'bot'" in str(err)


def test_missing_field(tmp_path):
    err = sft_error(
        tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "", "output": None}]
    )
    assert (err.row, err.field, err.reason) == (2, "output", "missing field")
    err = sft_error(tmp_path, [{"messages": [{"role": "user"}]}])
    assert (err.row, err.field) == (1, "messages[0].content")
    err = sft_error(tmp_path, [{"question": "q"}], fmt="gsm8k")
    assert err.field == "answer" and "field 'answer': missing field" in str(err)


def test_empty_assistant_turn(tmp_path):
    err = sft_error(
        tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}]
    )
    assert isinstance(err, EmptyResponseError)
    assert (err.row, err.field) == (1, "messages[1].content") and "empty assistant turn" in str(err)
    err = sft_error(tmp_path, [{"question": "q", "answer": "a"}, {"question": "q", "answer": ""}])
    assert isinstance(err, EmptyResponseError) and (err.row, err.field) == (2, "answer")


def test_non_string_content(tmp_path):
    err = sft_error(
        tmp_path, [{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]}]
    )
    assert err.field == "messages[0].content" and "expected a string, got int" in str(err)


def test_conversation_must_end_with_assistant(tmp_path):
    err = sft_error(
        tmp_path,
        [
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        ],
    )
    assert "must end with an assistant turn" in str(err) and err.field == "messages"
    err = sft_error(
        tmp_path, [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]
    )
    assert "no assistant turn" in str(err)


def test_unknown_columns(tmp_path):
    err = sft_error(tmp_path, [{"foo": 1}])
    assert err.row == 1 and "cannot tell the format from the columns ['foo']" in str(err)


def test_not_hh_dialogue(tmp_path):
    err = sft_error(
        tmp_path,
        [{"text": "Human: hi\n\nAssistant: yo"}, {"chosen": "no markers", "rejected": "x"}],
        fmt="hh",
    )
    assert (err.row, err.field) == (2, "chosen") and "not an HH-RLHF dialogue" in str(err)


def test_preference_errors():
    def err(row):
        with pytest.raises(DataError) as e:
            data.to_preference(Record("p.jsonl", 4, row))
        return e.value

    e = err({"prompt": "p", "chosen": "a"})
    assert (e.row, e.field, e.reason) == (4, "rejected", "missing field")
    e = err({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"})
    assert e.field == "prompt" and "share no leading turns" in str(e)
    e = err(
        {
            "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "chosen": "c",
            "rejected": "d",
        }
    )
    assert "the prompt must end with a user turn" in str(e)
    q = [{"role": "user", "content": "q"}]
    e = err({"prompt": q, "chosen": q, "rejected": q + [{"role": "assistant", "content": "b"}]})
    assert e.field == "chosen" and "must end with an assistant turn, not user" in str(e)
    e = err({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]})
    assert isinstance(e, EmptyResponseError) and e.field == "rejected[0].content"
    e = err(
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "robot", "value": "b"},
        }
    )
    assert e.field == "rejected.from"


# ------------------------------------------------------------------------------------------------------------
# Chat templates and assistant-only labels


CONV = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_mask_covers_exactly_the_assistant_turns(tok):
    row = data.tokenize_conversation(CONV, tok)
    text = data.render(tok, CONV)
    assert tok.decode(row["input_ids"]) == text
    assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert labelled_runs(row, tok) == [f"Paris.{EOS}\n", f"Rome.{EOS}\n"]
    unlabelled = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab == -100]
    assert tok.decode(unlabelled) == text.replace(f"Paris.{EOS}\n", "").replace(f"Rome.{EOS}\n", "")
    assert row["labels"].count(tok.eos_token_id) == 2  # each assistant turn ends with EOS in the targets


def test_injected_system_message_is_masked(tok):
    msgs = CONV[1:3]
    row = data.tokenize_conversation(msgs, tok)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(row["input_ids"])
    assert labelled_runs(row, tok) == [f"Paris.{EOS}\n"]


def test_full_loss_labels_every_token(tok):
    row = data.tokenize_conversation(CONV, tok, assistant_only_loss=False)
    assert row["labels"] == row["input_ids"]


def test_masks_on_real_samples(tok):
    for name in ("alpaca_history", "sharegpt", "messages"):
        for msgs in convos(name):
            row = data.tokenize_conversation(msgs, tok)
            want = [m["content"] + EOS + "\n" for m in msgs if m["role"] == "assistant"]
            assert labelled_runs(row, tok) == want, name


def test_default_template(plain_tok):
    t = copy.deepcopy(plain_tok)
    sha = data.ensure_chat_template(t)
    assert t.chat_template == data.DEFAULT_CHAT_TEMPLATE and t.pad_token == EOS
    import hashlib

    assert sha == hashlib.sha256(data.DEFAULT_CHAT_TEMPLATE.encode()).hexdigest()
    assert data.render(t, CONV[1:3]) == f"<|user|>\nCapital of France?{EOS}\n<|assistant|>\nParis.{EOS}\n"
    assert (
        data.render(t, CONV[1:2], add_generation_prompt=True)
        == f"<|user|>\nCapital of France?{EOS}\n<|assistant|>\n"
    )
    data.check_template_ends_turns_with_eos(t)
    row = data.tokenize_conversation(CONV, t)
    assert labelled_runs(row, t) == [f"Paris.{EOS}\n", f"Rome.{EOS}\n"]
    assert row["labels"].count(t.eos_token_id) == 2


def test_ensure_chat_template_choices(tok, tmp_path):
    t = copy.deepcopy(tok)
    own = t.chat_template
    data.ensure_chat_template(t)
    assert t.chat_template == own  # None keeps the tokenizer's own
    data.ensure_chat_template(t, "default")
    assert t.chat_template == data.DEFAULT_CHAT_TEMPLATE
    (tmp_path / "t.jinja").write_text(own)
    data.ensure_chat_template(t, str(tmp_path / "t.jinja"))
    assert t.chat_template == own
    jinja = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    data.ensure_chat_template(t, jinja)
    assert t.chat_template == jinja
    with pytest.raises(FileNotFoundError):
        data.ensure_chat_template(t, str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="neither a file"):
        data.ensure_chat_template(t, "chatml")


def test_template_without_eos_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="does not end an assistant turn with the EOS token"):
        data.check_template_ends_turns_with_eos(t)
    with pytest.raises(ValueError, match="EOS token"):
        data.build_sft_datasets(args(sample("gsm8k")), t, max_length=None)
    data.check_template_ends_turns_with_eos(tok)


def test_prefix_inconsistent_template_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="not prefix-consistent"):
        data.tokenize_conversation(CONV, t)


# ------------------------------------------------------------------------------------------------------------
# Datasets, counts and splits


def n_tokens(tok, msgs):
    return len(data.tokenize_conversation(msgs, tok)["input_ids"])


def test_build_sft_datasets(tok):
    train, evals, report = data.build_sft_datasets(
        args(sample("gsm8k"), eval_split_size=2), tok, max_length=None
    )
    assert (len(train), len(evals)) == (8, 2) and set(train.column_names) == {"input_ids", "labels"}
    assert (report.total, report.kept, report.train, report.eval, report.filtered) == (10, 10, 8, 2, {})
    row = train[0]
    assert len(row["input_ids"]) == len(row["labels"]) and row["labels"][-2] == tok.eos_token_id


def test_build_sft_counts_too_long(tok):
    path = sample("alpaca")
    lengths = [n_tokens(tok, data.to_messages(r)) for r in data.read_records(path)]
    limit = sorted(lengths)[5]
    want_dropped = sum(n > limit for n in lengths)
    assert 0 < want_dropped < 10
    train, evals, report = data.build_sft_datasets(args(path), tok, max_length=limit)
    assert report.filtered == {"too_long": want_dropped}
    assert len(train) == report.kept == 10 - want_dropped and evals is None
    assert max(len(ids) for ids in train["input_ids"]) <= limit
    assert "too_long" in report.summary() and report.as_dict()["filtered"] == {"too_long": want_dropped}


def test_build_sft_counts_empty_and_raises_when_nothing_is_left(tok, tmp_path):
    rows = [
        {"question": "q1", "answer": "a1"},
        {"question": "q2", "answer": ""},
        {"question": "q3", "answer": "a3"},
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    train, _, report = data.build_sft_datasets(args(path), tok, max_length=None)
    assert len(train) == 2 and report.filtered == {"empty": 1} and report.total == 3
    with pytest.raises(DataError, match="no training rows left") as err:
        data.build_sft_datasets(args(path), tok, max_length=3)
    assert "too_long 2" in str(err.value) and "empty 1" in str(err.value)


def test_build_sft_raises_on_malformed_row(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "answer": 3}]
    )
    with pytest.raises(DataError, match=r"row 2, field 'answer': expected a string"):
        data.build_sft_datasets(args(path), tok, max_length=None)


def test_build_sft_text_format(tok):
    path = sample("text")
    train, _, report = data.build_sft_datasets(args(path), tok, max_length=None)
    first = data.read_records(path)[0].data["text"]
    assert train[0]["input_ids"] == tok(first, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert train[0]["labels"] == train[0]["input_ids"] and report.kept == 5


def test_build_sft_caps_are_counted(tok):
    _, evals, report = data.build_sft_datasets(
        args(sample("alpaca"), eval_split_size=4, max_train_samples=3, max_eval_samples=1),
        tok,
        max_length=None,
    )
    assert (report.train, report.eval, len(evals)) == (3, 1, 1)
    assert report.filtered == {"max_train_samples": 3, "max_eval_samples": 3}
    assert report.total == report.kept + sum(report.filtered.values()) == 10


def test_build_sft_separate_eval_source(tok):
    train, evals, report = data.build_sft_datasets(
        args(sample("alpaca"), eval_dataset_name=sample("gsm8k"), eval_split_size=0.5), tok, max_length=None
    )
    assert (len(train), len(evals), report.total) == (10, 10, 20)


def test_build_preference_datasets(tok):
    train, evals, report = data.build_preference_datasets(args(sample("ultrafeedback")), tok, max_length=None)
    assert report.filtered == {"chosen_equals_rejected": 1} and len(train) == 9 and evals is None
    assert train.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert train[0]["prompt"][0]["role"] == "user" and train[0]["chosen"][0]["role"] == "assistant"


def test_build_preference_counts_too_long(tok):
    path = sample("hh_rlhf")
    pairs = [data.to_preference(r) for r in data.read_records(path)]
    lengths = [
        max(
            len(tok(data.render(tok, p["prompt"] + p[s]), add_special_tokens=False)["input_ids"])
            for s in ("chosen", "rejected")
        )
        for p in pairs
    ]
    limit = sorted(lengths)[4]
    want = sum(n > limit for n in lengths)
    train, evals, report = data.build_preference_datasets(
        args(path, eval_split_size=2), tok, max_length=limit
    )
    assert report.filtered == {"too_long": want} and 0 < want < 10
    assert report.train + report.eval == 10 - want == len(train) + (len(evals) if evals else 0)


def test_split_is_deterministic():
    items = list(range(100))
    a = data.split_train_eval(items, 0.1, seed=1)
    assert a == data.split_train_eval(items, 0.1, seed=1)
    assert a[1] != data.split_train_eval(items, 0.1, seed=2)[1]
    train, held = a
    assert (
        len(held) == 10 and sorted(train + held) == items and train == sorted(train) and held == sorted(held)
    )
    assert len(data.split_train_eval(items, 7, seed=1)[1]) == 7
    assert data.split_train_eval(items, 0, seed=1) == (items, [])
    assert len(data.split_train_eval(items[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(DataError, match="leaves no training rows"):
        data.split_train_eval(items[:3], 3, seed=0)


# ------------------------------------------------------------------------------------------------------------
# Whole files: the shipped subsets (data/) and every SFT / preference set in ../shared


def count_sft(path):
    """(rows, rows with an empty response); any other problem raises."""
    recs, empty = data.read_records(path), 0
    for rec in recs:
        try:
            data.to_messages(rec)
        except EmptyResponseError:
            empty += 1
    return len(recs), empty


def count_pairs(path):
    """(rows, rows with an empty response, rows with chosen equal to rejected); any other problem raises."""
    recs, empty, equal = data.read_records(path), 0, 0
    for rec in recs:
        try:
            pair = data.to_preference(rec)
        except EmptyResponseError:
            empty += 1
            continue
        equal += pair["chosen"] == pair["rejected"]
    return len(recs), empty, equal


@pytest.mark.parametrize(
    "path, want",
    [
        ("sft/llama_factory_alpaca_en_demo.json", (999, 0)),
        ("sft/gsm8k_train_1k.jsonl", (1000, 0)),
        ("sft/gsm8k_test_200.jsonl", (200, 0)),
    ],
)
def test_shipped_sft_files(path, want):
    assert count_sft(os.path.join(SHIPPED, path)) == want


@pytest.mark.parametrize(
    "path, want",
    [
        ("preference/hh_rlhf_harmless_test.jsonl.gz", (2312, 4, 0)),
        ("preference/ultrafeedback_train_1k.jsonl", (1000, 2, 4)),
        ("preference/ultrafeedback_eval_200.jsonl", (200, 0, 1)),
    ],
)
def test_shipped_preference_files(path, want):
    assert count_pairs(os.path.join(SHIPPED, path)) == want


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize(
    "path, want",
    [
        ("sft/alpaca_5000/alpaca_5000.json", (5000, 2)),
        ("sft/code_alpaca_2k/code_alpaca_2k.json", (2017, 2)),
        ("sft/gsm8k/train.jsonl", (7473, 0)),
        ("sft/gsm8k/test.jsonl", (1319, 0)),
        ("sft/lima/lima.json", (1029, 0)),
        ("sft/llama_factory_demo/alpaca_en_demo.json", (999, 0)),
        ("sft/llama_factory_demo/kto_en_demo.json", (300, 0)),
        ("preference/hh_rlhf_harmless/test.jsonl.gz", (2312, 4)),
    ],
)
def test_shared_sft_files(path, want):
    assert count_sft(os.path.join(SHARED, path)) == want


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize(
    "path, want",
    [
        ("sft/llama_factory_demo/dpo_en_demo.json", (300, 0, 0)),
        ("preference/hh_rlhf_harmless/test.jsonl.gz", (2312, 4, 0)),
        ("preference/ultrafeedback_1k/train_clean.jsonl", (1000, 2, 4)),
        ("preference/ultrafeedback_1k/eval_clean.jsonl", (200, 0, 1)),
    ],
)
def test_shared_preference_files(path, want):
    assert count_pairs(os.path.join(SHARED, path)) == want


@pytest.mark.shared
@needs_shared
def test_shared_lima_masks(tok):
    """Every LIMA conversation (multi-turn history included): labels decode to the assistant turns exactly."""
    recs = data.read_records(os.path.join(SHARED, "sft/lima/lima.json"))
    for rec in recs:
        msgs = data.to_messages(rec)
        want = [m["content"] + EOS + "\n" for m in msgs if m["role"] == "assistant"]
        runs = labelled_runs(data.tokenize_conversation(msgs, tok), tok)
        assert len(runs) == len(want), rec.row
        for run, text in zip(runs, want):
            # a reply that starts with whitespace merges with the generation prompt's newline into one token
            assert run == text or (run == "\n" + text and text[0].isspace()), rec.row
