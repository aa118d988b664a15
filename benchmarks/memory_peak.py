"""What holds a CUDA training step's peak memory: torch's allocator history of one step, replayed to its peak, the
blocks live there grouped by the code that allocated them.

    rec = memory_peak.Recorder(torch)      # torch.cuda.memory._record_memory_history with Python stacks
    rec.start(); <one training step>; summary = rec.stop()

`summary`: {"peak_gib": allocated at the step's peak (what was live before the step plus the step's own
allocations), "before_gib": live when recording began (weights, optimizer state, ...), "by_site": [[site, GiB],
...] of the step's allocations live at the peak, largest first}. A site is the innermost frame in align, TRL,
PEFT, transformers or torch.nn (else the innermost frame), as `file:line function`. `throughput.py --memory_step`
runs it on the step after the timed ones.
"""

from __future__ import annotations

import os

_OWN = ("/align/", "/trl/", "/peft/", "/transformers/", "/torch/nn/", "/bitsandbytes/")


def site(frames: list[dict]) -> str:
    """The frame that names who allocated: the innermost one in the libraries a step runs through."""
    if not frames:
        return "?"
    pick = next((f for f in frames if any(k in f.get("filename", "") for k in _OWN)), frames[0])
    return f"{os.path.basename(pick.get('filename', '?'))}:{pick.get('line', 0)} {pick.get('name', '?')}"


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """(the largest net bytes allocated over `trace`, the alloc events live at that point): `trace` is one device's
    allocator events in order (`alloc` and `free_completed` count; blocks freed that were allocated before the
    trace began lower the total below zero, as they should)."""
    current = peak = 0
    peak_at = -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            current += ev["size"]
            if current > peak:
                peak, peak_at = current, i
        elif ev["action"] == "free_completed":
            current -= ev["size"]
    live: dict[int, dict] = {}
    for ev in trace[: peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    return peak, list(live.values())


def summarize(trace: list[dict], before_bytes: int, top: int = 12) -> dict:
    peak, live = live_at_peak(trace)
    sites: dict[str, int] = {}
    for ev in live:
        key = site(ev.get("frames") or [])
        sites[key] = sites.get(key, 0) + ev["size"]
    gib = 1024**3
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])[:top]
    return {"peak_gib": round((before_bytes + peak) / gib, 3), "before_gib": round(before_bytes / gib, 3),
            "by_site": [[k, round(v / gib, 3)] for k, v in ranked]}


class Recorder:
    def __init__(self, torch):
        self.torch = torch
        self.before = 0

    def start(self) -> None:
        cuda = self.torch.cuda
        cuda.synchronize()
        self.before = cuda.memory_allocated()
        cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")

    def stop(self) -> dict:
        cuda = self.torch.cuda
        cuda.synchronize()
        snap = cuda.memory._snapshot()
        cuda.memory._record_memory_history(enabled=None)
        traces = snap.get("device_traces") or [[]]
        trace = traces[cuda.current_device()] if len(traces) > cuda.current_device() else traces[0]
        return summarize(trace, self.before)
