"""benchmarks/gemm_ceiling.py: the base GEMMs of a LoRA step, the floor under it."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_gemm_ceiling_counts_every_base_gemm_of_a_lora_step_once_forward_once_backward(tmp_path):
    """benchmarks/gemm_ceiling.py: a step's base GEMMs carry 4 x (linear parameters) FLOPs a token (the forward and
    the input gradient of every decoder linear layer and the LM head; no weight gradient for a frozen base), i.e.
    issue 6's count without the embedding lookup, norms and attention; and a CPU run writes its JSON."""
    import json

    from gemm_ceiling import main, step_gemms
    from throughput import LLAMA_8B

    tokens = 4096
    gemms = step_gemms(LLAMA_8B, tokens)
    d, f, kv, layers, v = 4096, 14336, 1024, 32, 128256
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * v
    assert sum(2 * g["m"] * g["k"] * g["n"] * g["count"] for g in gemms) == 4 * linear * tokens
    assert {(g["name"], g["m"], g["k"], g["n"]) for g in gemms} >= {
        ("k_proj forward", tokens, d, kv), ("k_proj input gradient", tokens, kv, d),
        ("down_proj input gradient", tokens, d, f), ("lm_head input gradient", tokens, v, d)}
    assert main(["--shapes", "tiny", "--reps", "1", "--square", "64", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "gemm_ceiling_cpu.json").read_text())
    (tiny,) = out["shapes"]
    assert tiny["shape"] == "tiny" and len(tiny["gemms"]) == 16 and tiny["gemm_floor_ms"] > 0
    assert tiny["gemm_only_tokens_per_s"] == tiny["tokens_per_step"] / (tiny["gemm_floor_ms"] / 1000)
