"""The twins' --profile: a few more training steps under torch.profiler, each marked "step", saved
as a Chrome trace; what `pixel bench --profile` records with libtorch's profiler, so that
`bench/profile_summary.py` can put the two side by side."""
import os

import torch

# Training steps recorded, after the timed ones (as pixel bench's PROFILED_STEPS).
STEPS = 3


def profile(step, path, device):
    """Runs step(i) for i in 0..STEPS under the profiler (host operators; kernels and copies on
    CUDA) and writes the trace to `path` (through a temporary file beside it)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for i in range(STEPS):
            with torch.profiler.record_function("step"):
                step(i)
        if device == "cuda":
            torch.cuda.synchronize()
    partial = path + ".partial"
    prof.export_chrome_trace(partial)
    os.replace(partial, path)
