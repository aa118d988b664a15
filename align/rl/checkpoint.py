"""PPO checkpoints: `output_dir/checkpoint-N/` after step N, and resuming from the last complete one.

A checkpoint holds what the run needs to continue as if it had not stopped:

    policy adapter            adapter_config.json, adapter_model.safetensors
    value/                    value adapter with its head (sequence-classification format)
    optimizer.pt              AdamW state (identical on every process after all-reduced gradients)
    rng_state_<rank>.pth      each process's random state (sampling, mini-batch order)
    state.json                step, KL coefficient, metrics so far; written last, so it marks a complete checkpoint
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from align.manifest import read_json, write_json_atomic
from align.rl import roles as roles_lib

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (those with state.json) in `output_dir`, as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def last_checkpoint(output_dir: str) -> str | None:
    done = checkpoints(output_dir)
    return done[-1][1] if done else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir: str, step: int, roles, optimizer, accelerator, state: dict,
                    base_model: str | None, save_total_limit: int | None = None) -> str:
    """Write `checkpoint-<step>` (collective: every process calls it) and prune old ones; returns its path."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        roles_lib.save_policy_and_value(roles, path, base_model)
        torch.save(optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), os.path.join(path, f"rng_state_{accelerator.process_index}.pth"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(path, "state.json"), dict(state, step=step))
        if save_total_limit:
            for _, old in checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(path: str, roles, optimizer, accelerator) -> dict:
    """Restore adapters, value head, optimizer and this process's random state; return state.json."""
    roles_lib.load_policy_and_value(roles, path)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                         weights_only=False))
    rng = os.path.join(path, f"rng_state_{accelerator.process_index}.pth")
    if os.path.isfile(rng):  # absent when the process count changed: sampling then differs from the first run
        _set_rng_state(torch.load(rng, weights_only=False))
    return read_json(os.path.join(path, "state.json"))
