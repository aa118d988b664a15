"""benchmarks/dpo_step_bits.py on the CPU: a DPO step's reference and policy forwards recorded layer by layer (the
first loss is log 2 and the two forwards are the same bits), and the comparison names the first layer apart."""

import json
import math

import torch

from benchmarks import dpo_step_bits


def test_first_dpo_step_records_equal_reference_and_policy_forwards(tmp_path):
    out = tmp_path / "bits.json"
    dpo_step_bits.main(["--shape", "tiny", "--align_options", "shared_prompt,ref_first", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["passes"] == 4  # reference, policy, reference, policy
    assert result["names"][:3] == ["embed", "ids", "layer0"] and result["names"][-2:] == ["norm", "log_probs"]
    assert all(math.isclose(x, math.log(2), abs_tol=1e-6) for x in result["losses"]), result["losses"]
    for pair in ("reference vs policy", "reference vs reference again", "policy vs policy again"):
        assert result[pair]["equal"] and result[pair]["first_layer_differing"] is None, result[pair]


def test_diff_names_the_first_layer_whose_output_differs():
    a = {"embed": torch.zeros(3), "layer0": torch.zeros(3), "layer1": torch.zeros(3), "log_probs": torch.zeros(2)}
    b = dict(a, layer1=torch.tensor([0.0, 0.5, 0.0]), log_probs=torch.zeros(4))
    d = dpo_step_bits.diff(a, b)
    assert not d["equal"] and d["first_layer_differing"] == "layer1"
    assert d["max_abs_diff"]["layer1"] == 0.5 and d["max_abs_diff"]["layer0"] == 0.0
    assert d["shapes_differ"] == ["log_probs"]


def test_throughput_step_bits_light_compares_only_the_ids_and_log_probs(tmp_path):
    from benchmarks import throughput

    throughput.main(["--runs", "tiny:dpo_lora", "--paths", "align", "--align_options", "shared_prompt,ref_first",
                     "--steps", "1", "--warmup", "1", "--step_bits", "light", "--out", str(tmp_path)])
    (run,) = json.loads((tmp_path / "throughput_cpu.json").read_text())["runs"]
    assert math.isclose(run["losses"][0], math.log(2), abs_tol=1e-6)
    assert run["step_bits"]["equal"] and set(run["step_bits"]["max_abs_diff"]) == {"ids", "log_probs"}


def test_dpo_reads_no_unwritten_memory(tmp_path):
    """`--fill_uninitialized`: every new tensor starts as NaN, so a read of memory no kernel wrote would make the
    losses NaN; the packed DPO path's stay finite and start at log 2."""
    from benchmarks import throughput

    throughput.main(["--runs", "tiny:dpo_lora", "--paths", "align", "--align_options", "shared_prompt,ref_first",
                     "--steps", "2", "--warmup", "1", "--fill_uninitialized", "--cpu_varlen", "--out", str(tmp_path)])
    (run,) = json.loads((tmp_path / "throughput_cpu.json").read_text())["runs"]
    assert "error" not in run, run.get("error")
    assert math.isclose(run["losses"][0], math.log(2), abs_tol=1e-6)
    assert all(math.isfinite(x) for x in run["losses"]), run["losses"]
