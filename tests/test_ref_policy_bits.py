"""benchmarks/ref_policy_bits.py on the CPU: the compiled tiny model's reference forward (adapters off, no grad)
gives the policy's bits at B = 0, from the training graph and from the inference graph alike."""

import json

from benchmarks import ref_policy_bits


def test_compiled_reference_gives_the_policy_s_bits_at_step_0(tmp_path):
    out = tmp_path / "bits.json"
    ref_policy_bits.main(["--shape", "tiny", "--layers", "2", "--tokens", "48", "--out", str(out)])
    pairs = json.loads(out.read_text())["pairs"]
    assert set(pairs) == {"policy_grad vs policy_nograd", "policy_nograd vs reference", "policy_grad vs reference",
                          "policy_grad vs policy_grad_again", "policy_grad vs reference_stand_in"}
    assert all(p["equal"] and p["max_abs_diff"] == 0.0 for p in pairs.values()), pairs
