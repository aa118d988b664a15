"""PPO stage on tiny random models: learning a rule-based reward, the four roles on one base (SFT reference and
reward adapters untouched, shared-base reward equal to RewardScorer), resume, and a 2-process run."""

import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

from align import config, ppo, rm, sft, stacking
from align.manifest import read_json
from align.reward import RewardScorer
from align.rl import rewards
from align.rl import roles as roles_lib
from align.testing import make_tiny_model

from .conftest import REPO, run_launcher
from .test_rm import rm_argv
from .test_sft import base_state, sft_argv

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey", "gold", "silver", "violet", "cyan", "amber"]
ANIMALS = ["tiger", "lion", "horse", "mouse", "eagle", "shark", "whale", "snake", "zebra", "camel", "dog", "panda", "rabbit", "goose", "sheep", "cat"]
MAX_NEW_TOKENS = 8
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def colour_reward(prompts, responses):
    """The rule-based reward of these tests: colour words per generated token (up to 1)."""
    return [sum(w in COLOURS for w in r.split()) / MAX_NEW_TOKENS for r in responses]


def vowel_reward(prompts, responses):
    """A reward that varies on any model's text: the share of vowels (tests/test_recipes.py's smoke runs)."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory, tokenizer, chat_jsonl):
    """A tiny random Llama whose output favours 32 word tokens (16 colours, 16 animals) over the rest of the
    vocabulary: their lm_head rows point along the mean final hidden state. A fully random tiny model spreads its
    samples over ~13k tokens, too thin for a reward to be found in a few dozen steps."""
    torch.manual_seed(0)
    path = make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny-words")), tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in COLOURS + ANIMALS]
    assert all(len(i) == 1 for i in ids)
    msgs = [[{"role": "user", "content": f"Reverse: red green {w} lamp"}] for w in ANIMALS[:8]]
    x = torch.tensor([tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"] for m in msgs])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=8, top_k=0)
    with torch.no_grad():
        hidden = model.model(out).last_hidden_state[:, x.shape[1] - 1 : -1].reshape(-1, model.config.hidden_size)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        model.lm_head.weight[[i[0] for i in ids]] = 6.0 * direction + 0.25 * torch.randn(len(ids), len(direction))
    model.save_pretrained(path)
    return path


def ppo_argv(model, data, out, **overrides):
    args = {"model_name_or_path": model, "dataset_name": data, "output_dir": out, "use_peft": "true", "lora_r": "8",
            "lora_alpha": "16", "lora_dropout": "0.0", "dtype": "float32", "max_steps": "3",
            "per_device_train_batch_size": "4", "mini_batch_size": "2", "ppo_epochs": "2",
            "max_new_tokens": str(MAX_NEW_TOKENS), "learning_rate": "1e-2", "eval_split_size": "4",
            "logging_steps": "1", "disable_tqdm": "true", "report_to": "none", "seed": "1",
            "reward_fn": "tests.test_ppo:colour_reward", "value_init": "sft"}
    args.update({k: str(v) for k, v in overrides.items()})
    argv = []
    for k, v in args.items():
        if v != "None":
            argv += [f"--{k}", v]
    return argv


def base_weights(roles):
    """The base's weights as loaded in the PPO model, named as in its model.safetensors."""
    return {k.replace(".base_layer", ""): v for k, v in roles.model.get_base_model().state_dict().items()
            if "lora_" not in k}


def adapter_weights(roles, name):
    """Adapter `name`'s LoRA weights, keyed as in its saved adapter_model.safetensors."""
    return {k.replace(f".{name}.", "."): v for k, v in roles.model.named_parameters() if f".{name}." in k}


# --------------------------------------------------------------------------------------------- learning


