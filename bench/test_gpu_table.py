"""Checks bench/gpu_table.py on a made-up bench/gpu.sh output (CI has no GPU to make a real one):
each round's numbers in their row, the ratio as the twin's time over pixel's, a graph row beside
the eager row's twin or the compiled one, and rows that failed or timed out.

    python3 bench/test_gpu_table.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_table  # noqa: E402

PHASES = "step phases (median ms): forward 4.0, loss 0.5, backward 8.0, update 1.5"
GRAPH = "CUDA graph: 1 step(s) captured, 13 replayed, 4 eager (warm-up included; a replayed step has no phases)"


def pixel(seconds, extra=""):
    return (f"pixel: | quickstart | libtorch:cuda | f32 | 64 | {seconds} | 5000.0 | 2.0 | - | - | 600 GPU | "
            f"{PHASES} {extra}")


def gated_twin(seconds, compiled=""):
    return (f"twin:  | pytorch 2.11.0+cu130 cuda f32{compiled} | gated 5x5 c30 | 64 | {seconds} s/step | "
            f"7000.0 images/s | 1.0 ms forward | 480 MiB GPU peak | {PHASES}")


text = "\n".join([
    "=== machine (00:00:00, 540 s left)",
    "=== round 1 of 2: gated 5x5 c30, 28x28 grey (00:00:01, 539 s left)",
    "--- gated b64 f32 ",
    pixel("0.0100"),
    gated_twin("0.0130"),
    "--- gated b64 f32 graph",
    pixel("0.0040", GRAPH),
    gated_twin("0.0050", " compiled"),
    "--- gated b64 f16 graph",
    pixel("0.0050", GRAPH),
    "twin:  (none in f16: the eager rows of this batch are the comparison)",
    "=== round 1 of 2: PixelCNN++ CIFAR-10 settings (53.6M parameters), 32x32 RGB, EMA 0.9995",
    "--- pixelcnn++ b16 dropout 0.5 f32 ",
    "pixel:  TIMED OUT after 150 s: stopping after the current step",
    f"twin:  | pytorch pixelcnn++ cuda f32 | 16 | 0.100 | 160.0 | 30.0 | 5500 GPU | {PHASES}",
    "=== round 2 of 2: gated 5x5 c30, 28x28 grey",
    "--- gated b64 f32 ",
    pixel("0.0110"),
    gated_twin("0.0121"),
    "--- gated b64 f32 graph",
    pixel("0.0044", GRAPH),
    "twin:  (compiled: round 1)",
    "=== profiles: gated b64 f32 and PixelCNN++ b16 dropout 0.5 f32, phases synchronised",
    pixel("0.0200"),
    gated_twin("0.0300"),
])

rows = {line.split(" | ")[0].strip("| "): line for line in gpu_table.table(gpu_table.parse(text)).splitlines()}
assert rows["gated b64 f32"] == (
    "| gated b64 f32 | 0.0100 ; 0.0110 | 0.0130 ; 0.0121 | 1.30 ; 1.10 | 4.0/0.5/8.0/1.5 ; 4.0/0.5/8.0/1.5 "
    "| 600 GPU / 480 GPU ; 600 GPU / 480 GPU | - ; - |"), rows["gated b64 f32"]
graph = rows["gated b64 f32 graph"]
# Round 1 beside the compiled twin, round 2 beside the eager row's twin of the same round.
assert "| 0.0050 (compiled) ; 0.0121 (eager twin) | 1.25 ; 2.75 |" in graph, graph
assert graph.endswith("| 1/13/4 ; 1/13/4 |"), graph
assert "| 0.0050 | - | - |" in rows["gated b64 f16 graph"], rows["gated b64 f16 graph"]
pp = rows["pixelcnn++ b16 dropout 0.5 f32"]
assert pp.startswith("| pixelcnn++ b16 dropout 0.5 f32 | TIMED OUT | 0.1000 | - |"), pp
# The profiles' lines after the rounds belong to no row.
assert "0.0200" not in "\n".join(rows.values())
assert len(rows) == 2 + 4, rows.keys()
print("gpu_table: ok")
