"""What holds a training step's peak memory: the allocations of one step, replayed to its peak, the blocks live
there grouped by the code that allocated them.

    rec = memory_peak.Recorder(torch)      # CUDA: torch.cuda.memory._record_memory_history with Python stacks
    rec = memory_peak.CpuRecorder(torch)   # CPU: torch.profiler's allocation events (address, size, Python frames)
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


class CpuRecorder:
    """`Recorder` for the CPU: torch.profiler's allocation events of one step (`profile_memory`, each with its
    address, signed size and the ops and Python frames it happened under) as the allocator history. `before` is
    what the step can see live when it starts: the parameters, their gradients and the optimizer's state tensors
    of the modules and optimizers in `track`."""

    def __init__(self, torch, track=()):
        self.torch, self.track = torch, track
        self.before, self.prof = 0, None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        seen: set = set()
        self.before = 0
        for obj in self.track:  # modules and optimizers
            tensors = list(obj.parameters()) if hasattr(obj, "parameters") else []
            tensors += [p.grad for p in tensors if p.grad is not None]
            for state in getattr(obj, "state", {}).values():
                tensors += [v for v in state.values() if isinstance(v, self.torch.Tensor)]
            for t in tensors:
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    self.before += t.untyped_storage().nbytes()
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True)
        self.prof.__enter__()

    def stop(self) -> dict:
        self.prof.__exit__(None, None, None)
        return summarize(allocation_trace(self.prof), self.before)


def _frame(name: str) -> dict:
    """A profiler Python-function event name, `path/file.py(123): function`, as a snapshot frame."""
    head, _, func = name.partition("): ")
    path, _, line = head.rpartition("(")
    return {"filename": path, "line": int(line) if line.isdigit() else 0, "name": func}


def allocation_trace(prof) -> list[dict]:
    """The CPU allocation events of a finished `torch.profiler.profile(profile_memory=True, with_stack=True)`, in
    time order, as the CUDA snapshot's trace events (`alloc` / `free_completed`, with Python frames innermost
    first)."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu":
            events.append(e)
    trace = []
    for e in sorted(events, key=lambda e: e.start_time_ns):
        a = e.extra_fields
        if a.alloc_size < 0:
            trace.append({"action": "free_completed", "addr": a.ptr, "size": -a.alloc_size})
            continue
        frames, p = [], e.parent
        while p is not None:
            if p.tag == _EventType.PyCall:
                frames.append(_frame(p.name))
            p = p.parent
        trace.append({"action": "alloc", "addr": a.ptr, "size": a.alloc_size, "frames": frames})
    return trace
