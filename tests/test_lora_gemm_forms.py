"""benchmarks/lora_gemm_forms.py: ways to compute a LoRA layer's GEMMs give the same outputs and gradients."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_lora_gemm_forms_agree_and_a_cpu_run_writes_every_form():
    """The folded form (`[x | h] @ [W | B].T`, input gradient and `g @ B` from one GEMM) gives fused LoRA's op's
    output and x / A / B gradients in float64, and the base form plus the LoRA product is the same output."""
    import lora_gemm_forms as lgf

    assert lgf.check_forms(torch) < 1e-12
    t = lgf.make(torch, 16, 12, 10, 4, "cpu", torch.float64, seed=2)
    out, gx, ga, gb = lgf.run(torch, "kcat", t)
    x, g, w, a, b = t["x"], t["g"], t["w"], t["a"], t["b"]
    torch.testing.assert_close(out, x @ w.t() + (x @ a.t()) @ b.t())
    torch.testing.assert_close(gx, g @ w + (g @ b) @ a)
    torch.testing.assert_close(ga, (g @ b).t() @ x)
    torch.testing.assert_close(gb, g.t() @ (x @ a.t()))


def test_lora_gemm_forms_cpu_run_writes_each_form_per_layer(tmp_path):
    import lora_gemm_forms as lgf

    assert lgf.main(["--shapes", "tiny", "--reps", "1", "--out", str(tmp_path)]) == 0
    (tiny,) = json.loads((tmp_path / "lora_gemm_forms_cpu.json").read_text())["shapes"]
    assert [r["name"] for r in tiny["layers"]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]
    assert set(tiny["ms_per_step"]) == set(lgf.FORMS) and set(tiny["excess_over_base_ms"]) == {"op_ab", "kcat"}
    assert set(tiny["groups"]) == {"qkv", "gate_up"}
    assert all(set(g["ms"]) == {"separate", "grouped"} and g["ms"]["grouped"] > 0 for g in tiny["groups"].values())


def test_grouped_layers_give_each_layer_s_outputs_and_gradients():
    """q / k / v as one op over concatenated weights (B block-diagonal): each layer's output side by side, the sum
    of their input gradients, their A gradients stacked and B's as the diagonal blocks of one product."""
    import lora_gemm_forms as lgf

    group = lgf.make_group(torch, 16, 12, [10, 4, 4], 3, "cpu", torch.float64, seed=5)
    out, gx, ga, gb = lgf.run_group(torch, "grouped", group)
    x = group["cat"]["x"]
    want_gx = 0
    for n, t in enumerate(group["layers"]):
        g, w, a, b = t["g"], t["w"], t["a"], t["b"]
        cols = slice(sum(u["b"].shape[0] for u in group["layers"][:n]), None)
        torch.testing.assert_close(out[:, cols][:, :w.shape[0]], x @ w.t() + (x @ a.t()) @ b.t())
        torch.testing.assert_close(ga[3 * n:3 * n + 3], (g @ b).t() @ x)
        torch.testing.assert_close(gb[cols][:w.shape[0]], g.t() @ (x @ a.t()))
        want_gx = want_gx + g @ w + (g @ b) @ a
    torch.testing.assert_close(gx, want_gx)
