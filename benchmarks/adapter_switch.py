"""Host time of switching adapters on one shared base: PEFT's calls against `stacking.AdapterSwitch` (the LoRA layers
found once), for a PPO role switch (`SharedBaseRoles.role`, four role adapters) and DPO's reference switch (TRL's
`use_adapter` to its "ref" copy).

    python benchmarks/adapter_switch.py [--model DIR] [--repeats 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_ms(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, ".cache", "models", "SmolLM2-135M-Instruct"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import use_adapter

    from align.rl.roles import SharedBaseRoles

    def lora():
        return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")

    base = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    model = get_peft_model(base, lora(), adapter_name="policy")
    for name in ("reference", "reward", "value"):
        model.add_adapter(name, lora())
    model.set_adapter("policy")
    hidden = model.config.hidden_size
    roles = SharedBaseRoles(model, torch.nn.Linear(hidden, 1), torch.nn.Linear(hidden, 1), reference_adapter=True)
    switch = roles.switch

    def role(name):
        with roles.role(name):
            pass

    rows = {}
    for name in ("value", "reference", None):
        fast = timed_ms(functools.partial(role, name), args.repeats)
        roles.switch = None  # PEFT's own set_adapter / disable_adapter, then the trainable set put back
        slow = timed_ms(functools.partial(role, name), args.repeats)
        roles.switch = switch
        rows[f"ppo role({name})"] = dict(peft_ms=round(slow, 3), adapter_switch_ms=round(fast, 3))

    def trl_reference():
        with use_adapter(model, "reference"):
            pass

    def quick_reference():
        with switch.use("reference"):
            pass

    rows["dpo reference"] = dict(peft_ms=round(timed_ms(trl_reference, args.repeats), 3),
                                 adapter_switch_ms=round(timed_ms(quick_reference, args.repeats), 3))
    result = dict(model=os.path.basename(os.path.normpath(args.model)), modules=len(list(model.modules())),
                  adapters=sorted(model.peft_config), repeats=args.repeats,
                  device=f"cpu ({os.cpu_count()} cores)", time=time.strftime("%Y-%m-%d %H:%M:%S"), switches=rows)
    for k, v in rows.items():
        print(f"{k:>24}: PEFT {v['peft_ms']:8.2f} ms, AdapterSwitch {v['adapter_switch_ms']:6.3f} ms")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
