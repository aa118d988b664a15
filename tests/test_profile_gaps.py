"""benchmarks/profile_gaps.py: GPU-idle gaps charged to the frames that issued the late launches."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from profile_gaps import analyze  # noqa: E402


def _x(cat, name, ts, dur, tid=1, **args):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, tid=tid, args=args)


def test_a_late_launch_charges_its_gap_to_every_frame_of_its_stack_and_an_early_one_to_none():
    trace = {"traceEvents": [
        _x("python_function", "align/speed.py(10): outer", 0, 100),
        _x("python_function", "align/speed.py(20): inner", 10, 40),
        _x("cuda_runtime", "cudaLaunchKernel", 1, 1, correlation=1),
        _x("kernel", "k1", 2, 3, tid=7, correlation=1),                     # busy until 5
        _x("cuda_runtime", "cudaLaunchKernel", 25, 1, correlation=2),       # inside inner, after the GPU went idle
        _x("kernel", "k2", 30, 10, tid=7, correlation=2),                   # gap 5 -> 30: 25 us, CPU-bound
        _x("cuda_runtime", "cudaLaunchKernel", 26, 1, correlation=3),       # launched while k2 was queued
        _x("kernel", "k3", 50, 5, tid=7, correlation=3),                    # gap 40 -> 50: not the CPU's fault
        _x("cuda_runtime", "cudaStreamSynchronize", 60, 30),                 # blocking call inside outer
    ]}
    g = analyze(trace, steps=1, min_gap_us=2.0)
    assert abs(g["idle_ms_per_step"] - 0.035) < 1e-9
    assert abs(g["cpu_bound_idle_ms_per_step"] - 0.025) < 1e-9
    frames = {x["frame"]: x["ms_per_step"] for x in g["by_frame"]}
    assert frames["align/speed.py(10): outer"] == frames["align/speed.py(20): inner"] == 0.025
    assert g["by_leaf"][0] == dict(ms_per_step=0.025, frame="align/speed.py(20): inner")
    assert g["blocking_calls"] == [dict(ms_per_step=0.03, frame="align/speed.py(10): outer -> cudaStreamSynchronize")]


def test_device_copies_and_fills_are_charged_to_the_frame_and_op_that_issued_them():
    trace = {"traceEvents": [
        _x("python_function", "align/fused_lora.py(36): backward", 0, 100),
        _x("cpu_op", "aten::copy_", 5, 20),
        _x("cuda_runtime", "cudaMemcpyAsync", 6, 1, correlation=1),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 10, 4, tid=7, correlation=1),
        _x("cuda_runtime", "cudaMemcpyAsync", 8, 1, correlation=2),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 20, 6, tid=7, correlation=2),
        _x("cpu_op", "aten::zero_", 40, 10),
        _x("cuda_runtime", "cudaMemsetAsync", 41, 1, correlation=3),
        _x("gpu_memset", "Memset (Device)", 45, 2, tid=7, correlation=3),
        _x("kernel", "k", 50, 50, tid=7, correlation=4),                   # a kernel: not a copy
    ]}
    g = analyze(trace, steps=2)
    assert g["copies"] == [
        dict(ms_per_step=0.005, calls_per_step=1.0,
             frame="Memcpy DtoD (Device -> Device): align/fused_lora.py(36): backward -> aten::copy_"),
        dict(ms_per_step=0.001, calls_per_step=0.5,
             frame="Memset (Device): align/fused_lora.py(36): backward -> aten::zero_")]


def test_short_gaps_between_back_to_back_kernels_and_the_kernel_count_are_reported_apart_from_idle():
    trace = {"traceEvents": [
        _x("kernel", "k1", 0, 10, tid=7, correlation=1),
        _x("kernel", "k2", 11, 9, tid=7, correlation=2),      # 1 us after k1: a short gap
        _x("kernel", "k3", 21.5, 8.5, tid=7, correlation=3),  # 1.5 us after k2: short
        _x("gpu_memset", "Memset (Device)", 40, 10, tid=7, correlation=4),  # 10 us after k3: idle
    ]}
    g = analyze(trace, steps=2, min_gap_us=2.0)
    assert abs(g["short_gaps_ms_per_step"] - 0.00125) < 1e-9
    assert abs(g["idle_ms_per_step"] - 0.005) < 1e-9
    assert g["kernels_per_step"] == 2.0 and abs(g["gpu_span_ms_per_step"] - 0.025) < 1e-9

