"""The PyTorch twin of pixel's PixelCNN++ (src/model/pixelcnnpp/), for `pixel bench` comparisons.

The same layout as openai/pixel-cnn and as pixel's network, layer for layer (no weight norm, PyTorch's
default initialisation, both as in pixel): two streams of down-shifted and down-right-shifted
convolutions, gated resnets with concat_elu and dropout, three resolutions, the discretized logistic
mixture loss. Times training steps (Adam, PixelCNN++'s betas) and forward passes on random images:

    python3 bench/pytorch_pixelcnnpp.py --colours 1 --size 28 --filters 32 --resnets 2 --batch 16
    python3 bench/pytorch_pixelcnnpp.py --params --colours 3 --filters 160 --resnets 5 --mixtures 10

`--params` prints the parameter count only (pixel's `PixelCnnPpConfig::parameters` gives the same:
53618660 for the second line).
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import profiling


def concat_elu(x):
    return F.elu(torch.cat([x, -x], dim=1))


def down_shift(x):
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x):
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class ShiftedConv(nn.Conv2d):
    """`down`: the kernel's last row on the pixel's row, columns centred; else down-right."""

    def __init__(self, n_in, n_out, kernel, down=True, stride=1):
        super().__init__(n_in, n_out, kernel, stride=stride)
        kh, kw = kernel
        self.pad = (kw // 2, kw // 2, kh - 1, 0) if down else (kw - 1, 0, kh - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class ShiftedDeconv(nn.ConvTranspose2d):
    def __init__(self, filters, kernel, down=True):
        super().__init__(filters, filters, kernel, stride=2)
        self.left = (kernel[1] - 1) // 2 if down else 0

    def forward(self, x, size):
        h, w = size
        return super().forward(x)[:, :, :h, self.left:self.left + w]


class Nin(nn.Linear):
    """A 1x1 convolution as a matrix over the channels: weight `[out, in]`, as pixel keeps it."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class GatedResnet(nn.Module):
    def __init__(self, filters, aux, down, classes, dropout):
        super().__init__()
        kernel = (2, 3) if down else (2, 2)
        self.conv1 = ShiftedConv(2 * filters, filters, kernel, down)
        self.aux = Nin(2 * aux, filters) if aux else None
        self.conv2 = ShiftedConv(2 * filters, 2 * filters, kernel, down)
        self.dropout = nn.Dropout(dropout)
        # pixel's name for the label's weights, `[classes, 2 filters]` ("class" is Python's word).
        self.register_parameter(
            "class", nn.Parameter(torch.empty(classes, 2 * filters).uniform_(-0.05, 0.05))
            if classes else None)

    def forward(self, x, aux=None, label=None):
        c1 = self.conv1(concat_elu(x))
        if aux is not None:
            c1 = c1 + self.aux(concat_elu(aux))
        c2 = self.conv2(self.dropout(concat_elu(c1)))
        if label is not None:
            c2 = c2 + (label @ getattr(self, "class"))[:, :, None, None]
        a, b = c2.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class InPixel(nn.Module):
    """The categorical head of an RGB network: `out(elu(features + colours(pixel)))`, causal per
    sub-pixel (green sees red, blue sees red and green), as pixel's."""

    def __init__(self, colours, width):
        super().__init__()
        from pytorch_reference import MaskedConv, groups
        g = lambda n: groups(n, colours)  # noqa: E731
        self.colours = MaskedConv("A", "point", 1, g(colours), g(colours * width))
        self.out = MaskedConv("B", "point", 1, g(colours * width), g(256 * colours))

    def forward(self, features, pixel):
        return self.out(F.elu(features + self.colours(pixel)))


