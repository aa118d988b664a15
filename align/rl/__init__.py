"""PPO (RLHF) on adapters, as small pieces a reader can follow one screen at a time.

    config.py      PPOArguments: the recipe keys of the PPO stage
    rollout.py     prompts from the shared data module; batched generation from the policy (left padding, EOS)
    advantages.py  per-token KL penalty and reward, GAE advantages and returns, masked whitening      (pure)
    losses.py      log-probs and entropy from logits, clipped policy and value losses, approximate KL  (pure)
    kl.py          fixed or adaptive KL coefficient (Ziegler et al. 2019)                             (pure)
    roles.py       policy, reference, reward and value as PEFT adapters switched on one frozen base
    rewards.py     the reward: the reward adapter on the shared base, a separate reward model, or a function
    step.py        one PPO step: collect experience (rollout, score, advantages), then the clipped update
    checkpoint.py  save, find and resume `checkpoint-N` directories

`align/ppo.py` is the stage that puts them together.
"""
