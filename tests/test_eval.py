"""Evaluation: scorer against hand-computed log-likelihoods (and lm-eval), model resolution, preference metrics,
task hooks, the forgetting gate, reports, and the CLI end to end, on tiny random models."""

import importlib.util
import json
import math
import os

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from align.eval import gate, models, preference, report, runner, scorer, suites, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "data", "benchmarks")


def write_jsonl(path, rows):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def make_adapter(base, out, tokenizer, seed, *, run=None, task_type="CAUSAL_LM"):
    """A LoRA adapter with random (non-zero) weights saved like a stage's output, with an optional run.json."""
    torch.manual_seed(seed)
    auto = transformers.AutoModelForSequenceClassification if task_type == "SEQ_CLS" else (
        transformers.AutoModelForCausalLM)
    kwargs = {"num_labels": 1} if task_type == "SEQ_CLS" else {}
    model = auto.from_pretrained(base, dtype=torch.float32, **kwargs)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type=task_type, modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    get_peft_model(model, cfg).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if run is not None:
        with open(os.path.join(out, "run.json"), "w") as fh:
            json.dump(run, fh)
    return str(out)


def hand_loglikelihood(model, tokenizer, context, continuation):
    """Sum of log p(continuation tokens | context), one unpadded sequence, no helper code."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


# ------------------------------------------------------------------------------------------------------ scorer


MC_ITEMS = [
    {"query": "Question: What colour is the sky on a clear day?\nAnswer:",
     "choices": ["blue", "a deep shade of green", "red"]},
    {"query": "Question: Which animal barks?\nAnswer:", "choices": ["the dog", "cat", "a very large fish", "cow"]},
    {"query": "The river froze, so", "choices": ["we skated on it.", "the tea was hot and sweet today."]},
]


def test_scorer_acc_and_acc_norm_match_hand_computation(tiny_lm, tokenizer, tmp_path):
    hand = [[hand_loglikelihood(tiny_lm, tokenizer, it["query"], " " + c) for c in it["choices"]] for it in MC_ITEMS]
    best = [max(range(len(h)), key=h.__getitem__) for h in hand]
    norm_best = [max(range(len(h)), key=lambda j: h[j] / len(it["choices"][j])) for h, it in zip(hand, MC_ITEMS)]
    # gold: the model's own answer for items 0 and 2, a wrong one for item 1 -> acc is exactly 2/3
    golds = [best[0], (best[1] + 1) % 4, best[2]]
    rows = [{**it, "gold": g} for it, g in zip(MC_ITEMS, golds)]
    task = suites.TaskSpec(name="mc", path=write_jsonl(tmp_path / "mc.jsonl", rows), format="multiple_choice")
    got = scorer.score_choice_task(scorer.LogLikelihoodScorer(tiny_lm, tokenizer, batch_size=2), task,
                                   suites.load_docs(task))

    for sample, h in zip(got["samples"], hand):
        assert sample["logprobs"] == pytest.approx(h, abs=1e-4)  # batched + padded == one unpadded sequence
    assert got["acc"] == pytest.approx(2 / 3)
    assert got["acc_norm"] == pytest.approx(sum(n == g for n, g in zip(norm_best, golds)) / 3)
    assert got["n"] == 3
    assert got["acc_stderr"] == pytest.approx(1 / 3)  # sample standard deviation of [1, 0, 1] / sqrt(3)


def test_shared_contexts_are_scored_in_packed_rows(tiny_lm, tokenizer, monkeypatch):
    """The options of a question share its context: they are scored in packed rows (the context once, several
    questions per row, no padding) with the log-likelihoods and greedy flags of the padded batches to 1e-5; pairs
    without a shared context, and pairs the window truncates, go the padded way."""
    from align import packed_attention

    pairs = [(it["query"], " " + c) for it in MC_ITEMS for c in it["choices"]]
    pairs += [("A lone context", " with its one continuation")]  # nothing shared
    want = scorer.LogLikelihoodScorer(tiny_lm, tokenizer, batch_size=3, pack=False).loglikelihood(pairs)
    packed = scorer.LogLikelihoodScorer(tiny_lm, tokenizer, batch_size=3, pack_tokens=40)
    assert packed.pack
    rows, padded = [], []
    real_row, real_batch = packed._packed_row, packed._batch_logprobs
    monkeypatch.setattr(packed, "_packed_row", lambda units, *a: rows.append(len(units)) or real_row(units, *a))
    monkeypatch.setattr(packed, "_batch_logprobs", lambda r, k: padded.append(len(r)) or real_batch(r, k))
    got = packed.loglikelihood(pairs)
    assert sum(rows) == 3 and len(rows) >= 2 and padded == [1]  # 3 questions in rows of <= 40 tokens; the lone pair
    assert packed_attention._layout is None
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5) and (g.greedy, g.n_tokens) == (w.greedy, w.n_tokens)
    assert len({round(g.logprob, 3) for g in got}) == len(got)  # every option scored on its own
    # a window that cuts most rows on the left: those go the padded way (packed, they would keep the whole context)
    short = [scorer.LogLikelihoodScorer(tiny_lm, tokenizer, batch_size=3, max_length=12, pack=p).loglikelihood(pairs)
             for p in (True, False)]
    assert [g.logprob for g in short[0]] == pytest.approx([g.logprob for g in short[1]], abs=1e-5)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(short[1], want)) > 0.1  # truncation matters here


def test_schema_lambada_and_perplexity_match_hand_computation(tiny_lm, tokenizer, tmp_path):
    stem = "The cup fell off the table because the"
    schema = {"context_options": [stem + " cup", stem + " table"], "continuation": "was slippery.", "gold": 1}
    hand = [hand_loglikelihood(tiny_lm, tokenizer, c, " was slippery.") for c in schema["context_options"]]
    task = suites.TaskSpec(name="s", path=write_jsonl(tmp_path / "s.jsonl", [schema]), format="schema")
    got = scorer.score_choice_task(scorer.LogLikelihoodScorer(tiny_lm, tokenizer), task, suites.load_docs(task))
    assert got["samples"][0]["logprobs"] == pytest.approx(hand, abs=1e-4)
    assert got["acc"] == float(hand[1] > hand[0]) and "acc_norm" not in got

    # lambada: acc is "every continuation token is the greedy choice"; one row is greedy by construction
    ids = tokenizer("one two three four")["input_ids"]
    with torch.no_grad():
        nxt = tiny_lm(torch.tensor([ids])).logits[0, -1].argmax().item()
    ctx, word = tokenizer.decode(ids), tokenizer.decode([nxt])
    assert tokenizer(ctx + word)["input_ids"] == ids + [nxt]  # the text round-trips to the same tokens
    rows = [{"context": ctx, "continuation": word}, {"context": ctx, "continuation": word + " zebra"}]
    task = suites.TaskSpec(name="l", path=write_jsonl(tmp_path / "l.jsonl", rows), format="lambada",
                           target_delimiter="")
    docs = suites.load_docs(task)
    lam = scorer.score_choice_task(scorer.LogLikelihoodScorer(tiny_lm, tokenizer), task, docs)
    lls = [hand_loglikelihood(tiny_lm, tokenizer, d.contexts[0], d.continuations[0]) for d in docs]
    assert [s["acc"] for s in lam["samples"]] == [1.0, 0.0]
    assert lam["perplexity"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-4)

    # perplexity of a text: every token predicted after the BOS/EOS prefix
    text = "The quick brown fox jumps over the lazy dog."
    ptask = suites.TaskSpec(name="p", path=write_jsonl(tmp_path / "p.jsonl", [{"text": text}]), format="perplexity")
    ppl = tasks.score_perplexity(scorer.LogLikelihoodScorer(tiny_lm, tokenizer), suites.load_docs(ptask))
    tok_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        logits = tiny_lm(torch.tensor([[prefix] + tok_ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tok_ids), reduction="sum").item()
    assert ppl["tokens"] == len(tok_ids)
    assert ppl["perplexity"] == pytest.approx(math.exp(nll / len(tok_ids)), rel=1e-4)
    assert ppl["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)


def test_suite_files_limits_and_fewshot(tmp_path):
    suite = suites.load_suite(os.path.join(REPO, "recipes", "eval", "general_quick.yaml"))
    assert [t.name for t in suite.tasks] == ["arc_easy", "arc_challenge", "piqa", "openbook_qa", "winogrande", "copa",
                                             "boolq", "lambada_openai"]
    assert all(t.limit == 50 and t.general and os.path.isfile(t.path) for t in suite.tasks)
    for task in suite.tasks:
        assert len(suites.load_docs(task)) == 50
    full = suites.load_suite(os.path.join(REPO, "recipes", "eval", "general_full.yaml"))
    assert {t.name: t.general for t in full.tasks}["gsm8k"] is False
    quick = suite.select(["piqa", "copa"]).with_limit(5)
    assert [(t.name, t.limit) for t in quick.tasks] == [("piqa", 5), ("copa", 5)]
    # few-shot examples come from the rows after the evaluated ones, solved
    shot = suites.TaskSpec(name="c", path=os.path.join(BENCH, "copa.jsonl"), format="multiple_choice", limit=2,
                           num_fewshot=1)
    with open(shot.path) as fh:
        rows = [json.loads(x) for x in fh][:3]
    docs = suites.load_docs(shot)
    assert docs[0].contexts[0] == rows[2]["query"] + " " + rows[2]["choices"][rows[2]["gold"]] + "\n\n" + rows[0][
        "query"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: x, path: data/benchmarks/copa.jsonl, format: multiple_choice, limt: 3}\n")
    with pytest.raises(suites.SuiteError, match="limt"):
        suites.load_suite(str(bad))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_scorer_matches_lm_eval_on_local_tasks(tiny_lm, tokenizer):
    from align.eval.lm_eval_backend import run_lm_eval

    suite = suites.Suite("x", "x", [
        suites.TaskSpec(name="piqa", path=os.path.join(BENCH, "piqa.jsonl"), format="multiple_choice", limit=5),
        suites.TaskSpec(name="winogrande", path=os.path.join(BENCH, "winogrande.jsonl"), format="schema", limit=5),
        suites.TaskSpec(name="lambada", path=os.path.join(BENCH, "lambada_openai.jsonl"), format="lambada", limit=5),
    ])
    theirs = run_lm_eval(tiny_lm, tokenizer, suite, batch_size=4, log_samples=True)
    ll = scorer.LogLikelihoodScorer(tiny_lm, tokenizer, batch_size=3)
    for task in suite.tasks:
        ours = scorer.score_choice_task(ll, task, suites.load_docs(task))
        for key in ("acc", "acc_norm", "perplexity"):
            if key in theirs[task.name]:
                assert ours[key] == pytest.approx(theirs[task.name][key], rel=1e-4), (task.name, key)
        for mine, lm in zip(ours["samples"], theirs[task.name]["samples"]):
            values = mine["logprobs"] if "logprobs" in mine else [mine["logprob"]]
            assert values == pytest.approx([r[0] for r in lm], abs=1e-3), task.name


# ------------------------------------------------------------------------------------------------ task hooks


@pytest.mark.parametrize("text,want", [
    ("She sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is 42.", "42"),
    ("It costs $1,000.50 in total", "1000.5"),
    ("Temperature fell to -3 degrees", "-3"),
    ("First 7, then 9.0", "9"),
    ("#### 7 apples, not 9", "7"),
    ("no number here", None),
])
def test_gsm8k_number_parsing(text, want):
    assert tasks.last_number(text) == want


def test_gsm8k_exact_match(tmp_path, monkeypatch):
    rows = [{"question": "2+2?", "answer": "2+2=4\n#### 4"}, {"question": "3*3?", "answer": "#### 9"},
            {"question": "10/4?", "answer": "#### 2.5"}]
    assert tasks.gsm8k_answer(rows[0]["answer"]) == "4" and tasks.gsm8k_answer("no marker") is None
    task = suites.TaskSpec(name="g", path=write_jsonl(tmp_path / "g.jsonl", rows), format="gsm8k")
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(prompts=prompts, **kwargs)
        return ["2 plus 2 is 4.", "The result is 6", "So it is 2.50 each"]

    monkeypatch.setattr(tasks, "generate", fake_generate)
    got = tasks.score_gsm8k(None, None, task, suites.load_docs(task))
    assert got["exact_match"] == pytest.approx(2 / 3)
    assert [s["pred"] for s in got["samples"]] == ["4", "6", "2.5"]
    assert seen["prompts"][0] == [{"role": "user", "content": "2+2?"}] and seen["max_new_tokens"] == 256


def test_greedy_generation_uses_the_chat_template(tiny_lm, tokenizer):
    out = tasks.generate(tiny_lm, tokenizer, [[{"role": "user", "content": "Hi"}], [{"role": "user", "content":
                                                                                      "A longer question here?"}]],
                         max_new_tokens=4, batch_size=2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"]
    want = tiny_lm.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)[0, len(prompt):]
    assert out[0] == tokenizer.decode(want, skip_special_tokens=True)  # left padding changed nothing
    assert tokenizer.padding_side == "right"


# ----------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def adapters_dir(tiny_llama, tokenizer, tmp_path_factory):
    """An SFT adapter, a DPO adapter trained from it (its reference), a reward model and a full fine-tune."""
    root = tmp_path_factory.mktemp("models")
    lineage = {"base_model": os.path.abspath(tiny_llama), "quantization": {"load_in_4bit": False}}
    sft = make_adapter(tiny_llama, root / "sft", tokenizer, 1, run={"stage": "sft", "lineage": lineage})
    dpo = make_adapter(tiny_llama, root / "dpo", tokenizer, 2, run={
        "stage": "dpo", "config": {"DPOConfig": {"beta": 0.5}},
        "lineage": {**lineage, "reference": "sft_adapter", "parent_adapter": {"path": sft, "stage": "sft"}}})
    rm = make_adapter(tiny_llama, root / "rm", tokenizer, 3, task_type="SEQ_CLS",
                      run={"stage": "rm", "lineage": lineage})
    full = root / "full"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(full)
    tokenizer.save_pretrained(full)
    (full / "run.json").write_text(json.dumps({"stage": "sft", "config": {"ModelArguments": {"use_peft": False}}}))
    bare = make_adapter(tiny_llama, root / "bare", tokenizer, 4)  # no run.json: adapter_config names the base
    return {"sft": sft, "dpo": dpo, "rm": rm, "full": str(full), "bare": bare}


def test_model_directories_resolve(tiny_llama, adapters_dir):
    base = models.resolve_model("base", tiny_llama)
    assert base.kind == "base" and base.base is None
    dpo = models.resolve_model("dpo", adapters_dir["dpo"])
    assert (dpo.kind, dpo.base, dpo.stage, dpo.reference, dpo.beta) == (
        "adapter", os.path.abspath(tiny_llama), "dpo", "sft_adapter", 0.5)
    assert dpo.parent_adapter == adapters_dir["sft"]
    bare = models.resolve_model("bare", adapters_dir["bare"])
    assert bare.kind == "adapter" and os.path.abspath(bare.base) == os.path.abspath(tiny_llama)
    assert models.resolve_model("rm", adapters_dir["rm"]).kind == "reward"
    assert models.resolve_model("full", adapters_dir["full"]).kind == "full"
    assert models.parse_model_args(["a=x", "y/z"]) == [("a", "x"), ("z", "y/z")]
    with pytest.raises(models.ModelResolutionError, match="neither"):
        models.resolve_model("x", os.path.dirname(adapters_dir["sft"]))
    # fingerprints: stable, different per model and per load setting
    assert models.fingerprint(dpo) == models.fingerprint(models.resolve_model("again", adapters_dir["dpo"]))
    assert models.fingerprint(dpo) != models.fingerprint(bare)
    assert models.fingerprint(dpo, dtype="float32") != models.fingerprint(dpo, dtype="bfloat16")


def test_a_plain_model_loads_quantized_for_qlora_comparisons(tiny_llama, adapters_dir, tiny_lm, tokenizer):
    """`DIR@4bit`: the base as a QLoRA adapter's base is loaded (NF4), its own fingerprint; adapters refuse it."""
    ref = models.resolve_model("base_nf4", f"{tiny_llama}@4bit")
    assert (ref.kind, ref.quantization, ref.path) == ("base", "4bit", os.path.abspath(tiny_llama))
    plain = models.resolve_model("base", tiny_llama)
    assert plain.quantization is None and models.fingerprint(ref) != models.fingerprint(plain)
    model, _ = models.load_causal_lm(ref)
    assert sum("Linear4bit" in type(m).__name__ for m in model.modules()) > 0
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    with torch.no_grad():
        got, want = model(ids).logits.float(), tiny_lm(ids).logits
    assert not torch.equal(got, want)  # quantized weights
    assert (got - want).abs().max() < 0.5 * want.abs().max()  # but the same model
    with pytest.raises(models.ModelResolutionError, match="only a plain model"):
        models.resolve_model("x", adapters_dir["sft"] + "@4bit")
    assert report.kind_label(ref.as_dict()) == "base (4bit)"


