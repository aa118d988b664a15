"""Shared fixtures: SmolLM2's tokenizer, tiny random models per architecture, small synthetic chat data."""

import json
import os
import random
import signal
import subprocess

import pytest

from align.testing import load_test_tokenizer, make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer):
    """tiny_model_factory("llama") -> path of a saved tiny random Llama (built once per session)."""
    made = {}

    def make(arch="llama"):
        if arch not in made:
            made[arch] = make_tiny_model(arch, str(tmp_path_factory.mktemp(f"tiny-{arch}")), tokenizer)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")


WORDS = "red green blue apple river stone cloud paper seven orange quiet lamp tiger music window".split()


def synthetic_chat_rows(n=64, seed=0):
    """Learnable chat rows: the assistant repeats the user's words in reverse order."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        rows.append({"messages": [
            {"role": "user", "content": "Reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", synthetic_chat_rows())


def have_shared() -> bool:
    return os.path.isdir(os.path.join(SHARED, "data"))


def synthetic_preference_rows(n=48, seed=0):
    """Preference rows with a learnable rule: the chosen answer opens with "Sure:", the rejected one with "No:"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        rows.append({"prompt": "Reverse: " + " ".join(words), "chosen": "Sure: " + " ".join(reversed(words)),
                     "rejected": "No: " + " ".join(words)})
    return rows


@pytest.fixture(scope="session")
def preference_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", synthetic_preference_rows())


def run_launcher(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` for torchrun / accelerate launches: the launcher runs
    in its own session, and a timeout kills the whole session (its worker processes too, which `subprocess.run`
    would leave running) before `TimeoutExpired` is raised with the output so far."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
