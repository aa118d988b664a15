"""Prompts in, responses out: the prompt set from the shared data module, and batched sampling from the policy.

    train, evals, report = load_prompts(data_args, tokenizer, max_prompt_length=512, seed=42)
    batch = batch_for_step(train, step, batch_size=8, seed=42, num_processes=2, process_index=0)
    ro = generate(policy, tokenizer, [p.input_ids for p in batch], generation_config)

A `Rollout` holds the left-padded prompts (queries) and right-padded responses; `response_mask` is 1 on the
generated tokens up to and including the first stop token and 0 on the padding after it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from align import data


@dataclass
class Prompt:
    """One prompt: its messages (ending with a user turn) and their chat-template ids with the generation prompt."""

    messages: list[dict]
    input_ids: list[int]


# ------------------------------------------------------------------------------------------------- prompt set


def prompt_messages(record: data.Record, fmt: str = "auto", system_prompt: str | None = None) -> list[dict]:
    """The conversation up to the turn the policy answers, from any row the data module reads.

    Preference rows give their prompt (explicit, ShareGPT, or the shared prefix of HH dialogues); chat rows
    (messages, ShareGPT, Alpaca, prompt/completion, HH, GSM8K) give their turns before the last assistant turn;
    a row with only `prompt` (a string or messages) is that prompt.
    """
    row = record.data
    if fmt == "preference" or (fmt == "auto" and {"chosen", "rejected"} <= set(row)):
        return data.to_preference(record, system_prompt)["prompt"]
    if fmt == "auto" and "prompt" in row and "completion" not in row:
        value = row["prompt"]
        messages = value if isinstance(value, list) else [{"role": "user", "content": value}]
        if not isinstance(value, (list, str)) or not messages or messages[-1].get("role") != "user":
            raise record.error("expected a string or messages ending with a user turn", "prompt")
        if system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        return messages
    messages = data.to_messages(record, fmt, system_prompt)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-template ids of the prompt followed by the assistant generation prompt."""
    text = data.render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompts(records, data_args, tokenizer, max_prompt_length, report: data.DataReport) -> list[Prompt]:
    out = []
    for rec in records:
        try:
            messages = prompt_messages(rec, data_args.dataset_format, data_args.system_prompt)
        except data.EmptyResponseError:
            report.drop("empty")
            continue
        ids = encode_prompt(tokenizer, messages)
        if max_prompt_length and len(ids) > max_prompt_length:
            report.drop("too_long")
            continue
        out.append(Prompt(messages, ids))
    return out


def load_prompts(data_args, tokenizer, *, max_prompt_length: int | None, seed: int):
    """(train prompts, eval prompts, DataReport) from `dataset_name` (+ `eval_dataset_name` or a held-out split),
    capped by `max_train_samples` / `max_eval_samples`. Call `data.ensure_chat_template` first."""
    if not data_args.dataset_name:
        raise data.DataError("no dataset: set dataset_name to the prompt data (preference pairs or chats)")
    source = data_args.dataset_name + (f" + {data_args.eval_dataset_name}" if data_args.eval_dataset_name else "")
    report = data.DataReport(source=source)
    train = data.read_records(data_args.dataset_name, data_args.dataset_train_split, data_args.dataset_config)
    if data_args.eval_dataset_name:
        evals = data.read_records(data_args.eval_dataset_name, data_args.dataset_test_split, data_args.dataset_config)
    else:
        train, evals = data.split_train_eval(train, data_args.eval_split_size, seed)
    report.total = len(train) + len(evals)
    for name, limit in (("max_train_samples", data_args.max_train_samples), ("max_eval_samples",
                                                                            data_args.max_eval_samples)):
        part = train if name == "max_train_samples" else evals
        if limit is not None and len(part) > limit:
            report.filtered[name] = len(part) - limit
            del part[limit:]
    train = _prompts(train, data_args, tokenizer, max_prompt_length, report)
    evals = _prompts(evals, data_args, tokenizer, max_prompt_length, report)
    report.train, report.eval = len(train), len(evals)
    report.kept = report.train + report.eval
    if not train:
        raise data.DataError(f"no prompts left ({report.summary()})", file=data_args.dataset_name)
    return train, evals, report


def batch_for_step(prompts: list, step: int, batch_size: int, seed: int, num_processes: int = 1,
                   process_index: int = 0) -> list:
    """This process's prompts for PPO step `step`: a pure function of its arguments, so a resumed run continues
    with the same batches. The prompts are shuffled once per pass over them (seeded by `seed` and the pass);
    each step takes the next `batch_size * num_processes` and this process its `process_index`-th share."""
    global_batch = batch_size * num_processes
    out = []
    for k in range(step * global_batch + process_index * batch_size,
                   step * global_batch + (process_index + 1) * batch_size):
        epoch, i = divmod(k, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 100003 + epoch).shuffle(order)
        out.append(prompts[order[i]])
    return out


# ------------------------------------------------------------------------------------------------- generation


@dataclass
class Rollout:
    """Prompts (left-padded) and responses (right-padded, `response_mask` 0 after the stop token)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids(self.attention_mask)

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(self.query_ids[index], self.query_mask[index], self.response_ids[index],
                       self.response_mask[index])


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), padded on the left so that every prompt ends where generation starts."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (as `generate` computes them): 0 at each sequence's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask(response_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 on tokens up to and including the first stop token of each row, 0 after it."""
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    stops_before = is_stop.long().cumsum(1) - is_stop.long()  # stop tokens strictly before this position
    return (stops_before == 0).long()


def generation_config(args, tokenizer) -> GenerationConfig:
    """Sampling settings from the recipe (`temperature`, `top_k`, `top_p`, `max_new_tokens`), stopping on EOS.

    A fresh config, so a model's own generation defaults (repetition penalty, ...) do not change the sampling
    distribution that PPO's log-probs assume."""
    return GenerationConfig(
        do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], config: GenerationConfig) -> Rollout:
    """Sample one response per prompt from `model` (the policy adapter must be the active one)."""
    device = next(model.parameters()).device
    query_ids, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    response = out[:, query_ids.shape[1]:]
    mask = response_mask(response, [config.eos_token_id])
    return Rollout(query_ids, query_mask, response, mask)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without the stop token and padding."""
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
