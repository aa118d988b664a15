"""Log-likelihood scoring of (context, continuation) pairs in batches, and the choice tasks built on it.

    scorer = LogLikelihoodScorer(model, tokenizer, batch_size=16)
    results = scorer.loglikelihood([("Question: 2+2?\\nAnswer:", " 4"), ...])   # [LogLikelihood(logprob, greedy)]
    metrics = score_choice_task(scorer, task, docs)                              # {"acc", "acc_norm", ...}

Tokenization follows lm-eval's HF model: trailing spaces of the context move to the continuation, the pair is
encoded whole (the tokenizer's default special tokens) and the continuation tokens are those after the
context's own encoding; too long inputs lose tokens on the left. So the same prompts give the same numbers as
`lm-eval` (tests/test_eval.py cross-checks it), and every model is scored on exactly the same text.

Continuations that share their context (a multiple-choice question's options, a preference pair's two responses)
are scored in packed rows where the model supports segment attention (`align.packed_attention`): the context once, each
continuation after it at its own positions attending to the context and to itself, several questions back to back
in one row, no padding. The log-likelihoods are those of the padded rows (tests: to 1e-5 in fp32); lm-eval runs
every option's context again. `pack="auto"` packs on a CPU, where it was measured (the demo's report 1.95x); on a
GPU name it (`pack=True`, evaluate.py `--pack_scoring true`) until it is measured there.

Metrics, as lm-eval defines them:
    acc       the choice with the highest log-likelihood is the gold one
    acc_norm  the same with each log-likelihood divided by the choice's length in characters (without delimiter)
    lambada   acc: every continuation token is the greedy argmax; perplexity: exp(-mean log-likelihood) over docs
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.eval.suites import Doc, TaskSpec


@dataclass
class LogLikelihood:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax of its prediction
    n_tokens: int


def model_max_length(model, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class LogLikelihoodScorer:
    """Batched continuation log-likelihoods under a causal LM (eval mode, no grad)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 pack: bool | str = "auto", pack_tokens: int = 4096):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model)
        self.pack_tokens = pack_tokens  # tokens per packed row (and LM-head rows per row)
        if pack == "auto":
            pack = model_device(model).type == "cpu"
        self.pack = bool(pack) and packed_scoring_supported(model)

    def encode_pair(self, context: str, continuation: str,
                    add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
        ctx = self.tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
        return ctx, whole[len(ctx):]

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[LogLikelihood]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[LogLikelihood]:
        """Like `loglikelihood`, for pairs already tokenized (e.g. through a chat template)."""
        if any(not cont for _, cont in pairs):
            raise ValueError("a continuation encodes to no tokens")
        pairs = [(ctx or [self._prefix_token()], cont) for ctx, cont in pairs]
        inputs = [((ctx + cont)[-(self.max_length + 1):][:-1], len(cont), cont) for ctx, cont in pairs]
        out: list[LogLikelihood | None] = [None] * len(inputs)
        rest = range(len(inputs))
        if self.pack:
            rest = self._score_packed(pairs, out)
        order = sorted(rest, key=lambda i: -len(inputs[i][0]))  # similar lengths batch together
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            keep = max(inputs[i][1] for i in idx)
            logprobs = self._batch_logprobs([inputs[i][0] for i in idx], keep)
            for row, i in enumerate(idx):
                n_cont, cont = inputs[i][1], inputs[i][2]
                lp = logprobs[row, keep - n_cont:]  # the predictions of the continuation tokens
                out[i] = _likelihood(lp, cont)
        return out  # type: ignore[return-value]

    def _score_packed(self, pairs: list[tuple[list[int], list[int]]], out: list) -> list[int]:
        """Score, into `out`, the pairs whose context another pair shares (and that need no truncation), in packed
        rows; returns the indices of the others (scored in padded batches)."""
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if len(ctx) + len(cont) <= self.max_length + 1:
                groups.setdefault(tuple(ctx), []).append(i)
        units = [(list(ctx), idx) for ctx, idx in groups.items() if len(idx) > 1]
        packed = {i for _, idx in units for i in idx}
        row, size, preds = [], 0, 0
        for ctx, idx in units:
            tokens = len(ctx) + sum(len(pairs[i][1]) - 1 for i in idx)
            n_pred = sum(len(pairs[i][1]) for i in idx)
            if row and (size + tokens > self.pack_tokens or preds + n_pred > self.pack_tokens):
                self._packed_row(row, pairs, out)
                row, size, preds = [], 0, 0
            row.append((ctx, idx))
            size, preds = size + tokens, preds + n_pred
        if row:
            self._packed_row(row, pairs, out)
        return [i for i in range(len(pairs)) if i not in packed]

    def _packed_row(self, units: list[tuple[list[int], list[int]]], pairs, out: list) -> None:
        """One packed row: per unit its context, then each continuation's input tokens (all but the last) at the
        positions after the context, attending to the context and to themselves."""
        from align import packed_attention

        ids, pos, segments, pred_rows, spans = [], [], [], [], []
        for ctx, idx in units:
            o, lc = len(ids), len(ctx)
            ids += ctx
            pos += range(lc)
            segments.append((o, o + lc, [(o, o + lc)]))
            for i in idx:
                cont = pairs[i][1]
                s = len(ids)
                ids += cont[:-1]
                pos += range(lc, lc + len(cont) - 1)
                if len(cont) > 1:
                    segments.append((s, len(ids), [(o, o + lc), (s, len(ids))]))
                first = len(pred_rows)
                pred_rows += [o + lc - 1] + list(range(s, len(ids)))  # the positions predicting cont's tokens
                spans.append((i, first, len(pred_rows)))
        device = model_device(self.model)
        rows = torch.tensor(pred_rows, device=device)
        packed_attention.set_layout(segments, len(ids))
        inputs = dict(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([pos], device=device),
                      use_cache=False, **packed_attention.packed_attention_kwargs(device))
        try:
            with packed_attention.no_mask_building():
                try:
                    logits = self.model(**inputs, logits_to_keep=rows).logits[0]
                except TypeError:  # a model without `logits_to_keep`
                    logits = self.model(**inputs).logits[0, rows]
        finally:
            packed_attention.set_layout(None)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for i, a, b in spans:
            out[i] = _likelihood(logprobs[a:b], pairs[i][1])

    def _batch_logprobs(self, rows: list[list[int]], keep: int) -> torch.Tensor:
        """Log-softmax of the last `keep` positions of each row. Rows are left-padded (position ids follow the
        attention mask), so every row ends at the same column and only those columns go through the LM head."""
        device = model_device(self.model)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=keep).logits
        except TypeError:  # a model without `logits_to_keep`
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return torch.log_softmax(logits[:, -keep:].float(), dim=-1)

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _likelihood(lp: torch.Tensor, cont: list[int]) -> LogLikelihood:
    """A continuation's log-likelihood from the log-softmax rows `lp` that predict its tokens."""
    target = torch.tensor(cont, device=lp.device)
    return LogLikelihood(logprob=lp.gather(-1, target[:, None]).sum().item(),
                         greedy=bool((lp.argmax(-1) == target).all()), n_tokens=len(cont))