def test_adapter_loads_on_its_base(tiny_llama, adapters_dir, tiny_lm):
    model, tok = models.load_causal_lm(models.resolve_model("bare", adapters_dir["bare"]))
    manual = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), adapters_dir["bare"]).eval()
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad():
        got, want, plain = model(ids).logits, manual(ids).logits, tiny_lm(ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter is active


# --------------------------------------------------------------------------------------------- preference


def _pairs():
    return [{"prompt": [{"role": "user", "content": f"Reverse: red blue {w}"}],
             "chosen": [{"role": "assistant", "content": f"Sure: {w} blue red"}],
             "rejected": [{"role": "assistant", "content": f"No: red blue {w}"}]} for w in ("lamp", "tiger", "stone")]


def _hand_logp(model, tokenizer, pair, side):
    prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(prompt)] == prompt
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
    return sum(lp[i - 1, full[i]].item() for i in range(len(prompt), len(full)))


def test_dpo_implicit_reward_uses_the_sft_reference(tiny_llama, adapters_dir, tokenizer):
    ref = models.resolve_model("dpo", adapters_dir["dpo"])
    model, tok = models.load_causal_lm(ref, with_reference=True)
    assert set(model.peft_config) == {"default", "ref"}  # two adapters on one base
    pairs = _pairs()
    got = preference.implicit_reward_accuracy(model, tok, pairs, beta=ref.beta, batch_size=2)
    assert model.active_adapter == "default" and got["reference"] == "sft_adapter"

    def separate(adapter):
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter).eval()

    policy, sft = separate(adapters_dir["dpo"]), separate(adapters_dir["sft"])
    margins, chosen = [], []
    for p in pairs:
        rc = 0.5 * (_hand_logp(policy, tokenizer, p, "chosen") - _hand_logp(sft, tokenizer, p, "chosen"))
        rr = 0.5 * (_hand_logp(policy, tokenizer, p, "rejected") - _hand_logp(sft, tokenizer, p, "rejected"))
        margins.append(rc - rr), chosen.append(rc)
    assert got["reward_chosen"] == pytest.approx(sum(chosen) / 3, abs=1e-4)
    assert got["reward_margin"] == pytest.approx(sum(margins) / 3, abs=1e-4)
    assert got["implicit_reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert abs(got["reward_margin"]) > 1e-3  # the reference is not the policy

    # an adapter without a parent: the reference is the base with the adapter switched off
    bare, tok = models.load_causal_lm(models.resolve_model("bare", adapters_dir["bare"]), with_reference=True)
    assert preference.implicit_reward_accuracy(bare, tok, pairs[:1], beta=0.1)["reference"] == "adapter_off"


def test_preference_pairs_reward_model_and_win_rate(tmp_path, adapters_dir, preference_jsonl):
    rows = [{"prompt": "a", "chosen": "x", "rejected": "x"}, {"prompt": "b", "chosen": "", "rejected": "y"},
            {"prompt": "c", "chosen": "good", "rejected": "bad"}]
    pairs, skipped = preference.load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(pairs) == 1 and skipped == {"empty": 1, "chosen_equals_rejected": 1}

    class Judge:  # scores a response by its length
        def score(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])

        def pairwise_accuracy(self, pairs):
            return 0.75

    prompts = [[{"role": "user", "content": "q"}]] * 4
    w = preference.win_rate(Judge(), prompts, ["long answer", "ab", "abc", "x"], ["short", "ab", "a", "xyz"])
    assert w["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4) and w["n"] == 4
    assert preference.reward_model_accuracy(Judge(), pairs) == {"pairwise_accuracy": 0.75, "n": 1}


# ------------------------------------------------------------------------------------------------------ gate


def test_check_forgetting_warns_and_fails_on_a_drop():
    base = {"arc": 0.60, "piqa": 0.70, "boolq": 0.62}
    tuned = {"arc": 0.50, "piqa": 0.69, "boolq": 0.62}  # average drop (0.10 + 0.01 + 0) / 3
    with pytest.warns(gate.ForgettingWarning, match="arc"):
        result = gate.check_forgetting(base, tuned, threshold=0.02, mode="warn")
    assert result["average_drop"] == pytest.approx(0.11 / 3) and result["exceeded"] and not result["passed"]
    assert result["worst_task"] == "arc"
    with pytest.raises(gate.ForgettingError) as err:
        gate.check_forgetting(base, tuned, threshold=0.02, mode="fail")
    assert err.value.result["drops"]["arc"] == pytest.approx(0.10)
    assert gate.check_forgetting(base, tuned, threshold=0.05, mode="fail")["passed"]
    assert gate.check_forgetting(base, {**base, "arc": 0.9}, threshold=0.0, mode="fail")["average_drop"] < 0
    with pytest.raises(ValueError):
        gate.check_forgetting(base, tuned, 0.02, mode="strict")


def test_run_gate_on_an_adapter_that_forgets(tiny_llama, adapters_dir, tiny_lm, tokenizer, tmp_path):
    # items whose gold answer is the base model's own choice: the base scores 1.0, the adapter cannot do better
    hand = [[hand_loglikelihood(tiny_lm, tokenizer, it["query"], " " + c) for c in it["choices"]] for it in MC_ITEMS]
    rows = [{**it, "gold": max(range(len(h)), key=h.__getitem__)} for it, h in zip(MC_ITEMS, hand)]
    data = write_jsonl(tmp_path / "own.jsonl", rows)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: t\ntasks:\n  - {{name: own, path: {data}, format: multiple_choice}}\n")
    kwargs = {"cache_dir": str(tmp_path / "cache"), "batch_size": 4}
    same = gate.run_gate(tiny_llama, tiny_llama, str(suite), 0.0, "fail", **kwargs)
    assert same["passed"] and same["average_drop"] == 0 and same["base_scores"] == {"own": 1.0}
    # the tuned adapter's base is found from its lineage; it gets some of the base's answers wrong
    with pytest.raises(gate.ForgettingError) as err:
        gate.run_gate(adapters_dir["sft"], None, str(suite), 0.0, "fail", **kwargs)
    assert err.value.result["base"] == os.path.abspath(tiny_llama)
    assert err.value.result["tuned_scores"]["own"] < 1.0
    assert len(os.listdir(tmp_path / "cache")) == 2  # base (cached once for both calls) and the adapter


# ------------------------------------------------------------------------------------------------------ report


def saved_results():
    def task(name, metric):
        return {"name": name, "metric": metric, "general": True}

    return {
        "created": "2026-01-01T00:00:00", "baseline": "base", "full": "full", "forgetting_threshold": 0.02,
        "suite": {"name": "mini", "path": "mini.yaml", "tasks": [task("arc", "acc_norm"), task("piqa", "acc"),
                                                                   {"name": "ppl", "metric": "perplexity",
                                                                    "general": False}]},
        "models": {"base": {"kind": "base", "path": "/m/base"}, "sft": {"kind": "adapter", "path": "/m/sft",
                                                                        "stage": "sft", "base": "/m/base"},
                   "full": {"kind": "full", "path": "/m/full", "stage": "sft"}},
        "scores": {
            "base": {"arc": {"acc_norm": 0.50, "acc_norm_stderr": 0.05}, "piqa": {"acc": 0.70}, "ppl": {"perplexity": 20.0}},
            "sft": {"arc": {"acc_norm": 0.40}, "piqa": {"acc": 0.71}, "ppl": {"perplexity": 25.0}},
            "full": {"arc": {"acc_norm": 0.45}, "piqa": {"acc": 0.69}, "ppl": {"perplexity": 30.0}},
        },
        "preference": {"sft": {"implicit_reward_accuracy": 0.8, "reward_margin": 0.3, "reward_chosen": 0.2,
                               "reward_rejected": -0.1, "beta": 0.1, "reference": "sft_adapter", "n": 10}},
        "win_rate": {"sft": {"win_rate": 0.625, "reward": 1.0, "baseline_reward": 0.5, "n": 8, "baseline": "base"}},
        "forgetting": {"sft": {"average_drop": 0.045, "drops": {"arc": 0.10, "piqa": -0.01}, "threshold": 0.02,
                               "exceeded": True, "passed": False, "mode": "warn", "worst_task": "arc"}},
        "training": {"sft": {"stage": "sft", "log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
                                                             {"step": 2, "eval_loss": 1.7}]}},
    }


