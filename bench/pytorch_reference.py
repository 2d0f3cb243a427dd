"""The same models as pixel-models (src/model), written in PyTorch, timed the same way as `pixel bench`,
so that the speed ratio to PyTorch is measured side by side on one machine with the same threads.

    python3 bench/pytorch_reference.py --variant gated --layers 5 --kernel 5 --channels 30 \
        --batch 64 --size 28 --colours 1 --steps 10 --threads 2

Prints the median seconds per training step (forward, 256-way cross-entropy, backward, Adam) and of a
forward pass without gradients, after two warm-up steps each (--compile: five), then the median time of each phase of a
step as `pixel bench` prints them (--sync: the GPU's). Random data: the speed does not depend on the
pixel values.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import profiling


# Warm-up steps with --compile: the first compiles, and on a GPU the next ones record the graphs.
COMPILE_WARMUP = 5


def groups(n, colours):
    return [ch * colours // n for ch in range(n)]


def gate_groups(n, colours):
    g = groups(n, colours)
    return g + g


def mask(kind, in_groups, out_groups, kh, kw, cy, cx):
    m = torch.zeros(len(out_groups), len(in_groups), kh, kw)
    for o, go in enumerate(out_groups):
        for i, gi in enumerate(in_groups):
            for y in range(kh):
                for x in range(kw):
                    if kind == "full" or (y, x) < (cy, cx):
                        m[o, i, y, x] = 1
                    elif (y, x) == (cy, cx):
                        m[o, i, y, x] = float(gi < go if kind == "A" else gi <= go)
    return m


class MaskedConv(nn.Conv2d):
    """A convolution whose weight is multiplied by a fixed mask; padding keeps the image size."""

    def __init__(self, kind, shape, k, in_groups, out_groups):
        kh, kw, cy, cx = {
            "square": (k, k, k // 2, k // 2),
            "row_left": (1, k // 2 + 1, 0, k // 2),
            "rows_above": (k // 2 + 1, k, k // 2, k // 2),
            "point": (1, 1, 0, 0),
        }[shape]
        super().__init__(len(in_groups), len(out_groups), (kh, kw))
        # Rebuilt from the layout, never saved: pixel's exported files hold no masks.
        self.register_buffer("mask", mask(kind, in_groups, out_groups, kh, kw, cy, cx),
                             persistent=False)
        self.pad = (cx, kw - 1 - cx, cy, kh - 1 - cy)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


class Simple(nn.Module):
    """`outputs`: the head's values per pixel (256 per colour, or a grey mixture's 3K)."""

    def __init__(self, colours, layers, k, ch, outputs=None):
        super().__init__()
        self.convs = nn.ModuleList(
            MaskedConv("A" if l == 0 else "B", "square", k,
                       groups(colours if l == 0 else ch, colours), groups(ch, colours))
            for l in range(layers))
        self.head = MaskedConv("B", "point", 1, groups(ch, colours),
                               groups(outputs or 256 * colours, colours))

    def forward(self, x, labels=None):
        for c in self.convs:
            x = F.relu(c(x))
        return self.head(x)


def gate(x):
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """pixel's gated layer: `classes` adds a learned bias per class to both stacks; `residual`,
    `gates` and `link` are the seed's ablations (False: no residual, ReLU instead of the gate, no
    vertical-to-horizontal link)."""

    def __init__(self, colours, k, ch, first, classes=0, residual=True, gates=True, link=True):
        super().__init__()
        ins = groups(colours if first else ch, colours)
        hidden = groups(ch, colours)
        outs = gate_groups(ch, colours) if gates else hidden
        self.vertical = MaskedConv("full", "rows_above", k, ins, outs)
        self.horizontal = MaskedConv("A" if first else "B", "row_left", k, ins, outs)
        self.link = MaskedConv("full", "point", 1, outs, outs) if link else None
        self.out = MaskedConv("B", "point", 1, hidden, hidden)
        self.skip = MaskedConv("B", "point", 1, hidden, hidden)
        bound = 1 / len(outs) ** 0.5
        self.class_v, self.class_h = (
            (nn.Parameter(torch.empty(classes, len(outs)).uniform_(-bound, bound)),
             nn.Parameter(torch.empty(classes, len(outs)).uniform_(-bound, bound)))
            if classes else (None, None))
        self.residual = residual and not first
        self.activate = gate if gates else F.relu

    def forward(self, v, h, labels=None):
        vc = self.vertical(v)
        hc = self.horizontal(h)
        if self.link is not None:
            shifted = F.pad(vc, (0, 0, 1, 0))[:, :, :-1, :]
            hc = hc + self.link(shifted)
        if self.class_v is not None:
            vc = vc + self.class_v[labels][:, :, None, None]
            hc = hc + self.class_h[labels][:, :, None, None]
        gated = self.activate(hc)
        h_out = self.out(gated) + (h if self.residual else 0)
        return self.activate(vc), h_out, self.skip(gated)


class Gated(nn.Module):
    def __init__(self, colours, layers, k, ch, outputs=None, classes=0, residual=True,
                 gates=True, link=True):
        super().__init__()
        self.layers = nn.ModuleList(
            GatedLayer(colours, k, ch, l == 0, classes, residual, gates, link)
            for l in range(layers))
        self.head_hidden = MaskedConv("B", "point", 1, groups(ch, colours), groups(ch, colours))
        self.head_out = MaskedConv("B", "point", 1, groups(ch, colours),
                                   groups(outputs or 256 * colours, colours))

    def forward(self, x, labels=None):
        v = h = x
        skips = 0
        for layer in self.layers:
            v, h, s = layer(v, h, labels)
            skips = skips + s
        return self.head_out(F.relu(self.head_hidden(F.relu(skips))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["simple", "gated"], default="gated")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--channels", type=int, default=30)
    p.add_argument("--colours", type=int, default=1)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                   help="bf16: torch.autocast (f32 weights, Adam state and loss)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the first GPU (each timed step ends with .item(), which waits for it)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True, as pixel's runtime.cudnn_benchmark")
    p.add_argument("--compile", action="store_true",
                   help='torch.compile(mode="reduce-overhead") of the model and of Adam\'s step (on a '
                        "GPU both replay as CUDA graphs): the anchor for pixel's runtime.cuda_graph; "
                        "%d warm-up steps instead of 2, which compile" % COMPILE_WARMUP)
    p.add_argument("--sync", action="store_true",
                   help="wait for the GPU at each phase boundary, so that the phases are the GPU's")
    p.add_argument("--profile", metavar="TRACE.json",
                   help="after the timed steps, record %d more with torch.profiler and write its "
                        "Chrome trace here (as pixel bench --profile)" % profiling.STEPS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    model = (Simple if a.variant == "simple" else Gated)(a.colours, a.layers, a.kernel, a.channels)
    model = model.to(a.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    update = opt.step
    if a.compile:
        # As PyTorch's own recipe: the module, and the optimizer's step as a function of its own
        # (the learning rate a tensor, so that it is no constant baked into the graph).
        for g in opt.param_groups:
            g["lr"] = torch.tensor(g["lr"], device=a.device)
        model = torch.compile(model, mode="reduce-overhead")
        update = torch.compile(opt.step, mode="reduce-overhead")
    warmup = COMPILE_WARMUP if a.compile else 2
    # The same work as pixel's step: a fresh batch of bytes uploaded from the host every step,
    # the loss and the gradients' global norm read on the host (pixel reports both every step).
    batches = [torch.randint(0, 256, (a.batch, a.colours, a.size, a.size), dtype=torch.uint8)
               for _ in range(4)]

    def forward(x):
        if a.precision == "bf16":
            with torch.autocast(a.device, dtype=torch.bfloat16):
                return model(x).float()
        return model(x)

    sync = (lambda: torch.cuda.synchronize()) if (a.sync and a.device == "cuda") else (lambda: None)

    def step(i):
        """One training step; returns the times at its phase boundaries (those of `pixel bench`:
        forward with the upload, loss, backward, update with the host's reads of the loss and
        the gradients' norm)."""
        sync()
        start = time.perf_counter()
        target = batches[i % len(batches)].to(a.device).long()
        x = target.float() / 255
        logits = forward(x).view(a.batch, a.colours, 256, a.size, a.size).transpose(1, 2)
        sync()
        t_forward = time.perf_counter()
        loss = F.cross_entropy(logits, target)
        sync()
        t_loss = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        sync()
        t_backward = time.perf_counter()
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        update()
        sync()
        return [start, t_forward, t_loss, t_backward, time.perf_counter()]

    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x = batches[0].to(a.device).float() / 255
    times = []
    phases = {k: [] for k in ("forward", "loss", "backward", "update")}
    for i in range(a.steps + warmup):
        marks = step(i)
        if i >= warmup:
            times.append(marks[-1] - marks[0])
            for k, t0, t1 in zip(phases, marks, marks[1:]):
                phases[k].append((t1 - t0) * 1e3)
    fwd = []
    with torch.no_grad():
        for i in range(a.steps + warmup):
            t = time.perf_counter()
            forward(x).sum().item()
            if i >= warmup:
                fwd.append((time.perf_counter() - t) * 1e3)
    s = statistics.median(times)
    peak = (f" {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU peak |"
            if a.device == "cuda" else "")
    if a.profile:  # last, so that the profiler is in no measure above
        profiling.profile(step, a.profile, a.device)
    compiled = " compiled" if a.compile else ""
    print(f"| pytorch {torch.__version__} {a.device} {a.precision}{compiled} | {a.variant} {a.layers}x{a.kernel} c{a.channels} | "
          f"{a.batch} | {s:.4f} s/step | {a.batch / s:.1f} images/s | {statistics.median(fwd):.1f} ms forward |"
          f"{peak}")
    p = {k: statistics.median(v) for k, v in phases.items()}
    print(f"step phases (median ms): forward {p['forward']:.1f}, loss {p['loss']:.1f}, "
          f"backward {p['backward']:.1f}, update {p['update']:.1f}")


if __name__ == "__main__":
    main()
