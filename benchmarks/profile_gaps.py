"""Where a GPU waits for the CPU: GPU-idle gaps of a torch.profiler trace attributed to the code that was running.

    python benchmarks/profile_gaps.py trace.json [--steps N]

A kernel that starts after the GPU went idle, and whose launch call came after that moment, waited for the CPU (Python,
dispatch, a sync): the gap before it is charged to every frame of the stack that issued the launch (Python frames
when the trace was taken `with_stack=True`, op names otherwise), once per frame. Blocking calls (stream/device/event
synchronize, device-to-host copies) are charged the same way, and device copies and fills (memcpy, memset kernels)
to the frame and op that issued them. `throughput.py --profile N --profile_stack` runs this on
its profiled steps and puts the result in the run's JSON.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

_GPU = ("kernel", "gpu_memcpy", "gpu_memset")
_STACK = ("python_function", "cpu_op", "user_annotation")
_SYNC = ("Synchronize", "cudaMemcpy", "cuMemcpy")


class _Stacks:
    """Nested intervals per thread; `at(tid, t)` gives the frames open at time t, outermost first."""

    def __init__(self, events):
        by_tid = defaultdict(list)
        for e in events:
            by_tid[e["tid"]].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
        self.threads = {}
        for tid, evs in by_tid.items():
            evs.sort(key=lambda x: (x[0], -x[1]))
            parent, open_ = [], []
            for i, (s, _end, _) in enumerate(evs):
                while open_ and evs[open_[-1]][1] <= s:
                    open_.pop()
                parent.append(open_[-1] if open_ else -1)
                open_.append(i)
            self.threads[tid] = ([s for s, _, _ in evs], evs, parent)

    def at(self, tid, t) -> list[str]:
        if tid not in self.threads:
            return []
        starts, evs, parent = self.threads[tid]
        i = bisect.bisect_right(starts, t) - 1
        while i >= 0 and evs[i][1] <= t:  # ended before t: so did its earlier siblings; try its parent
            i = parent[i]
        frames = []
        while i >= 0:
            frames.append(evs[i][2])
            i = parent[i]
        return frames[::-1]


def _short(name: str) -> str:
    for marker in ("site-packages/", "/align/", "/benchmarks/"):
        if marker in name:
            return name.split(marker, 1)[1] if marker == "site-packages/" else marker.strip("/") + "/" + name.split(
                marker, 1)[1]
    return name


def analyze(trace: dict | str, steps: int = 1, top: int = 40, min_gap_us: float = 2.0) -> dict:
    """GPU-idle time per step charged to the frames that issued the late launches, and blocking calls likewise; the
    span from the first kernel to the last, the gaps of `min_gap_us` or less between back-to-back kernels (each
    kernel's start-up, not the CPU's) and the kernels, copies and fills per step."""
    if isinstance(trace, str):
        with open(trace) as fh:
            trace = json.load(fh)
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    gpu = sorted((e for e in events if e.get("cat") in _GPU), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    stacks = _Stacks([e for e in events if e.get("cat") in _STACK or e.get("cat") == "cuda_runtime"])
    idle, short, cpu_bound, inclusive, leaf = 0.0, 0.0, 0.0, defaultdict(float), defaultdict(float)
    busy_until = None
    for k in gpu:
        if busy_until is not None and 0 < k["ts"] - busy_until <= min_gap_us:
            short += k["ts"] - busy_until  # back-to-back kernels: the device's own time between them
        if busy_until is not None and k["ts"] - busy_until > min_gap_us:
            gap = k["ts"] - busy_until
            idle += gap
            launch = launches.get(k.get("args", {}).get("correlation"))
            if launch is not None and launch["ts"] > busy_until:  # the launch itself came late: the CPU was behind
                cpu_bound += gap
                frames = [_short(f) for f in stacks.at(launch["tid"], launch["ts"])]
                for f in dict.fromkeys(frames):
                    inclusive[f] += gap
                py = [f for f in frames if ".py(" in f]
                leaf[py[-1] if py else (frames[-1] if frames else "?")] += gap
        end = k["ts"] + k.get("dur", 0)
        busy_until = end if busy_until is None else max(busy_until, end)
    syncs = defaultdict(float)
    for e in events:
        if e.get("cat") == "cuda_runtime" and any(s in e["name"] for s in _SYNC) and e.get("dur", 0) > 20:
            frames = [_short(f) for f in stacks.at(e["tid"], e["ts"]) if ".py(" in f]
            syncs[(frames[-1] if frames else "?") + " -> " + e["name"]] += e["dur"]
    copies, copy_calls = defaultdict(float), defaultdict(int)
    for k in gpu:  # device copies and fills: the code that issued them (the Python frame, then the op)
        if k.get("cat") not in ("gpu_memcpy", "gpu_memset"):
            continue
        launch = launches.get(k.get("args", {}).get("correlation"))
        frames = [_short(f) for f in stacks.at(launch["tid"], launch["ts"])] if launch is not None else []
        py = [f for f in frames if ".py(" in f]
        ops = [f for f in frames if ".py(" not in f and f != launch["name"]]  # not the runtime call itself
        key = f"{k['name']}: {py[-1] if py else '?'} -> {ops[-1] if ops else '?'}"
        copies[key] += k.get("dur", 0)
        copy_calls[key] += 1
    per = lambda d: [dict(ms_per_step=v / 1000 / steps, frame=k) for k, v in
                     sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    copy_list = [dict(r, calls_per_step=copy_calls[r["frame"]] / steps) for r in per(copies)]
    span = (gpu[-1]["ts"] + gpu[-1].get("dur", 0) - gpu[0]["ts"]) if gpu else 0.0
    return dict(steps=steps, gpu_span_ms_per_step=span / 1000 / steps, idle_ms_per_step=idle / 1000 / steps,
                short_gaps_ms_per_step=short / 1000 / steps, kernels_per_step=len(gpu) / steps,
                cpu_bound_idle_ms_per_step=cpu_bound / 1000 / steps, by_frame=per(inclusive), by_leaf=per(leaf),
                blocking_calls=per(syncs), copies=copy_list)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    print(json.dumps(analyze(args.trace, args.steps, args.top), indent=1))


if __name__ == "__main__":
    main()
