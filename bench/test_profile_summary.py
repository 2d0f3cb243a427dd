"""Checks bench/profile_summary.py on a made-up GPU trace (CI has no GPU to make a real one):
kernels, copies and waits per step, the GPU's busy share as the union of its intervals, and host
operators counted once however deeply they nest.

    python3 bench/test_profile_summary.py
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_summary  # noqa: E402


def event(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}


events = [
    event("user_annotation", "step", 0, 1000),
    event("user_annotation", "step", 1000, 1000),
    event("cpu_op", "aten::conv2d", 10, 100),
    event("cpu_op", "aten::convolution", 20, 50),  # inside conv2d: not a host operator of its own
    event("cpu_op", "aten::add", 1010, 5),
    event("kernel", "implicit_gemm", 100, 300, tid=7),
    event("kernel", "implicit_gemm", 300, 300, tid=7),  # overlaps the first: busy 100..600
    event("kernel", "elementwise", 1200, 100, tid=7),
    event("gpu_memcpy", "Memcpy HtoD", 1100, 50, tid=7),
    event("cuda_runtime", "cudaMemcpyAsync", 890, 5),  # queues a copy: no wait
    event("cuda_runtime", "cudaStreamSynchronize", 900, 80),
]
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "trace.json")
    with open(path, "w") as f:
        json.dump({"traceEvents": events}, f)
    summary, by_name, gpu = profile_summary.summarise(path)

assert gpu
assert summary["steps"] == 2, summary
assert summary["host operators"] == 1.0, summary  # conv2d and add, over 2 steps
assert summary["all operators"] == 1.5, summary
assert summary["GPU kernels"] == 1.5, summary
assert abs(summary["kernel ms"] - 0.35) < 1e-9, summary
assert abs(summary["GPU busy"] - 650 / 2000) < 1e-9, summary  # 500 + 100 + 50 of 2000 us
assert summary["copies"] == 0.5 and summary["host waits"] == 0.5, summary
assert abs(by_name["implicit_gemm"][0] - 0.3) < 1e-9 and by_name["implicit_gemm"][1] == 1.0
print("profile_summary: ok")
