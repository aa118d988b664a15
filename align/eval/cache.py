"""JSON cache of evaluation results, one file per key (model fingerprint, task fingerprint, limit, backend).

    cache = ResultCache(".cache/eval")
    hit = cache.get(key)          # None when absent or unreadable
    cache.put(key, metrics)

A result is reused only when the model's files, the task's definition and data file, the row limit and the
scoring backend are all the same; any change gives a new key. `ResultCache(None)` caches nothing.
"""

from __future__ import annotations

import hashlib
import json
import os

from align.manifest import write_json_atomic
from align.paths import cache_dir


def default_cache_dir() -> str:
    return os.path.join(cache_dir(), "eval")


class ResultCache:
    def __init__(self, root: str | None):
        self.root = root

    def path(self, key: dict) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        label = "-".join(str(key.get(k)) for k in ("model", "task") if key.get(k))
        return os.path.join(self.root, f"{label}-{digest}.json" if label else f"{digest}.json")

    def get(self, key: dict) -> dict | None:
        if self.root is None:
            return None
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as fh:
                entry = json.load(fh)
        except (OSError, json.JSONDecodeError):
            return None
        return entry.get("value") if entry.get("key") == key else None

    def put(self, key: dict, value: dict) -> None:
        if self.root is not None:
            write_json_atomic(self.path(key), {"key": key, "value": value})