class PixelCnnPp(nn.Module):
    """Parameter names as pixel's (`pixel export` writes them so). `mixtures=0`: 256 logits per
    colour (pixel's `likelihood = "categorical"`) instead of the logistic mixture."""

    def __init__(self, colours, filters, resnets, mixtures, classes=0, dropout=0.5):
        super().__init__()
        f, r, n_in = filters, resnets, colours + 1
        self.r = r
        self.u_first = ShiftedConv(n_in, f, (2, 3))
        self.ul_first_above = ShiftedConv(n_in, f, (1, 3))
        self.ul_first_left = ShiftedConv(n_in, f, (2, 1), down=False)
        block = lambda down, aux: GatedResnet(f, aux, down, classes, dropout)  # noqa: E731
        self.up_u = nn.ModuleList([block(True, 0) for _ in range(3 * r)])
        self.up_ul = nn.ModuleList([block(False, f) for _ in range(3 * r)])
        self.halve_u = nn.ModuleList([ShiftedConv(f, f, (2, 3), True, 2) for _ in range(2)])
        self.halve_ul = nn.ModuleList([ShiftedConv(f, f, (2, 2), False, 2) for _ in range(2)])
        self.down_u = nn.ModuleList([block(True, f) for _ in range(3 * r + 2)])
        self.down_ul = nn.ModuleList([block(False, 2 * f) for _ in range(3 * r + 2)])
        self.double_u = nn.ModuleList([ShiftedDeconv(f, (2, 3)) for _ in range(2)])
        self.double_ul = nn.ModuleList([ShiftedDeconv(f, (2, 2), False) for _ in range(2)])
        if mixtures:
            self.out = Nin(f, mixtures * (3 if colours == 1 else 10))
            self.in_pixel = None
        elif colours == 1:
            self.out = Nin(f, 256)
            self.in_pixel = None
        else:
            self.out = Nin(f, colours * f)
            self.in_pixel = InPixel(colours, f)

    def forward(self, x, label=None):
        """x: `[b, colours, h, w]`, values 0..255; label: one-hot `[b, classes]`."""
        b, _, h, w = x.shape
        pixel = (x - 127.5) / 127.5
        x = torch.cat([pixel, torch.ones(b, 1, h, w, device=x.device, dtype=x.dtype)], dim=1)
        us = [down_shift(self.u_first(x))]
        uls = [down_shift(self.ul_first_above(x)) + right_shift(self.ul_first_left(x))]
        for stage in range(3):
            for i in range(stage * self.r, (stage + 1) * self.r):
                us.append(self.up_u[i](us[-1], None, label))
                uls.append(self.up_ul[i](uls[-1], us[-1], label))
            if stage < 2:
                us.append(self.halve_u[stage](us[-1]))
                uls.append(self.halve_ul[stage](uls[-1]))
        u, ul = us.pop(), uls.pop()
        block = 0
        for stage in range(3):
            for _ in range(self.r + (stage > 0)):
                u = self.down_u[block](u, us.pop(), label)
                ul = self.down_ul[block](ul, torch.cat([u, uls.pop()], 1), label)
                block += 1
            if stage < 2:
                size = us[-1].shape[2:]
                u, ul = self.double_u[stage](u, size), self.double_ul[stage](ul, size)
        out = self.out(F.elu(ul))
        return out if self.in_pixel is None else self.in_pixel(out, pixel)


def logistic_log_prob(params, x, k):
    """Log-likelihood in nats of each pixel (its colours jointly) of 0..255 images `x`
    `[b, c, h, w]` under the mixture `params`: openai's formula, `[b, h, w]`."""
    b, c, h, w = x.shape
    y = (x - 127.5) / 127.5
    logits = params[:, :k]
    rest = params[:, k:].reshape(b, c, -1, k, h, w)
    mean, log_s = rest[:, :, 0], rest[:, :, 1].clamp(min=-7.0)
    if c == 3:
        coef = torch.tanh(rest[:, :, 2])
        yk = y[:, :, None]
        mean = torch.stack([
            mean[:, 0],
            mean[:, 1] + coef[:, 0] * yk[:, 0],
            mean[:, 2] + coef[:, 1] * yk[:, 0] + coef[:, 2] * yk[:, 1],
        ], dim=1)
    d = y[:, :, None] - mean
    inv_s = torch.exp(-log_s)
    plus, minus = inv_s * (d + 1 / 255), inv_s * (d - 1 / 255)
    mid = inv_s * d
    # right of the mean, the difference of the small sigmoids (as pixel: f32 keeps its digits)
    cdf_delta = torch.where(mid > 0, torch.sigmoid(-minus) - torch.sigmoid(-plus),
                            torch.sigmoid(plus) - torch.sigmoid(minus))
    log_pdf_mid = mid - log_s - 2 * F.softplus(mid)
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                        log_pdf_mid - math.log(127.5))
    yy = y[:, :, None].expand_as(d)
    log_p = torch.where(yy < -0.999, plus - F.softplus(plus),
                        torch.where(yy > 0.999, -F.softplus(minus), inner))
    total = log_p.sum(dim=1) + F.log_softmax(logits, dim=1)
    return torch.logsumexp(total, dim=1)


