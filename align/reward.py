"""Load a trained reward model (base + LoRA adapter + score head) and score (prompt, response) pairs in batches.

    scorer = RewardScorer.from_pretrained("outputs/smollm2-rm")
    scores = scorer.score(["How do I boil an egg?"], ["Put it in boiling water for 8 minutes."])

Pairs are rendered exactly as TRL's RewardTrainer rendered them in training: the chat template over the prompt
messages followed by the response as an assistant turn. The PPO stage and the evaluation use this class.
"""

from __future__ import annotations

import os

import torch
from peft import PeftModel

from align import config, manifest, modeling


def model_args_for(adapter_dir: str, *, dtype: str | None = None, load_in_4bit: bool | None = None):
    """ModelArguments that rebuild the base an adapter was trained on, from its run.json (or adapter_config)."""
    run = manifest.read_run(adapter_dir) or {}
    lineage = run.get("lineage") or {}
    quant = lineage.get("quantization") or {}
    base = lineage.get("base_model")
    if base is None:
        from align.stacking import adapter_base

        base = adapter_base(adapter_dir)
    args = config.ModelArguments(
        model_name_or_path=base,
        model_revision=lineage.get("revision") or "main",
        gguf_file=lineage.get("gguf_file"),
        dtype=dtype or lineage.get("dtype") or "float32",
        load_in_4bit=quant.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit,
        use_bnb_nested_quant=bool(quant.get("double_quant")),
        bnb_4bit_quant_type=quant.get("bnb_4bit_quant_type") or "nf4",
        bnb_4bit_compute_dtype=quant.get("compute_dtype"),
        tokenizer_name_or_path=adapter_dir,
    )
    return args


def as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


class RewardScorer:
    """A reward model in eval mode with its tokenizer; `score` returns one float per (prompt, response)."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, adapter_dir: str, *, dtype: str | None = "float32", load_in_4bit: bool | None = None,
                        batch_size: int = 8) -> "RewardScorer":
        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; give the output directory of align/rm.py")
        args = model_args_for(adapter_dir, dtype=dtype, load_in_4bit=load_in_4bit)
        tokenizer = modeling.load_tokenizer(args)
        base = modeling.load_model(args, task="seq_cls", num_labels=1, training=False)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, adapter_dir)
        return cls(model, tokenizer, batch_size=batch_size)

    def encode(self, prompt, response: str) -> list[int]:
        msgs = as_messages(prompt) + [{"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]

    @torch.no_grad()
    def score_ids(self, batch_ids: list[list[int]]) -> torch.Tensor:
        """Scores of already tokenized sequences, in their order. Batches are formed from sequences of similar
        length (sorted, longest first) and right-padded, so little padding is computed."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        order = sorted(range(len(batch_ids)), key=lambda i: -len(batch_ids[i]))
        scores = torch.empty(len(batch_ids))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            chunk = [batch_ids[i] for i in rows]
            width = max(len(x) for x in chunk)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
            scores[rows] = self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu()
        return scores

    def score(self, prompts, responses: list[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])

    def pairwise_accuracy(self, pairs) -> float:
        """Share of preference pairs ({"prompt", "chosen", "rejected"} message lists) scored chosen > rejected."""
        chosen = self.score_ids([self._ids(p["prompt"], p["chosen"]) for p in pairs])
        rejected = self.score_ids([self._ids(p["prompt"], p["rejected"]) for p in pairs])
        return (chosen > rejected).float().mean().item()

    def _ids(self, prompt, side) -> list[int]:
        return self.tokenizer.apply_chat_template(as_messages(prompt) + list(side), tokenize=True,
                                                  return_dict=True)["input_ids"]
