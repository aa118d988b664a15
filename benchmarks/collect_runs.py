"""Collect the run.json of several stage outputs into one JSON (metrics, data counts, lineage, versions).

    python benchmarks/collect_runs.py OUT.json name=outputs/dir [name=outputs/dir ...]
"""

import json
import os
import sys


def main(out, pairs):
    summary = {}
    for pair in pairs:
        name, path = pair.split("=", 1)
        run_path = os.path.join(path, "run.json")
        if not os.path.isfile(run_path):
            summary[name] = {"error": f"no run.json in {path}"}
            continue
        run = json.load(open(run_path))
        summary[name] = {k: run.get(k) for k in ("stage", "duration_s", "metrics", "data", "lineage", "versions", "seed")}
    with open(out, "w") as fh:
        json.dump(summary, fh, indent=2)
    for name, s in summary.items():
        m = s.get("metrics") or {}
        keys = [k for k in m if any(t in k for t in ("loss", "accurac", "margins"))]
        print(name, {k: round(m[k], 4) if isinstance(m[k], float) else m[k] for k in keys})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