def packed_scoring_supported(model) -> bool:
    """Whether `model` can score packed rows: a transformers causal LM with SDPA attention and plain causal
    self-attention (switched here to align's segment attention, which is SDPA whenever no layout is set)."""
    from align import packed_attention, speed

    base = speed._causal_lm(model)
    if getattr(base, "config", None) is None or not hasattr(base, "set_attn_implementation"):
        return False
    if packed_attention.segment_attention_blocker(base, kinds=("sdpa",)):
        return False
    packed_attention.use_segment_attention(base)
    return True


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def choice_predictions(doc: Doc, lls: list[LogLikelihood]) -> dict:
    """Per-doc outcome of a multiple-choice or schema doc from its log-likelihoods (in option order)."""
    values = [x.logprob for x in lls]
    pred = max(range(len(values)), key=values.__getitem__)
    out = {"pred": pred, "gold": doc.gold, "logprobs": values, "acc": float(pred == doc.gold)}
    if len(doc.continuations) > 1:  # choices in the continuation: length-normalise by characters
        normed = [v / len(c) for v, c in zip(values, doc.choice_texts)]
        out["acc_norm"] = float(max(range(len(normed)), key=normed.__getitem__) == doc.gold)
    return out


def score_choice_task(scorer: LogLikelihoodScorer, task: TaskSpec, docs: list[Doc]) -> dict:
    """acc / acc_norm (multiple_choice), acc (schema), acc / perplexity (lambada), with standard errors,
    `n`, and per-doc `samples` (prediction, gold, log-likelihoods)."""
    pairs, spans = [], []
    for doc in docs:
        start = len(pairs)
        pairs += [(c, x) for c in doc.contexts for x in doc.continuations]
        spans.append((start, len(pairs)))
    lls = scorer.loglikelihood(pairs)
    samples = []
    for doc, (a, b) in zip(docs, spans):
        if task.format == "lambada":
            ll = lls[a]
            samples.append({"logprob": ll.logprob, "acc": float(ll.greedy)})
        else:
            samples.append(choice_predictions(doc, lls[a:b]))
    metrics: dict = {"n": len(docs)}
    for key in ("acc", "acc_norm"):
        values = [s[key] for s in samples if key in s]
        if values and len(values) == len(samples):
            metrics[key] = sum(values) / len(values)
            metrics[f"{key}_stderr"] = _stderr(values)
    if task.format == "lambada" and samples:
        metrics["perplexity"] = math.exp(-sum(s["logprob"] for s in samples) / len(samples))
    metrics["samples"] = samples
    return metrics
