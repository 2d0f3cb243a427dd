"""Reads a run's TensorBoard event files with TensorBoard's own loader and checks them against the
run's metrics.csv: every epoch's scalars once, at increasing steps, with the CSV's values; the
per-step scalars; the sample grids as images; the resolved experiment as text.

usage: python3 .ci/tensorboard_check.py RESULTS_DIR/RUN [RUN ...]
"""
import csv
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def check(run):
    acc = EventAccumulator(f"{run}/tensorboard", size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    with open(f"{run}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for needed in ["train/batch_bits_per_dim", "train/learning_rate", "train/gradient_norm",
                   "epoch/train_bits_per_dim"]:
        assert needed in tags["scalars"], (run, needed, tags["scalars"])
    for column in ["test_bits_per_dim", "train_bits_per_dim", "validation_bits_per_dim",
                   "test_kl_bits_per_dim"]:
        expected = [float(r[column]) for r in rows if r[column] != ""]
        tag = f"epoch/{column}"
        if not expected:
            assert tag not in tags["scalars"], (run, tag)
            continue
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)), (run, tag, steps)
        values = [e.value for e in events]
        assert len(values) == len(expected), (run, tag, values, expected)
        for got, want in zip(values, expected):
            assert math.isclose(got, want, rel_tol=1e-6), (run, tag, got, want)
    batch_steps = [e.step for e in acc.Scalars("train/batch_bits_per_dim")]
    assert batch_steps == sorted(set(batch_steps)), (run, "duplicate or unordered steps")
    assert batch_steps[0] == 1, (run, batch_steps[:3])
    assert "samples/grid" in tags["images"], (run, tags["images"])
    assert "experiment" in tags["tensors"], (run, tags["tensors"])
    text = acc.Tensors("experiment")[0].tensor_proto.string_val[0].decode()
    assert "[model]" in text, text
    print(f"ok    {run}: {len(rows)} epochs, {len(batch_steps)} steps, tags {sorted(tags['scalars'])}")


for run in sys.argv[1:]:
    check(run)
