"""Models exported by `pixel export`, in PyTorch: the twins of this folder built from the file's
metadata, with its weights loaded (strictly: every parameter, no other), and their likelihood.

    import sys; sys.path.insert(0, "bench")
    from pixel_twins import load
    model = load("results/X/model.safetensors")   # log_prob(images, labels): nats per factor

As a check of pixel against an independent implementation (CI runs it on every variant):

    pixel export results/X --test-images all
    python3 bench/pixel_twins.py results/X/model.safetensors --images results/X/test-images.npy \
        --labels results/X/test-labels.npy --log-probs results/X/test-log-probs.npy \
        --expect-bits "$(python3 -c 'import json; print(json.load(open("results/X/eval.json"))["test_bits_per_dim"])')"

computes the log-likelihood of each image's factors (each sub-pixel under the categorical, each
pixel under the logistic mixture) in float64, and fails (exit code 1) where they differ from
pixel's by more than --tolerance, or where the images' bits/dim differ from --expect-bits by more.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_pixelcnnpp import PixelCnnPp, logistic_log_prob  # noqa: E402
from pytorch_reference import Gated, Simple  # noqa: E402


class Twin(nn.Module):
    """A loaded network (`net`, whose parameter names are the file's) and its likelihood."""

    def __init__(self, net, config):
        super().__init__()
        self.net = net
        self.config = config
        likelihood = config["likelihood"]
        self.mixtures = likelihood.get("components", 0) if likelihood["kind"] == "logistic_mixture" else 0
        self.classes = config.get("classes")
        self.pixelcnnpp = config["variant"] == "pixelcnnpp"

    def forward(self, images, labels=None):
        """The likelihood's parameters at every pixel: logits `[b, colours, 256, h, w]` or the
        mixture's `[b, outputs, h, w]`. images: `[b, colours, h, w]` values 0..255 (any type)."""
        dtype = next(self.net.parameters()).dtype
        x = images.to(dtype)
        if self.classes and labels is None:
            raise ValueError("a class-conditional model needs the images' labels")
        labels = None if labels is None else labels.long()
        if self.pixelcnnpp:
            one_hot = None if not self.classes else F.one_hot(labels, self.classes).to(dtype)
            out = self.net(x, one_hot)
        else:
            out = self.net(x / 255, labels)
        if self.mixtures:
            return out
        b, c, h, w = images.shape
        return out.reshape(b, c, 256, h, w)

    def log_prob(self, images, labels=None):
        """Nats of each factor: `[b, colours, h, w]` (each sub-pixel given the earlier ones) under
        the categorical, `[b, 1, h, w]` (each pixel's colours jointly) under the mixture."""
        out = self.forward(images, labels)
        target = images.long()
        if self.mixtures:
            return logistic_log_prob(out, target.to(out.dtype), self.mixtures)[:, None]
        return F.log_softmax(out, dim=2).gather(2, target[:, :, None]).squeeze(2)


def build(config, dropout=0.0):
    """The twin of pixel's model config (the `pixel.model` metadata of an exported file)."""
    variant = config["variant"]
    likelihood = config["likelihood"]
    k = likelihood.get("components", 0) if likelihood["kind"] == "logistic_mixture" else 0
    c = config["colours"]
    outputs = (3 * k if c == 1 else 10 * k) if k else 256 * c
    if variant == "simple":
        return Simple(c, config["layers"], config["kernel"], config["channels"], outputs)
    if variant == "gated":
        if config["spatial_channels"]:
            raise ValueError("the gated twin has no spatial conditioning (a PixelVAE's decoder)")
        return Gated(c, config["layers"], config["kernel"], config["channels"], outputs,
                     config["classes"] or 0, config["residual"], config["gates"], config["link"])
    if variant == "pixelcnnpp":
        return PixelCnnPp(c, config["filters"], config["resnets"], k, config["classes"] or 0,
                          dropout)
    raise ValueError(f"no PyTorch twin of pixel's `{variant}` model in bench/")


def load(path, device="cpu", dtype=torch.float32):
    """The model of a file written by `pixel export`, in evaluation mode."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if "pixel.model" not in metadata:
        raise ValueError(f"{path}: no `pixel.model` metadata: not written by `pixel export`")
    config = json.loads(metadata["pixel.model"])
    net = build(config)
    net.load_state_dict(load_file(path), strict=True)
    twin = Twin(net, config).to(device=device, dtype=dtype).eval()
    twin.metadata = metadata
    return twin


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", help="a .safetensors file written by `pixel export`")
    p.add_argument("--images", required=True, help="uint8 [N, colours, h, w] .npy")
    p.add_argument("--labels", help="uint8 [N] .npy (class-conditional models)")
    p.add_argument("--log-probs", help="pixel's log-likelihood per factor (.npy) to compare with")
    p.add_argument("--expect-bits", type=float, help="pixel's bits/dim of these images")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load(a.weights, dtype=torch.float64)
    images = torch.from_numpy(np.load(a.images))
    labels = torch.from_numpy(np.load(a.labels)) if a.labels else None
    with torch.no_grad():
        parts = [model.log_prob(images[i:i + a.batch],
                                None if labels is None else labels[i:i + a.batch])
                 for i in range(0, len(images), a.batch)]
    ours = torch.cat(parts)
    bits = -ours.sum().item() / (images.numel() * math.log(2))
    report = {"weights": a.weights, "variant": model.config["variant"],
              "which": model.metadata.get("pixel.weights"), "images": len(images),
              "bits_per_dim": bits}
    failures = []
    if a.log_probs:
        theirs = torch.from_numpy(np.load(a.log_probs)).double()
        if theirs.shape != ours.shape:
            failures.append(f"pixel's log-probs are {tuple(theirs.shape)}, the twin's "
                            f"{tuple(ours.shape)}")
        else:
            diff = (theirs - ours).abs()
            worst = int(diff.argmax())
            report["max_log_prob_difference"] = diff.max().item()
            report["worst_at"] = [int(i) for i in np.unravel_index(worst, tuple(ours.shape))]
            if diff.max().item() > a.tolerance:
                failures.append(f"log-probs differ by up to {diff.max().item():.3g} nats "
                                f"(at {report['worst_at']}: pixel {theirs.flatten()[worst]:.6f}, "
                                f"twin {ours.flatten()[worst]:.6f})")
    if a.expect_bits is not None:
        report["bits_per_dim_difference"] = abs(bits - a.expect_bits)
        if abs(bits - a.expect_bits) > a.tolerance:
            failures.append(f"bits/dim {bits:.6f} where pixel has {a.expect_bits:.6f}")
    print(json.dumps(report))
    for f in failures:
        print(f"{a.weights}: {f}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
