"""Where a training step's time goes, from profiler traces side by side: `pixel bench --profile`'s
(libtorch's profiler) and a twin's (`--profile`, torch.profiler), the same steps marked "step".

    pixel bench experiments/X.toml --set runtime.backend=libtorch --profile pixel.json
    python3 bench/pytorch_reference.py ... --profile twin.json
    python3 bench/profile_summary.py pixel.json twin.json [--top 15]

Per step, for each trace: wall time; host operators (ATen operators called from outside any
other, the calls a framework makes) and all of them; on a GPU the kernels, their summed time, the
share of the wall time the GPU was busy, copies and the host's waits for the GPU (synchronising
CUDA runtime calls: each is a place where the host stops queueing work). Then the operators (on
the CPU) or kernels (on a GPU) that take the most time, each trace's time and count per step.
Exit code 1 where a trace has no "step" range (not a profile of training steps).
"""
import argparse
import json
import sys
from collections import defaultdict

# CUDA runtime calls in which the host waits for the GPU (a blocking copy to the host is
# cudaMemcpyAsync then cudaStreamSynchronize; plain cudaMemcpy waits itself).
WAITS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def load(path):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union_length(intervals):
    """The length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def outermost(ops):
    """The operators not inside another on the same thread."""
    by_thread = defaultdict(list)
    for e in ops:
        by_thread[(e["pid"], e["tid"])].append(e)
    result = []
    for events in by_thread.values():
        reach = float("-inf")
        for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            if e["ts"] >= reach:
                result.append(e)
                reach = e["ts"] + e["dur"]
    return result


def summarise(path):
    events = load(path)
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == "step"]
    if not steps:
        sys.exit(f"{path}: no \"step\" range: expected a trace of `pixel bench --profile` or a "
                 "twin's --profile")
    n = len(steps)
    ops = [e for e in events if e.get("cat") == "cpu_op" and e["name"].startswith("aten::")]
    top_ops = outermost(ops)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    waits = [e for e in runtime if e["name"] in WAITS]
    wall = sum(e["dur"] for e in steps)
    span = (min(e["ts"] for e in steps),
            max(max(e["ts"] + e["dur"] for e in steps),
                max((e["ts"] + e["dur"] for e in kernels + copies), default=0)))
    busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in kernels + copies])
    summary = {
        "steps": n,
        "wall ms": wall / n / 1e3,
        "host operators": len(top_ops) / n,
        "all operators": len(ops) / n,
    }
    if kernels:
        summary.update({
            "GPU kernels": len(kernels) / n,
            "kernel ms": sum(e["dur"] for e in kernels) / n / 1e3,
            "GPU busy": busy / (span[1] - span[0]),
            "copies": len(copies) / n,
            "copy ms": sum(e["dur"] for e in copies) / n / 1e3,
            "host waits": len(waits) / n,
            "wait ms": sum(e["dur"] for e in waits) / n / 1e3,
        })
    # Kernels on a GPU, else the host operators (inclusive time).
    by_name = defaultdict(lambda: [0.0, 0])
    for e in kernels or top_ops:
        by_name[e["name"]][0] += e["dur"] / n / 1e3
        by_name[e["name"]][1] += 1 / n
    return summary, dict(by_name), bool(kernels)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+", help="profile traces (JSON), shown in this order")
    p.add_argument("--top", type=int, default=15, help="operators or kernels listed")
    a = p.parse_args()
    results = [summarise(t) for t in a.traces]
    names = [t.rsplit("/", 1)[-1] for t in a.traces]
    width = max(12, *(len(n) for n in names))
    print(f"| per step | {' | '.join(n.rjust(width) for n in names)} |")
    print(f"|---|{'|'.join('-' * (width + 1) + ':' for _ in names)}|")
    keys = []
    for summary, _, _ in results:
        keys += [k for k in summary if k not in keys]
    for k in keys:
        cells = []
        for summary, _, _ in results:
            v = summary.get(k)
            cells.append("-" if v is None else
                         f"{v:.0%}" if k == "GPU busy" else
                         str(v) if isinstance(v, int) else
                         f"{v:.2f}" if "ms" in k else f"{v:.1f}")
        print(f"| {k} | {' | '.join(c.rjust(width) for c in cells)} |")
    gpu = any(g for _, _, g in results)
    what = "kernels" if gpu else "host operators (inclusive)"
    total = defaultdict(float)
    for _, by_name, _ in results:
        for name, (ms, _) in by_name.items():
            total[name] = max(total[name], ms)
    print(f"\nTop {a.top} {what}: ms and count per step")
    print(f"| name | {' | '.join(n.rjust(width) for n in names)} |")
    print(f"|---|{'|'.join('-' * (width + 1) + ':' for _ in names)}|")
    for name in sorted(total, key=total.get, reverse=True)[:a.top]:
        cells = []
        for _, by_name, _ in results:
            ms, count = by_name.get(name, (0.0, 0))
            cells.append(f"{ms:.3f} ({round(count, 1):g})" if count else "-")
        short = name if len(name) <= 70 else name[:67] + "..."
        print(f"| {short} | {' | '.join(c.rjust(width) for c in cells)} |")


if __name__ == "__main__":
    main()