def test_report_from_saved_results(tmp_path):
    from align import evaluate

    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved_results()))
    assert evaluate.main(["--report_from", str(path), "--output_dir", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    for section in ("# Evaluation report", "## Models", "## Scores", "## Forgetting", "## Preference",
                    "## Win rate", "## Plots"):
        assert section in md, section
    scores = md.split("## Scores", 1)[1].split("## Forgetting", 1)[0]
    sft_row = next(line for line in scores.splitlines() if line.startswith("| sft |"))
    # arc dropped 0.10 against the base (flagged) and 0.05 against the full fine-tune; piqa rose
    assert "**0.400 (Δbase -0.100, Δfull -0.050)** ⚠" in sft_row
    assert "0.710 (Δbase +0.010, Δfull +0.020)" in sft_row and "0.710 (Δbase +0.010, Δfull +0.020)** ⚠" not in sft_row
    assert "25.000 (Δbase +5.000, Δfull -5.000)" in sft_row  # perplexity: reported, never flagged
    assert "**0.555 (Δbase -0.045, Δfull -0.015)** ⚠" in sft_row  # general average
    assert "0.800" in sft_row and "0.625" in sft_row  # preference accuracy and win rate in the same table
    assert "`sft`: average drop +0.045 over 2 general tasks" in md and "exceeds" in md  # no stderr for every task
    assert "| 0.800 | 10 | standard error 0.126, margin +0.300" in md  # sqrt(0.8 * 0.2 / 10)
    # with every task's standard error: the average drop's, and whether it is within noise
    saved = saved_results()
    for model, ses in (("base", (0.05, 0.04)), ("sft", (0.05, 0.04))):
        saved["scores"][model]["arc"]["acc_norm_stderr"], saved["scores"][model]["piqa"]["acc_stderr"] = ses
    se = (2 * 0.05**2 + 2 * 0.04**2) ** 0.5 / 2
    saved["settings"] = {"limit": 20}
    path.write_text(json.dumps(saved))
    assert evaluate.main(["--report_from", str(path), "--output_dir", str(tmp_path / "r2")]) == 0
    md2 = (tmp_path / "r2" / "report.md").read_text()
    assert f"threshold 0.02); standard error {se:.3f}, so within noise of no change" in md2
    assert "At most 20 examples per task (`--limit`): one example moves a task's score by 0.050" in md2
    assert "examples per task" not in md  # no limit given
    saved["scores"]["base"]["arc"]["acc_norm_stderr"] = saved["scores"]["sft"]["arc"]["acc_norm_stderr"] = 0.001
    saved["scores"]["base"]["piqa"]["acc_stderr"] = saved["scores"]["sft"]["piqa"]["acc_stderr"] = 0.001
    path.write_text(json.dumps(saved))
    assert evaluate.main(["--report_from", str(path), "--output_dir", str(tmp_path / "r3")]) == 0
    md3 = (tmp_path / "r3" / "report.md").read_text()
    assert "threshold 0.02); standard error 0.001; largest drop" in md3
    assert "![Training curves: sft](plots/training_sft.png)" in md
    assert (tmp_path / "r" / "plots" / "general_suite.png").stat().st_size > 1000
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "class='forget'" in html
    assert "src='plots/" not in html  # self-contained


def test_training_log_is_read_from_trainer_state(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": 1, "epoch": 0.5, "loss": 2.0, "rewards/margins": 0.1}, {"step": 2, "train_runtime": 3.0}]}))
    log = report.read_training_log(str(tmp_path))
    assert log["log_history"] == [{"step": 1, "loss": 2.0, "rewards/margins": 0.1}]
    assert report.read_training_log(str(tmp_path / "checkpoint-2" / "nothing")) is None


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_evaluates_base_adapters_and_reward_model(tiny_llama, adapters_dir, preference_jsonl, tmp_path,
                                                      monkeypatch):
    from align import evaluate

    data = write_jsonl(tmp_path / "own.jsonl", [{**it, "gold": 0} for it in MC_ITEMS])
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: t\ntasks:\n  - {{name: own, path: {data}, format: multiple_choice}}\n"
                     f"  - {{name: copa, path: {BENCH}/copa.jsonl, format: multiple_choice, limit: 3}}\n")
    with open(os.path.join(adapters_dir["dpo"], "trainer_state.json"), "w") as fh:
        json.dump({"log_history": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6, "rewards/accuracies": 0.7}]}, fh)
    out, cache = tmp_path / "report", tmp_path / "cache"
    argv = ["--models", f"base={tiny_llama}", f"sft={adapters_dir['sft']}", f"dpo={adapters_dir['dpo']}",
            f"full={adapters_dir['full']}", f"rm={adapters_dir['rm']}", "--suite", str(suite),
            "--preference_data", preference_jsonl, "--preference_limit", "4", "--reward_model", adapters_dir["rm"],
            "--win_rate_limit", "2", "--max_new_tokens", "4", "--output_dir", str(out), "--cache_dir", str(cache),
            "--batch_size", "4"]
    with pytest.warns(gate.ForgettingWarning):  # the random adapters lose the base's answers on "own"
        assert evaluate.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"base", "sft", "dpo", "full"}  # the reward model is no causal LM
    assert results["scores"]["full"] == results["scores"]["base"]  # same weights, same scores
    assert results["preference"]["dpo"]["reference"] == "sft_adapter" and results["preference"]["dpo"]["n"] == 4
    assert 0 <= results["preference"]["rm"]["pairwise_accuracy"] <= 1
    assert set(results["win_rate"]) == {"sft", "dpo", "full"} and results["win_rate"]["sft"]["n"] == 2
    assert set(results["forgetting"]) == {"sft", "dpo", "full"} and results["forgetting"]["full"]["average_drop"] == 0
    assert results["training"]["dpo"]["log_history"][1]["rewards/accuracies"] == 0.7
    assert (out / "samples" / "sft.json").is_file() and (out / "responses.json").is_file()
    assert "## Scores" in (out / "report.md").read_text() and (out / "plots" / "training_dpo.png").is_file()

    # a second run is served from the cache: no model is loaded
    loaded = []
    original = runner.load_causal_lm
    monkeypatch.setattr(runner, "load_causal_lm", lambda *a, **k: loaded.append(a) or original(*a, **k))
    with pytest.warns(gate.ForgettingWarning):
        assert evaluate.main(argv[:-6] + ["--output_dir", str(tmp_path / "again"), "--cache_dir", str(cache),
                                          "--batch_size", "4"]) == 0
    assert loaded == []
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["scores"] == results["scores"] and again["win_rate"] == results["win_rate"]
