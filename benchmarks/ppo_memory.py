"""Peak memory of PPO's four roles: one shared base with four adapters (`align.rl.roles`, what align/ppo.py runs)
against four separate model copies for the same roles (policy, reference, reward and value models, each with its
own base). Each layout runs in a fresh process: load, then one PPO step (rollout, reward, reference log-probs,
values, advantages, clipped update) through the same `align.rl.step` code.

    python benchmarks/ppo_memory.py [--model DIR] [--batch 4] [--max_new_tokens 32] [--dtype float32]

Default model: SmolLM2-135M-Instruct at .cache/models/ when `make smollm2` has converted it, else a tiny random
Llama (said so in the output). Writes benchmarks/results/ppo_memory.json and prints a table.

Memory: on CPU the growth of peak RSS (VmHWM in /proc/self/status) over the process after its imports; on a GPU
`torch.cuda.max_memory_allocated`. Also the bytes of all weights held (unique tensor storages), exact on both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402  (after the path insert)
from torch import nn  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "ppo_memory.json")
LAYOUTS = ("shared", "separate")
PROMPTS = ["How do I boil an egg?", "Name three rivers in Europe.", "Write a haiku about rain.",
           "What is the capital of Peru?", "Explain photosynthesis briefly.", "Give me a synonym for happy.",
           "How many legs does a spider have?", "Translate 'good morning' into French."]


# ------------------------------------------------------------------------------------------------- measuring


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(*modules) -> int:
    """Bytes of the distinct tensor storages behind all parameters and buffers of `modules`."""
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


# ------------------------------------------------------------------------------------------------- inputs


def tiny_model(work: str) -> str:
    from align.testing import make_tiny_model

    return make_tiny_model("llama", os.path.join(work, "tiny-llama"))


def make_adapters(model_dir: str, work: str, r: int = 16) -> tuple[str, str]:
    """An SFT-style causal-LM LoRA adapter and a reward-model adapter (SEQ_CLS LoRA + score head), as align's
    stages save them. Their values do not matter for memory; their shapes do."""
    import transformers
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    sft_dir, rm_dir = os.path.join(work, "sft"), os.path.join(work, "rm")
    causal = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(causal, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=targets)
                   ).save_pretrained(sft_dir)
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    get_peft_model(seq, LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=targets,
                                   modules_to_save=["score"])).save_pretrained(rm_dir)
    for d in (sft_dir, rm_dir):
        tokenizer.save_pretrained(d)
    return sft_dir, rm_dir


# ------------------------------------------------------------------------------------------------- layouts


class SeparateRoles(nn.Module):
    """The four roles as four models, each with its own copy of the base, behind the interface of
    `align.rl.roles.SharedBaseRoles` that `align.rl.step` uses."""

    def __init__(self, policy, reference, value):
        super().__init__()
        self.policy, self.reference_model, self.value_model = policy, reference, value
        self.reference = "reference"
        self.value_head = value.get_base_model().score

    @property
    def model(self):  # what generates: the policy
        return self.policy

    def role(self, adapter):
        return nullcontext()

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        return (self.logits("policy", input_ids, attention_mask, position_ids, response_length),
                self.values(input_ids, attention_mask, position_ids, response_length))

    def logits(self, adapter, input_ids, attention_mask, position_ids, response_length: int):
        model = self.policy if adapter == "policy" else self.reference_model
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=response_length + 1, use_cache=False)
        return out.logits[:, :-1]

    def values(self, input_ids, attention_mask, position_ids, response_length: int):
        base = self.value_model.get_base_model()
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        return base.score(hidden[:, -response_length - 1 : -1]).squeeze(-1).float()


def build(layout: str, model_dir: str, sft_dir: str, rm_dir: str, dtype: str, device):
    """(roles, reward, modules holding weights) for one layout."""
    from peft import PeftModel

    from align import config, modeling
    from align.reward import RewardScorer
    from align.rl import rewards
    from align.rl import roles as roles_lib

    model_args = config.ModelArguments(model_name_or_path=model_dir, dtype=dtype)
    if layout == "shared":
        roles = roles_lib.build_roles(model_args, sft_adapter=sft_dir, reward_adapter=rm_dir, value_init="reward")
        roles.to(device)
        return roles, rewards.AdapterReward(roles, rm_dir), [roles]
    policy = PeftModel.from_pretrained(modeling.load_model(model_args), sft_dir, is_trainable=True)
    reference = PeftModel.from_pretrained(modeling.load_model(model_args, training=False), sft_dir).requires_grad_(False)
    value = PeftModel.from_pretrained(modeling.load_model(model_args, task="seq_cls"), rm_dir, is_trainable=True)
    reward_model = PeftModel.from_pretrained(modeling.load_model(model_args, task="seq_cls", training=False), rm_dir)
    scorer = RewardScorer(reward_model.requires_grad_(False), modeling.load_tokenizer(model_args))
    roles = SeparateRoles(policy, reference, value).to(device)
    reward_model.to(device)
    return roles, scorer.score, [roles, reward_model]


def run_layout(layout: str, model_dir: str, sft_dir: str, rm_dir: str, args) -> dict:
    """Load one layout and run one PPO step; return its memory figures."""
    from accelerate import Accelerator

    from align import config, data, modeling
    from align.rl import rollout, step
    from align.rl.config import PPOArguments

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()

    before = torch.cuda.memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    roles, reward, holders = build(layout, model_dir, sft_dir, rm_dir, args.dtype, device)
    loaded_weights, load_peak = weight_bytes(*holders), peak() - before
    roles.eval()
    tokenizer = modeling.load_tokenizer(config.ModelArguments(model_name_or_path=model_dir))
    data.ensure_chat_template(tokenizer)
    prompts = [rollout.Prompt([{"role": "user", "content": p}],
                              rollout.encode_prompt(tokenizer, [{"role": "user", "content": p}]))
               for p in (PROMPTS * args.batch)[: args.batch]]
    ppo_args = PPOArguments(per_device_train_batch_size=args.batch, mini_batch_size=args.batch, ppo_epochs=1,
                            max_new_tokens=args.max_new_tokens, reward_adapter=rm_dir)
    accelerator = Accelerator(cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW([p for p in roles.parameters() if p.requires_grad], lr=1e-5)
    torch.manual_seed(0)
    exp, _ = step.collect_experience(roles, reward, tokenizer, prompts, ppo_args, 0.05,
                                     rollout.generation_config(ppo_args, tokenizer))
    step.ppo_update(roles, optimizer, accelerator, exp, ppo_args)
    return {"layout": layout, "device": str(device), "peak_bytes": peak() - before, "load_peak_bytes": load_peak,
            "weight_bytes": loaded_weights,
            "trainable_parameters": sum(p.numel() for p in roles.parameters() if p.requires_grad)}


# ------------------------------------------------------------------------------------------------- driver


def measure_in_subprocess(layout: str, model_dir: str, sft_dir: str, rm_dir: str, args) -> dict:
    """Run one layout in a fresh Python process (peak RSS only ever grows within a process)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--layout", layout, "--model", model_dir, "--sft", sft_dir,
           "--rm", rm_dir, "--batch", str(args.batch), "--max_new_tokens", str(args.max_new_tokens),
           "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{layout} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], model_label: str) -> str:
    mib = 2 ** 20
    lines = [f"PPO roles on {model_label} ({results[0]['device']})",
             f"{'layout':<10} {'peak MiB':>10} {'load peak MiB':>14} {'weights MiB':>12} {'trainable':>11}"]
    for r in results:
        lines.append(f"{r['layout']:<10} {r['peak_bytes'] / mib:>10.1f} {r['load_peak_bytes'] / mib:>14.1f} "
                     f"{r['weight_bytes'] / mib:>12.1f} {r['trainable_parameters']:>11,}")
    shared, separate = results
    lines.append(f"separate / shared: peak {separate['peak_bytes'] / shared['peak_bytes']:.2f}x, load peak "
                 f"{separate['load_peak_bytes'] / shared['load_peak_bytes']:.2f}x, weights "
                 f"{separate['weight_bytes'] / shared['weight_bytes']:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2 if converted, else tiny)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per rollout")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)  # internal: one layout, JSON out
    parser.add_argument("--sft", help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layout:
        print(json.dumps(run_layout(args.layout, args.model, args.sft, args.rm, args)))
        return None

    from align.paths import SMOLLM2_DIR

    with tempfile.TemporaryDirectory() as work:
        have_smollm2 = os.path.isfile(os.path.join(SMOLLM2_DIR, "config.json"))
        if args.model or have_smollm2:
            model_dir = args.model or SMOLLM2_DIR
            label = os.path.basename(os.path.normpath(model_dir))
        else:
            model_dir, label = tiny_model(work), "a tiny random Llama (SmolLM2 not converted: run `make smollm2`)"

        sft_dir, rm_dir = make_adapters(model_dir, work)
        results = [measure_in_subprocess(layout, model_dir, sft_dir, rm_dir, args) for layout in LAYOUTS]
    report = {
        "model": label, "batch": args.batch, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
        "results": results,
        "ratio_peak": results[1]["peak_bytes"] / results[0]["peak_bytes"],
        "ratio_load_peak": results[1]["load_peak_bytes"] / results[0]["load_peak_bytes"],
        "ratio_weights": results[1]["weight_bytes"] / results[0]["weight_bytes"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    print(table(results, label))
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
