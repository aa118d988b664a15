"""Task hooks beyond choice scoring: GSM8K-style exact match (greedy chat generation) and perplexity of text.

    gsm8k_answer("... so she has 18 left.\\n#### 18")   -> "18"
    last_number("The answer is 1,234.5 apples.")       -> "1234.5"
    score_gsm8k(model, tokenizer, task, docs)          -> {"exact_match", "n", "samples"}
    score_perplexity(scorer, docs)                     -> {"perplexity", "bits_per_byte", "tokens", "n"}
"""

from __future__ import annotations

import math
import re

import torch

from align.data import ensure_chat_template
from align.eval.scorer import LogLikelihoodScorer, model_device
from align.eval.suites import Doc, TaskSpec

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$7' -> '7', '-3.0' -> '-3'; None when `text` is no number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_answer(answer: str) -> str | None:
    """The reference number of a GSM8K answer: what follows the last '####', normalized."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def last_number(text: str) -> str | None:
    """The last number in a generated answer (after '####' when the model wrote one), normalized."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(tail)
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Responses to chat prompts (message lists): the chat template with a generation prompt, left padding,
    stopping at the tokenizer's EOS; greedy unless `do_sample`. Returns the decoded new text of each."""
    ensure_chat_template(tokenizer)
    device = model_device(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i: i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
                      "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:  # greedy: no sampling settings from the model's generation config
                kwargs.update(temperature=None, top_p=None, top_k=None)
            ids = model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def score_gsm8k(model, tokenizer, task: TaskSpec, docs: list[Doc], batch_size: int = 8) -> dict:
    """Exact match of the last number of a greedy chat answer against the reference after '####'."""
    prompts = [[{"role": "user", "content": d.contexts[0]}] for d in docs]
    responses = generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=batch_size)
    samples = []
    for doc, response in zip(docs, responses):
        gold, pred = gsm8k_answer(doc.continuations[0]), last_number(response)
        samples.append({"gold": gold, "pred": pred, "exact_match": float(gold is not None and pred == gold),
                        "response": response})
    n = len(samples)
    return {"exact_match": sum(s["exact_match"] for s in samples) / n if n else 0.0, "n": n, "samples": samples}


def score_perplexity(scorer: LogLikelihoodScorer, docs: list[Doc]) -> dict:
    """Token perplexity exp(total NLL / tokens) and bits per byte of whole texts, every token predicted (the first
    after the BOS, or EOS, token); texts longer than the model's window are scored in disjoint windows."""
    pairs, n_bytes = [], 0
    window = scorer.max_length
    for doc in docs:
        text = doc.contexts[0]
        n_bytes += len(text.encode("utf-8"))
        ids = scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), window):
            pairs.append(([], ids[start: start + window]))
    lls = scorer.loglikelihood_tokens([p for p in pairs if p[1]])
    nll = -sum(x.logprob for x in lls)
    tokens = sum(x.n_tokens for x in lls)
    return {
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": tokens,
        "n": len(docs),
    }