def logistic_nll(params, x, k):
    """Summed negative log-likelihood in nats of 0..255 images `x` [b, c, h, w]."""
    return -logistic_log_prob(params, x, k).sum()


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--colours", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--resnets", type=int, default=2)
    p.add_argument("--mixtures", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the first GPU; cuDNN and cuBLAS at ATen's defaults (cuDNN may use "
                        "TF32 for convolutions, matmuls stay FP32), as in pixel's libtorch")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                   help="bf16: the forward pass under autocast, f32 weights and Adam")
    p.add_argument("--ema", type=float, default=0.0,
                   help="Polyak averaging of the weights with this decay after every step, as "
                        "pixel's train.ema (0: off)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True, as pixel's runtime.cudnn_benchmark")
    p.add_argument("--sync", action="store_true",
                   help="wait for the GPU at each phase boundary, so that the phases are the GPU's")
    p.add_argument("--profile", metavar="TRACE.json",
                   help="after the timed steps, record %d more with torch.profiler and write its "
                        "Chrome trace here (as pixel bench --profile)" % profiling.STEPS)
    p.add_argument("--params", action="store_true", help="print the parameter count and stop")
    a = p.parse_args()
    torch.manual_seed(1)
    torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    dev = torch.device(a.device)
    net = PixelCnnPp(a.colours, a.filters, a.resnets, a.mixtures, dropout=a.dropout).to(dev)
    params = sum(t.numel() for t in net.parameters())
    if a.params:
        print(params)
        return
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.95, 0.9995))
    ema = [t.detach().clone() for t in net.parameters()] if a.ema > 0 else None
    sync = (lambda: torch.cuda.synchronize()) if (a.sync and a.device == "cuda") else (lambda: None)
    # The same work as pixel's step: a fresh batch of bytes uploaded from the host every step,
    # the loss and the gradients' global norm read on the host, the update, the average.
    batches = [torch.randint(0, 256, (a.batch, a.colours, a.size, a.size), dtype=torch.uint8)
               for _ in range(4)]
    dims = batches[0].numel()
    times = []
    # The phases `pixel bench` reports: forward (with the upload), loss (its value on the host
    # too), backward, update (norm, optimizer step, clearing the gradients, average).
    phases = {k: [] for k in ("forward", "loss", "backward", "update")}
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i):
        """One training step; returns its loss and the times at its phase boundaries."""
        sync()
        start = time.perf_counter()
        x = batches[i % len(batches)].to(dev).float()
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            out = net(x)
        sync()
        t_forward = time.perf_counter()
        loss = logistic_nll(out.float(), x, a.mixtures) / dims
        loss.item()
        t_loss = time.perf_counter()
        loss.backward()
        sync()
        t_backward = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
        norm.item()
        opt.step()
        opt.zero_grad()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, list(net.parameters()), 1 - a.ema)
        sync()
        return loss, [start, t_forward, t_loss, t_backward, time.perf_counter()]

    for i in range(a.steps + 2):
        loss, marks = step(i)
        if i >= 2:
            times.append(marks[-1] - marks[0])
            for k, t0, t1 in zip(phases, marks, marks[1:]):
                phases[k].append((t1 - t0) * 1e3)
    net.eval()
    forward = []
    x = batches[0].to(dev).float()
    with torch.no_grad():
        for i in range(a.steps + 2):
            start = time.perf_counter()
            with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                net(x)
            if a.device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                forward.append((time.perf_counter() - start) * 1e3)
    s = statistics.median(times)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None
    if a.profile:  # last, so that the profiler is in no measure above
        net.train()
        profiling.profile(step, a.profile, a.device)
    report = {"parameters": params, "seconds_per_step": s, "train_images_per_second": a.batch / s,
              "forward_ms": statistics.median(forward), "peak_rss_mib": peak_rss_mib(),
              "peak_gpu_mib": gpu_peak, "device": a.device, "precision": a.precision,
              "bits_per_dim_last_step": loss.item() / math.log(2),
              "step_phases_ms": {k: statistics.median(v) for k, v in phases.items()}}
    peak = f"{gpu_peak:.0f} GPU" if gpu_peak is not None else f"{report['peak_rss_mib']:.0f}"
    print(f"| pytorch pixelcnn++ {a.device} {a.precision} | {a.batch} | {s:.3f} | "
          f"{a.batch / s:.1f} | {report['forward_ms']:.1f} | {peak} |")
    p = report["step_phases_ms"]
    print(f"step phases (median ms): forward {p['forward']:.1f}, loss {p['loss']:.1f}, "
          f"backward {p['backward']:.1f}, update {p['update']:.1f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
