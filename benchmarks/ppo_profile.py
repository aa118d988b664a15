"""Where a PPO step's time goes on a tiny random Llama (SmolLM2 tokenizer, 49k vocabulary) on the CPU: cProfile of
`align/ppo.py` over a few steps, the 45 largest cumulative entries printed. A tiny model makes the per-call and
vocabulary-sized work visible (log-softmax, entropy, sampling over 49k tokens).

    python benchmarks/ppo_profile.py [STEPS] [--out DIR]   (16 rollouts, 48 new tokens, 4 epochs x mini-batch 8)
"""

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("steps", type=int, nargs="?", default=4)
    ap.add_argument("--out", default="/tmp/ppo_profile")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    os.chdir(REPO)
    import torch

    from align import ppo
    from align.testing import load_test_tokenizer, make_tiny_model
    from tests.conftest import synthetic_preference_rows
    from tests.test_ppo import ppo_argv

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    model = os.path.join(args.out, "tiny")
    if not os.path.isdir(model):
        make_tiny_model("llama", model, load_test_tokenizer())
    data = os.path.join(args.out, "pairs.jsonl")
    with open(data, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in synthetic_preference_rows(64))
    stage_argv = ppo_argv(model, data, os.path.join(args.out, "run"), max_steps=args.steps,
                          per_device_train_batch_size=16, mini_batch_size=8, ppo_epochs=4, max_new_tokens=48,
                          resume="false", eval_split_size=8)
    start = time.perf_counter()
    profile = cProfile.Profile()
    profile.enable()
    ppo.main(stage_argv)
    profile.disable()
    print(f"total {time.perf_counter() - start:.1f} s for {args.steps} steps")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
