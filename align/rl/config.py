"""PPOArguments: the keys of the PPO stage. TRL (1.16) has no PPO trainer left, so these are align's own, named
after TRL's former `PPOConfig` and the Trainer keys users know (`learning_rate`, `max_steps`, `save_steps`, ...).

One PPO step = one rollout of `per_device_train_batch_size` prompts per process, then `ppo_epochs` passes over it
in mini-batches of `mini_batch_size`, each an optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.config import ConfigError

VALUE_INITS = ("reward", "sft")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class PPOArguments:
    """PPO stage settings (rollout, KL, advantages, losses, optimisation, reward, outputs)."""

    # Outputs and run
    output_dir: str = field(default="outputs/ppo", metadata=_help("Where the policy adapter, value/, run.json go."))
    seed: int = field(default=42, metadata=_help("Seed of initialisation, prompt order and sampling."))
    max_steps: int = field(default=100, metadata=_help("Number of PPO steps (rollout + update), the num_ppo_steps."))
    logging_steps: int = field(default=1, metadata=_help("Log the step statistics every this many PPO steps."))
    save_steps: int = field(default=0, metadata=_help("Save `checkpoint-N` every this many steps; 0: never."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most this many checkpoints."))
    report_to: list[str] = field(
        default_factory=lambda: ["none"], metadata=_help("Trackers for the step statistics: none, tensorboard, ...")
    )
    disable_tqdm: bool = field(default=False, metadata=_help("No progress bar."))
    bf16: bool = field(default=False, metadata=_help("bf16 autocast for every forward pass (accelerate)."))

    # Rollout
    per_device_train_batch_size: int = field(default=8, metadata=_help("Prompts per rollout, per process."))
    max_prompt_length: int | None = field(default=512, metadata=_help("Drop prompts longer than this (tokens)."))
    max_new_tokens: int = field(default=128, metadata=_help("Longest response generated."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature (log-probs use the same)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling; 0 samples from the whole vocabulary."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling; 1.0 samples from the whole vocabulary."))
    eos_token: str | None = field(
        default=None, metadata=_help("Token that ends a response; by default the (SFT) tokenizer's EOS token.")
    )

    # KL penalty against the reference
    kl_coef: float = field(default=0.05, metadata=_help("KL coefficient (the initial one when adaptive)."))
    adaptive_kl: bool = field(default=False, metadata=_help("Adapt kl_coef towards target_kl (Ziegler et al.)."))
    target_kl: float = field(default=6.0, metadata=_help("Target sequence KL of the adaptive controller."))
    kl_horizon: int = field(default=10000, metadata=_help("Horizon (in samples) of the adaptive controller."))

    # Advantages and losses
    gamma: float = field(default=1.0, metadata=_help("Discount factor of GAE."))
    lam: float = field(default=0.95, metadata=_help("Lambda of GAE."))
    whiten_rewards: bool = field(default=False, metadata=_help("Scale the per-token rewards to unit variance."))
    cliprange: float = field(default=0.2, metadata=_help("Clip range of the policy ratio."))
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value update."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss."))
    ent_coef: float = field(default=0.0, metadata=_help("Weight of the entropy bonus."))

    # Optimisation
    ppo_epochs: int = field(default=4, metadata=_help("Passes over each rollout batch."))
    mini_batch_size: int = field(default=4, metadata=_help("Rollouts per optimizer step, per process."))
    learning_rate: float = field(default=1e-5, metadata=_help("AdamW learning rate (policy and value)."))
    adam_epsilon: float = field(default=1e-5, metadata=_help("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm; 0 disables it."))

    # Reward and value
    reward_adapter: str | None = field(
        default=None, metadata=_help("Output dir of align/rm.py: its adapter and score head run on the shared base.")
    )
    reward_model: str | None = field(
        default=None,
        metadata=_help("A separate reward model, loaded on its own: a sequence-classification model dir, or an "
                       "align/rm.py output dir with its own copy of the base."),
    )
    reward_fn: str | None = field(
        default=None,
        metadata=_help("`module:function` called as fn(prompts: list[str], responses: list[str]) -> list[float]; "
                       "prompts are the chat-template text the policy saw, responses the decoded text."),
    )
    reward_batch_size: int = field(default=8, metadata=_help("Sequences per reward-model forward pass."))
    value_init: str = field(
        default="reward",
        metadata=_help("Value model start: the reward adapter and score head (`reward`), or the SFT adapter "
                       "(a fresh LoRA adapter without one) with a zero head (`sft`).", choices=list(VALUE_INITS)),
    )

    def __post_init__(self):
        checks = [
            (self.per_device_train_batch_size > 0 and self.mini_batch_size > 0, "batch sizes must be > 0"),
            (self.per_device_train_batch_size % max(self.mini_batch_size, 1) == 0,
             (f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
              f"mini_batch_size ({self.mini_batch_size})")),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.max_new_tokens > 0 and self.ppo_epochs > 0, "max_new_tokens and ppo_epochs must be > 0"),
            (self.value_init in VALUE_INITS, f"value_init must be one of {VALUE_INITS}, got {self.value_init!r}"),
            (sum(x is not None for x in (self.reward_adapter, self.reward_model, self.reward_fn)) <= 1,
             "give one reward: reward_adapter, reward_model or reward_fn"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]

    @property
    def trackers(self) -> list[str]:
        """`report_to` without "none"."""
        return [t for t in self.report_to if t != "none"]
