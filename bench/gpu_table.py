"""The table of bench/gpu.sh's rows, from its output (gpu.txt), for the performance docs: per row
pixel's and the twin's median seconds per step in each round, the ratio (the twin's time over
pixel's: above 1, pixel is faster), pixel's step phases, both sides' peak GPU memory, and for
CUDA graph rows the steps captured, replayed and run eagerly.

    python3 bench/gpu_table.py gpu-out/gpu.txt

A row with no twin of its own (a CUDA graph row) is compared with the twin of the eager row of
the same configuration in the same round, marked "eager twin"; the compiled twin is marked
"compiled". A row that failed or timed out says so in place of its numbers.
"""
import re
import sys
from collections import OrderedDict

ROUND = re.compile(r"^=== round (\d+) of \d+")
ROW = re.compile(r"^--- (.*?)\s*$")
PHASES = re.compile(r"step phases \(median ms\): forward ([\d.]+), loss ([\d.]+), "
                    r"backward ([\d.]+), update ([\d.]+)")
GRAPH = re.compile(r"CUDA graph: (\d+) step\(s\) captured, (\d+) replayed, (\d+) eager")
TROUBLE = re.compile(r"(TIMED OUT|FAILED)")


def cells(line):
    """The cells of the first Markdown row in `line` (before its step phases)."""
    table = line.split("step phases")[0]
    return [c.strip() for c in table.strip().strip("|").split("|")]


def side(line, who):
    """What one `pixel:` or `twin:` line says: seconds per step, peak memory, phases, graph counts,
    or the trouble (None where the line has no row, as a twin that is not run)."""
    found = {}
    trouble = TROUBLE.search(line)
    if "|" not in line:
        return {"trouble": trouble.group(1)} if trouble else None
    c = cells(line)
    try:
        if who == "pixel":
            found["seconds"] = float(c[4])
            found["peak"] = c[9]
        elif "pixelcnn++" in c[0]:
            found["seconds"] = float(c[2])
            found["peak"] = c[5]
        else:
            found["seconds"] = float(c[3].split()[0])
            found["peak"] = c[6].replace(" MiB GPU peak", " GPU") if len(c) > 6 else "-"
            found["compiled"] = c[0].endswith("compiled")
    except (IndexError, ValueError):
        return {"trouble": trouble.group(1) if trouble else "unreadable"}
    phases = PHASES.search(line)
    if phases:
        found["phases"] = "/".join(phases.groups())
    graph = GRAPH.search(line)
    if graph:
        found["graph"] = "%s/%s/%s" % graph.groups()
    if trouble:
        found["trouble"] = trouble.group(1)
    return found


def parse(text):
    """{row name: {round: {"pixel": ..., "twin": ...}}} in the order rows first appear."""
    rows = OrderedDict()
    current_round, name = 0, None
    for line in text.splitlines():
        if line.startswith("=== "):  # a section: a round's rows, or the profiles after them
            m = ROUND.match(line)
            current_round = int(m.group(1)) if m else current_round
            name = None
            continue
        m = ROW.match(line)
        if m:
            name = m.group(1)
            rows.setdefault(name, OrderedDict()).setdefault(current_round, {})
            continue
        for who in ("pixel", "twin"):
            if name is not None and line.startswith(who + ":"):
                rows[name][current_round][who] = side(line[len(who) + 1:], who)
    return rows


def eager_name(name):
    return re.sub(r"\s+graph$", "", name)


def table(rows):
    out = ["| row | pixel s/step | twin s/step | ratio | pixel phases: forward/loss/backward/update ms "
           "| peak GPU memory, pixel / twin | CUDA graph: captured/replayed/eager |",
           "|---|---:|---:|---:|---|---|---|"]
    for name, rounds in rows.items():
        pix, twin, ratio, phases, peak, graph = [], [], [], [], [], []
        for r, sides in rounds.items():
            p = sides.get("pixel") or {"trouble": "missing"}
            t, kind = sides.get("twin"), ""
            if t is None and eager_name(name) != name:
                t = rows.get(eager_name(name), {}).get(r, {}).get("twin")
                kind = " (eager twin)"
            elif t and t.get("compiled"):
                kind = " (compiled)"
            pix.append(p.get("trouble") if "seconds" not in p else "%.4f" % p["seconds"])
            twin.append("-" if not t else (t.get("trouble") if "seconds" not in t else
                                           "%.4f%s" % (t["seconds"], kind)))
            both = "seconds" in p and t and "seconds" in t
            ratio.append("%.2f" % (t["seconds"] / p["seconds"]) if both else "-")
            phases.append(p.get("phases", "-"))
            peak.append("%s / %s" % (p.get("peak", "-"), (t or {}).get("peak", "-")))
            graph.append(p.get("graph", "-"))
        join = " ; ".join
        out.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            name, join(pix), join(twin), join(ratio), join(phases), join(peak), join(graph)))
    return "\n".join(out)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        print(table(parse(f.read())))


if __name__ == "__main__":
    main()
