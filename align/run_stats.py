"""Speed and memory of a training run, written into run.json's metrics next to the losses.

    clock = run_stats.StepClock()
    trainer.add_callback(clock)
    trainer.train()
    metrics.update(run_stats.summarize(clock, trainer))

`train_step_s_median`: median wall time of an optimizer step after the first `warmup` steps (compilation,
allocator growth); `train_tokens_per_s`: tokens the trainer counted (TRL's `num_tokens`, summed over processes)
between the end of the warm-up and the last logged step, over that time (needs a `num_tokens` log at both ends:
`logging_steps` 1 gives it); `train_peak_memory_gib`: the largest `torch.cuda.max_memory_allocated` of any
process since training began (GPU only), and `train_peak_memory_gib_per_rank`.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (and the peak-memory counter reset at the start).

    On a GPU the end of a step is a CUDA event recorded on the stream, read after training (`finalize`): a host
    clock would need a sync per step (the host runs ahead of the GPU), which stalls the host between steps. The
    events' times are converted to the host clock of the start of training."""

    def __init__(self):
        self.ends: dict[int, float] = {}
        self.start: float | None = None
        self._events: dict[int, object] = {}
        self._start_event = None

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()  # once: the start event and the host clock then agree
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start_event is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events[state.global_step] = event
        else:
            self.ends[state.global_step] = time.perf_counter()

    def on_log(self, args, state, control, **kwargs):
        self._read_events(wait=False)  # the events the GPU has passed: a long run keeps few alive

    def finalize(self) -> None:
        """Turn the recorded step events into `ends` (waits for the last one)."""
        self._read_events(wait=True)

    def _read_events(self, wait: bool) -> None:
        for step in sorted(self._events):
            event = self._events[step]
            if not wait and not event.query():
                return
            event.synchronize()
            self.ends[step] = self.start + self._start_event.elapsed_time(event) / 1000.0
            del self._events[step]


def step_times(ends: dict[int, float], start: float | None) -> list[float]:
    """Durations of consecutive steps (the first from the start of training)."""
    steps = sorted(ends)
    times, last = [], start
    for step in steps:
        if last is not None:
            times.append(ends[step] - last)
        last = ends[step]
    return times


def tokens_per_second(ends: dict[int, float], log_history: list[dict], warmup: int) -> float | None:
    """Tokens counted between the end of step `warmup` and the last step with a `num_tokens` log, per second."""
    seen = {e["step"]: e["num_tokens"] for e in log_history if "num_tokens" in e and "step" in e and "loss" in e}
    steps = [s for s in sorted(seen) if s in ends and s >= warmup]
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    elapsed = ends[last] - ends[first]
    return (seen[last] - seen[first]) / elapsed if elapsed > 0 else None


def peak_memory_per_rank(accelerator=None) -> list[float]:
    """Each process's peak allocated GPU memory in GiB (gathered: call it on every process); [] on CPU."""
    if not torch.cuda.is_available():
        return []
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=torch.device("cuda"))
    if accelerator is not None and accelerator.num_processes > 1:
        peak = accelerator.gather(peak)
    return [round(float(v), 3) for v in peak.cpu()]


def summarize(clock: StepClock, trainer, warmup: int = 2) -> dict:
    """The speed and memory metrics of the module docstring (keys absent where they cannot be measured)."""
    out = {}
    clock.finalize()
    times = step_times(clock.ends, clock.start)
    timed = times[warmup:] if len(times) > warmup else times
    if timed:
        out["train_step_s_median"] = round(statistics.median(timed), 4)
    tps = tokens_per_second(clock.ends, trainer.state.log_history, warmup)
    if tps is not None:
        out["train_tokens_per_s"] = round(tps, 1)
    per_rank = peak_memory_per_rank(getattr(trainer, "accelerator", None))
    if per_rank:
        out["train_peak_memory_gib"] = max(per_rank)
        out["train_peak_memory_gib_per_rank"] = per_rank
    return out