def test_ppo_raises_a_rule_based_reward_on_one_frozen_base(word_model, preference_jsonl, tmp_path):
    out = str(tmp_path / "ppo")
    roles, metrics = ppo.main(ppo_argv(word_model, preference_jsonl, out, max_steps=24, per_device_train_batch_size=16,
                                       mini_batch_size=8, eval_split_size=8))
    history = read_json(os.path.join(out, "log_history.json"))
    reward = [h["reward/score"] for h in history]
    kls = [h["objective/kl"] for h in history]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    print(f"reward first 5 steps {first:.3f}, last 5 {last:.3f}; eval {metrics['reward_before']:.3f} -> "
          f"{metrics['reward_after']:.3f}; KL max {max(kls):.2f}, final {metrics['final_kl']:.2f}")
    assert len(history) == 24 and history[0]["objective/kl"] == 0.0  # policy == reference before the first update
    assert last > first + 0.2, reward
    assert metrics["reward_after"] > metrics["reward_before"] + 0.2
    assert all(torch.isfinite(torch.tensor(kls))) and max(kls) < 40, kls  # < 5 nats per token

    # the base is bit-identical and loaded once; the policy and value adapters trained, nothing else
    base = base_state(word_model)
    loaded = base_weights(roles)
    assert all(torch.equal(loaded[k], v) for k, v in base.items())
    assert roles_lib.base_parameter_count(roles) == sum(v.numel() for v in base.values())
    assert set(roles.model.peft_config) == {"policy", "value"} and roles.reference is None
    trainable = {n for n, p in roles.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n or ".value." in n or n.startswith("value_head.") for n in trainable)

    # outputs: the policy adapter naming its base, the value adapter + head, the tokenizer, run.json
    assert stacking.adapter_base(out) == word_model
    policy = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(word_model), out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    want = roles.logits("policy", ids, torch.ones_like(ids), None, 4)
    torch.testing.assert_close(policy(ids).logits[:, :-1], want)
    assert "base_model.model.score.weight" in load_file(os.path.join(out, "value", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    run = read_json(os.path.join(out, "run.json"))
    assert run["stage"] == "ppo" and run["lineage"]["reference"] == "base"
    assert run["lineage"]["reward"] == {"source": "function", "name": "tests.test_ppo:colour_reward"}
    assert run["metrics"]["steps"] == 24 and run["data"]["eval"] == 8


# --------------------------------------------------------------------------------------------- roles


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama, chat_jsonl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ppo-sft") / "sft")
    sft.main(sft_argv(tiny_llama, chat_jsonl, out, max_steps=4))
    return out


@pytest.fixture(scope="module")
def rm_adapter(tiny_llama, preference_jsonl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ppo-rm") / "rm")
    rm.main(rm_argv(tiny_llama, preference_jsonl, out, max_steps=6, eval_split_size=0))
    return out


PROMPTS = ["Reverse: red green blue lamp", "Reverse: tiger music stone river", "Reverse: seven paper"]
RESPONSES = ["Sure: lamp blue green red", "No: tiger music stone river", "Sure: paper seven and more words"]


def test_value_model_starts_as_the_reward_model(tiny_llama, sft_adapter, rm_adapter):
    model_args = config.ModelArguments(model_name_or_path=tiny_llama, dtype="float32")
    roles = roles_lib.build_roles(model_args, sft_adapter=sft_adapter, reward_adapter=rm_adapter, value_init="reward")
    assert set(roles.model.peft_config) == {"policy", "reference", "reward", "value"}
    assert roles_lib.base_parameter_count(roles) == sum(v.numel() for v in base_state(tiny_llama).values())
    assert torch.equal(roles.value_head.weight, roles.reward_head.weight)
    reward, value = adapter_weights(roles, "reward"), adapter_weights(roles, "value")
    assert reward.keys() == value.keys() and all(torch.equal(reward[k], value[k]) for k in reward)
    # the reward at the last non-pad token is the value there: V = RM score on the same sequence
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    scores = roles.reward_scores(ids, torch.ones_like(ids), pad_token_id=0)
    values = roles.values(ids, torch.ones_like(ids), None, response_length=4)
    values_at_end = roles.value_head(roles.hidden_states("value", ids, torch.ones_like(ids))[:, -1]).squeeze(-1)
    torch.testing.assert_close(values_at_end, scores)
    assert values.shape == (1, 4)
    # with value_init: sft the value adapter is a copy of the SFT adapter and the head starts at zero
    roles = roles_lib.build_roles(model_args, sft_adapter=sft_adapter, reward_adapter=None, value_init="sft")
    sft_w, value = adapter_weights(roles, "reference"), adapter_weights(roles, "value")
    assert all(torch.equal(sft_w[k], value[k]) for k in sft_w) and not roles.value_head.weight.any()


def test_one_training_pass_reaches_policy_and_value_only(tiny_llama, sft_adapter, rm_adapter):
    """The training forward switches adapters (policy logits, then values); gradients reach exactly the trainable
    set (PEFT's own set_adapter, used where `stacking.AdapterSwitch` does not apply, flips requires_grad)."""
    model_args = config.ModelArguments(model_name_or_path=tiny_llama, dtype="float32")
    roles = roles_lib.build_roles(model_args, sft_adapter=sft_adapter, reward_adapter=rm_adapter, value_init="reward")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logits, values = roles(ids, torch.ones_like(ids), None, response_length=3)
    assert logits.shape[:2] == values.shape == (1, 3)
    (logits.float().logsumexp(-1).mean() + values.mean()).backward()
    grads = {n: p.grad for n, p in roles.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "lora_B" in n and (
        ".policy." in n or ".value." in n)) and grads["value_head.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if ".policy." not in n and ".value." not in n
               and not n.startswith("value_head."))
    assert {n for n, p in roles.named_parameters() if p.requires_grad} == roles.trainable


def test_role_switch_on_found_layers_matches_peft_and_walks_no_module(tiny_llama, sft_adapter, rm_adapter,
                                                                      monkeypatch):
    """Roles switched on the adapter layers found once (`stacking.AdapterSwitch`) give PEFT's `set_adapter` /
    `disable_adapter` outputs and gradients exactly (policy and value training pass, reference logits, reward
    scores), without a walk over the model's modules."""
    model_args = config.ModelArguments(model_name_or_path=tiny_llama, dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)

    def passes(roles):
        logits, values = roles(ids, mask, None, response_length=3)
        (logits.float().logsumexp(-1).mean() + values.mean()).backward()
        with torch.no_grad():
            reference = roles.logits(roles.reference, ids, mask, None, response_length=3)
            scores = roles.reward_scores(ids, mask, pad_token_id=0)
        return [logits.detach(), values.detach(), reference, scores]

    def grads(roles):
        return {n: p.grad for n, p in roles.named_parameters() if p.grad is not None}

    peft_roles = roles_lib.build_roles(model_args, sft_adapter=sft_adapter, reward_adapter=rm_adapter,
                                       value_init="reward")
    peft_roles.switch = None  # PEFT's own calls
    want = passes(peft_roles)
    roles = roles_lib.build_roles(model_args, sft_adapter=sft_adapter, reward_adapter=rm_adapter, value_init="reward")
    assert roles.switch is not None
    walks = []
    real = torch.nn.Module.named_modules
    monkeypatch.setattr(torch.nn.Module, "named_modules", lambda self, *a, **k: walks.append(1) or real(self, *a, **k))
    got = passes(roles)
    monkeypatch.undo()
    assert walks == []
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    got_grads, want_grads = grads(roles), grads(peft_roles)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for n in got_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=0, atol=0)
    assert {n for n, p in roles.named_parameters() if p.requires_grad} == roles.trainable
    assert roles.model.active_adapter == "policy"


def test_ppo_on_sft_and_reward_adapters(tiny_llama, sft_adapter, rm_adapter, preference_jsonl, tmp_path):
    sft_file = load_file(os.path.join(sft_adapter, "adapter_model.safetensors"))
    rm_file = load_file(os.path.join(rm_adapter, "adapter_model.safetensors"))
    out = str(tmp_path / "ppo")
    roles, metrics = ppo.main(ppo_argv(tiny_llama, preference_jsonl, out, sft_adapter=sft_adapter,
                                       reward_adapter=rm_adapter, reward_fn=None, value_init="reward",
                                       learning_rate="5e-3"))
    history = read_json(os.path.join(out, "log_history.json"))
    # the policy starts as the SFT adapter, which is the reference: KL exactly 0 before the first update
    assert history[0]["objective/kl"] == 0.0 and metrics["kl_before"] == 0.0
    assert history[-1]["objective/kl"] != 0.0

    # reward from the shared base == RewardScorer on the RM trained with align/rm.py (its own base copy)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    shared = rewards.AdapterReward(roles, rm_adapter)(prompts, RESPONSES)
    scorer = RewardScorer.from_pretrained(rm_adapter)
    want = scorer.score(PROMPTS, RESPONSES)
    torch.testing.assert_close(shared, want, atol=1e-4, rtol=1e-4)
    assert want.std() > 0  # the scores tell the pairs apart: a real check, not zeros against zeros
    separate = rewards.separate_reward_model(rm_adapter, "cpu")  # --reward_model: the same model, loaded apart
    torch.testing.assert_close(separate.score(PROMPTS, RESPONSES), want, atol=1e-5, rtol=1e-5)

    # base, reference (the SFT adapter) and reward adapter + head bit-identical after training; one base copy
    base = base_state(tiny_llama)
    loaded = base_weights(roles)
    assert all(torch.equal(loaded[k], v) for k, v in base.items())
    assert roles_lib.base_parameter_count(roles) == sum(v.numel() for v in base.values())
    reference = adapter_weights(roles, "reference")
    assert reference.keys() == sft_file.keys() and all(torch.equal(reference[k], sft_file[k]) for k in sft_file)
    reward = adapter_weights(roles, "reward")
    lora_file = {k: v for k, v in rm_file.items() if "score" not in k}
    assert reward.keys() == lora_file.keys() and all(torch.equal(reward[k], lora_file[k]) for k in lora_file)
    assert torch.equal(roles.reward_head.weight, rm_file["base_model.model.score.weight"])
    policy = adapter_weights(roles, "policy")
    assert any(not torch.equal(policy[k], sft_file[k]) for k in sft_file)  # the policy did train
    assert all(not p.requires_grad for n, p in roles.named_parameters() if ".reference." in n or ".reward." in n)

    # the saved value adapter is a reward-model-format adapter: RewardScorer loads it
    assert RewardScorer.from_pretrained(os.path.join(out, "value")).score(PROMPTS[:1], RESPONSES[:1]).shape == (1,)
    run = read_json(os.path.join(out, "run.json"))
    lineage = run["lineage"]
    assert lineage["parent_adapter"]["path"] == os.path.abspath(sft_adapter)
    assert lineage["parent_adapter"]["stage"] == "sft" and lineage["reference"] == "sft_adapter"
    assert lineage["reward"]["source"] == "adapter" and lineage["reward"]["path"] == os.path.abspath(rm_adapter)
    assert lineage["reward"]["parent"]["stage"] == "rm" and lineage["value_init"] == "reward"
    for key in ("reward_before", "reward_after", "kl_after", "final_kl", "train_value_loss", "train_clipfrac"):
        assert key in run["metrics"], key


def test_ppo_needs_a_reward_and_a_value_start(tiny_llama, preference_jsonl, tmp_path):
    with pytest.raises(config.ConfigError, match="needs a reward"):
        ppo.main(ppo_argv(tiny_llama, preference_jsonl, str(tmp_path / "a"), reward_fn=None))
    with pytest.raises(config.ConfigError, match="value_init: reward"):
        ppo.main(ppo_argv(tiny_llama, preference_jsonl, str(tmp_path / "b"), value_init="reward"))
    with pytest.raises(config.ConfigError, match="one reward"):
        ppo.main(ppo_argv(tiny_llama, preference_jsonl, str(tmp_path / "c"), reward_model=str(tmp_path)))
    with pytest.raises(config.ConfigError, match="module:function"):
        ppo.main(ppo_argv(tiny_llama, preference_jsonl, str(tmp_path / "d"), reward_fn="no_colon"))
    with pytest.raises(config.ConfigError, match="no speed options"):  # refused, not silently ignored
        ppo.main(ppo_argv(tiny_llama, preference_jsonl, str(tmp_path / "e"), speedups="fused_lora"))


def test_ppo_refuses_sharded_engines_before_loading(tiny_llama, preference_jsonl, tmp_path, monkeypatch):
    from align import launch

    ppo.check_ppo_launch({})  # one process
    ppo.check_ppo_launch({"WORLD_SIZE": "2"})  # DDP
    for env in ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
                {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
                {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}):
        with pytest.raises(launch.LaunchConfigError, match="multi_gpu.yaml"):
            ppo.check_ppo_launch(env)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # through main: refused before any model is loaded
    with pytest.raises(launch.LaunchConfigError, match="does not run under fsdp"):
        ppo.main(ppo_argv(tiny_llama, preference_jsonl, str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o" / "run.json")


# --------------------------------------------------------------------------------------------- resume, processes


def test_resumed_run_matches_an_uninterrupted_one(word_model, preference_jsonl, tmp_path):
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    common = {"save_steps": 2, "adaptive_kl": "true", "target_kl": "0.5", "kl_horizon": "100"}
    _, whole_metrics = ppo.main(ppo_argv(word_model, preference_jsonl, whole, max_steps=4, **common))
    ppo.main(ppo_argv(word_model, preference_jsonl, resumed, max_steps=2, **common))  # stops after checkpoint-2
    state = read_json(os.path.join(resumed, "checkpoint-2", "state.json"))
    assert state["steps"] == 2 and state["kl_ctl"]["value"] != 0.05  # the adaptive coefficient moved and is kept
    _, metrics = ppo.main(ppo_argv(word_model, preference_jsonl, resumed, max_steps=4, **common))
    a = load_file(os.path.join(whole, "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained: the comparison means something
    b = load_file(os.path.join(resumed, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    va = load_file(os.path.join(whole, "value", "adapter_model.safetensors"))
    vb = load_file(os.path.join(resumed, "value", "adapter_model.safetensors"))
    torch.testing.assert_close(vb["base_model.model.score.weight"], va["base_model.model.score.weight"],
                               atol=1e-5, rtol=1e-4)
    assert metrics["reward_before"] == whole_metrics["reward_before"]  # measured once, carried in the checkpoint
    assert metrics["kl_coef"] == pytest.approx(whole_metrics["kl_coef"])
    assert len(read_json(os.path.join(resumed, "log_history.json"))) == 4


def test_two_processes_keep_the_same_adapters(word_model, preference_jsonl, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(ENV, OMP_NUM_THREADS="1")  # two processes on two cores: no thread oversubscription
    # Runs used to hang at exit now and then (gloo's process group destroyed under the GIL while its worker thread
    # waited for the GIL: ppo.py now ends with a barrier). A timed-out launch is still retried once in a fresh
    # directory, and a second hang fails the test.
    for attempt in range(2):
        out = str(tmp_path / f"ddp{attempt}")
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "align/ppo.py"] + ppo_argv(
            word_model, preference_jsonl, out, max_steps=2, per_device_train_batch_size=2, mini_batch_size=1)
        try:
            proc = run_launcher(cmd, timeout=300, cwd=REPO, env=env)
            break
        except subprocess.TimeoutExpired as err:
            if attempt == 1:
                raise
            print(f"2-process PPO run timed out, retrying: {str(err.stdout)[-2000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hashes = dict(re.findall(r"ppo: process (\d) trainable weights sha256 ([0-9a-f]{64})", proc.stdout))
    assert set(hashes) == {"0", "1"} and hashes["0"] == hashes["1"], proc.stdout[-2000:]
    run = read_json(os.path.join(out, "run.json"))
    assert run["processes"] == 2 and run["trainable_sha256"] == hashes["0"]
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # the fresh adapter moved


def test_ppo_on_a_4bit_base(word_model, preference_jsonl, tmp_path):
    out = str(tmp_path / "qlora")
    roles, metrics = ppo.main(ppo_argv(word_model, preference_jsonl, out, max_steps=2, load_in_4bit="true"))
    assert any(type(m).__name__ == "Linear4bit" for m in roles.modules())
    history = read_json(os.path.join(out, "log_history.json"))
    assert history[0]["objective/kl"] == 0.0 and all(torch.isfinite(torch.tensor(h["loss/total"])) for h in history)
    assert read_json(os.path.join(out, "run.json"))["lineage"]["quantization"]["load_in_4bit"]
    assert metrics["steps"] == 2
