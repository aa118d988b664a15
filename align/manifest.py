"""run.json: what a run was (resolved config, versions, seed, data counts, lineage) and what it measured.

Written next to every adapter so a result can be traced to the recipe, the code and the data that made it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from typing import Any

PACKAGES = (
    "align", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "deepspeed",
    "evaluate", "gguf", "liger-kernel",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # torch missing or no driver: versions are still useful
        pass
    return out


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to `path` so that a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def read_run(output_dir: str) -> dict | None:
    """The run.json of an earlier stage's output directory, or None."""
    return read_json(os.path.join(output_dir, "run.json"))


def base_model_lineage(model_args) -> dict[str, Any]:
    """Which base weights a run used: name or path, revision, GGUF file, quantization."""
    path = model_args.model_name_or_path
    local = bool(path) and os.path.isdir(path)
    lineage: dict[str, Any] = {
        "base_model": os.path.abspath(path) if local else path,
        "revision": model_args.model_revision,
        "gguf_file": getattr(model_args, "gguf_file", None),
        "dtype": model_args.dtype,
        "quantization": {
            "load_in_4bit": bool(model_args.load_in_4bit),
            "load_in_8bit": bool(model_args.load_in_8bit),
            "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type if model_args.load_in_4bit else None,
            "double_quant": bool(model_args.use_bnb_nested_quant) if model_args.load_in_4bit else None,
            "compute_dtype": getattr(model_args, "bnb_4bit_compute_dtype", None),
        },
    }
    if local:  # a local directory has no revision: fingerprint its config instead
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            with open(cfg, "rb") as fh:
                lineage["config_sha256"] = hashlib.sha256(fh.read()).hexdigest()
    return lineage


def write_run(
    output_dir: str,
    *,
    stage: str,
    config: dict,
    seed: int,
    data: dict | None,
    metrics: dict,
    lineage: dict,
    started: float,
    extra: dict | None = None,
) -> str:
    """Write `output_dir/run.json`; returns its path."""
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.time() - started, 2),
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "seed": seed,
        "versions": package_versions(),
        "lineage": lineage,
        "data": data,
        "metrics": metrics,
        "config": config,
    }
    if extra:
        manifest.update(extra)
    path = os.path.join(output_dir, "run.json")
    write_json_atomic(path, manifest)
    return path
