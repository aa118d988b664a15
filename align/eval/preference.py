"""Preference evaluation on held-out pairs.

    pairs, skipped = load_pairs("data/preference/hh_rlhf_harmless_test.jsonl.gz", limit=200)
    implicit_reward_accuracy(model, tokenizer, pairs, beta=0.1)  # DPO adapter vs its reference
    reward_model_accuracy(RewardScorer.from_pretrained("outputs/rm"), pairs)
    win_rate(judge, prompts, tuned_responses, base_responses)

DPO's implicit reward of a response y to prompt x is beta * (log pi(y|x) - log pi_ref(y|x)), summed over the
response tokens. The reference is what the adapter was trained against: its parent SFT adapter (loaded as adapter
"ref" on the same base, see models.load_causal_lm), else the base (or the merged SFT model) with the adapter
switched off. Responses are tokenized as TRL's DPOTrainer does: the chat template over prompt + response, the
response starting where that and the prompt rendered with a generation prompt diverge.
"""

from __future__ import annotations

import contextlib

from align.data import EmptyResponseError, read_records, to_preference
from align.eval.scorer import LogLikelihoodScorer


def load_pairs(path: str, limit: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """The first `limit` usable pairs ({"prompt", "chosen", "rejected"} message lists) and what was skipped."""
    pairs, skipped = [], {"empty": 0, "chosen_equals_rejected": 0}
    for rec in read_records(path):
        if limit is not None and len(pairs) >= limit:
            break
        try:
            pair = to_preference(rec)
        except EmptyResponseError:
            skipped["empty"] += 1
            continue
        if pair["chosen"] == pair["rejected"]:
            skipped["chosen_equals_rejected"] += 1
            continue
        pairs.append(pair)
    return pairs, skipped


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def pair_token_ids(tokenizer, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids, split as TRL's DPOTrainer splits them."""
    prompt = _ids(tokenizer, pair["prompt"], add_generation_prompt=True)
    chosen = _ids(tokenizer, pair["prompt"] + pair["chosen"])
    rejected = _ids(tokenizer, pair["prompt"] + pair["rejected"])
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return prompt[:n], chosen[n:], rejected[n:]


def response_logps(scorer: LogLikelihoodScorer, tokenized: list[tuple]) -> tuple[list[float], list[float]]:
    """Summed log-probabilities of the chosen and of the rejected responses under the scorer's model as it is."""
    lls = scorer.loglikelihood_tokens([(p, c) for p, c, _ in tokenized] + [(p, r) for p, _, r in tokenized])
    n = len(tokenized)
    return [x.logprob for x in lls[:n]], [x.logprob for x in lls[n:]]


@contextlib.contextmanager
def reference_mode(model):
    """The model as the DPO reference: adapter "ref" active when loaded, else every adapter off."""
    adapters = getattr(model, "peft_config", {})
    if "ref" in adapters:
        active = model.active_adapter
        model.set_adapter("ref")
        try:
            yield "sft_adapter"
        finally:
            model.set_adapter(active)
    elif adapters:
        with model.disable_adapter():
            yield "adapter_off"
    else:
        raise ValueError("implicit rewards need a PEFT model: the policy adapter on its base")


def implicit_reward_accuracy(model, tokenizer, pairs: list[dict], beta: float, batch_size: int = 8,
                             pack: bool | str = "auto") -> dict:
    """Share of pairs whose chosen response gets the higher DPO implicit reward, with mean rewards and margin."""
    scorer = LogLikelihoodScorer(model, tokenizer, batch_size=batch_size, pack=pack)
    tokenized = [pair_token_ids(tokenizer, p) for p in pairs]
    pol_c, pol_r = response_logps(scorer, tokenized)
    with reference_mode(model) as reference:
        ref_c, ref_r = response_logps(scorer, tokenized)
    chosen = [beta * (a - b) for a, b in zip(pol_c, ref_c)]
    rejected = [beta * (a - b) for a, b in zip(pol_r, ref_r)]
    n = len(pairs)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "implicit_reward_accuracy": sum(m > 0 for m in margins) / n if n else float("nan"),
        "reward_margin": sum(margins) / n if n else float("nan"),
        "reward_chosen": sum(chosen) / n if n else float("nan"),
        "reward_rejected": sum(rejected) / n if n else float("nan"),
        "beta": beta,
        "reference": reference,
        "n": n,
    }


def reward_model_accuracy(scorer, pairs: list[dict]) -> dict:
    """A reward model's pairwise accuracy: share of pairs scored chosen > rejected (RewardScorer)."""
    return {"pairwise_accuracy": scorer.pairwise_accuracy(pairs), "n": len(pairs)}


def win_rate(judge, prompts: list[list[dict]], responses: list[str], baseline: list[str]) -> dict:
    """Share of prompts where the judge reward model scores `responses` above `baseline` (ties count half)."""
    if not (len(prompts) == len(responses) == len(baseline)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(baseline)} baseline responses")
    tuned = judge.score(prompts, responses).tolist()
    base = judge.score(prompts, baseline).tolist()
    outcomes = [1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned, base)]
    n = len(outcomes)
    return {
        "win_rate": sum(outcomes) / n if n else float("nan"),
        "reward": sum(tuned) / n if n else float("nan"),
        "baseline_reward": sum(base) / n if n else float("nan"),
        "n": n,
    }
