"""The KL coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences", section 2.2; TRL's former `AdaptiveKLController`).

Adaptive rule, applied after every PPO step with the step's mean sequence KL and the number of samples it used:

    error = clip(kl / target - 1, -0.2, 0.2)
    coef  = coef * (1 + error * n_samples / horizon)

A KL above the target raises the coefficient (a stronger pull back to the reference), one below lowers it.
"""

from __future__ import annotations


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """A KL coefficient moved proportionally towards `target` KL, at a rate set by `horizon` (in samples)."""

    def __init__(self, value: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and kl_horizon must be > 0, got {target} and {horizon}")
        super().__init__(value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value


def kl_controller(args) -> FixedKLController:
    """The controller a recipe asks for: `adaptive_kl` with `target_kl` and `kl_horizon`, else fixed `kl_coef`."""
    if args.adaptive_kl:
        return AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
    return FixedKLController(args.kl_coef)
