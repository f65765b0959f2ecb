#!/usr/bin/env bash
# Latency plots from scripts/bench-latency.sh's JSON: the ack latency distribution (latency
# against percentile, HdrHistogram style) of every paced run at one rate, next to the TCP
# ping-pong floor measured in the same run, one panel per path; with --before, that run's
# curves dashed beside the current ones.
#
#   ./scripts/plot-latency.sh [--rate 10000] [--before OLD.json] [--out PNG] [LATENCY.json]
#
# LATENCY.json defaults to target/bench/latency.json, PNG to target/bench/latency.png.
# Needs python3-matplotlib (installed from Debian when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

rate=10000
before=""
out=target/bench/latency.png
input=target/bench/latency.json
while [[ $# -gt 0 ]]; do
    case $1 in
        --rate) rate=$2; shift 2 ;;
        --before) before=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        -*) echo "plot-latency: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) input=$1; shift ;;
    esac
done
[[ -f $input ]] || { echo "plot-latency: no $input: run scripts/bench-latency.sh first" >&2; exit 1; }
ensure_packages python3-matplotlib

# Debian's interpreter, where python3-matplotlib is installed (a python3 earlier on PATH,
# e.g. pyenv's, does not see it).
/usr/bin/python3 - "$input" "$before" "$rate" "$out" <<'PY'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

current, before, rate, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def runs(path):
    entries = json.load(open(path))
    return [e for e in entries if e.get("rate_label") == rate and e.get("ack_distribution_us")]

def label(e):
    if e["backend"] == "tcp-pingpong":
        return "TCP ping-pong (floor)"
    if e["backend"] == "redis-xadd":
        return "Redis XADD, paced open loop"
    return f"{e['backend']}, {e['brokers']} broker{'s' if e['brokers'] > 1 else ''}"

def curve(e):
    points = [(p["percentile"], p["value_us"]) for p in e["ack_distribution_us"] if p["percentile"] < 100]
    # x: 1 / (1 - p), so that p50, p90, p99, p99.9 are evenly spaced.
    return [1 / (1 - p / 100) for p, _ in points], [v for _, v in points]

now = runs(current)
old = runs(before) if before else []
paths = sorted({e["path"] for e in now})
fig, axes = plt.subplots(1, len(paths), figsize=(6.5 * len(paths), 4.5), squeeze=False)
for axis, path in zip(axes[0], paths):
    for e in [e for e in now if e["path"] == path]:
        x, y = curve(e)
        line, = axis.plot(x, y, label=label(e) + (" (after)" if old else ""))
        for o in old:
            if (o["path"], o["backend"], o["brokers"]) == (e["path"], e["backend"], e["brokers"]) and o["brokers"] > 0:
                ox, oy = curve(o)
                axis.plot(ox, oy, linestyle="--", color=line.get_color(), label=label(o) + " (before)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    ticks = [2, 10, 100, 1000]
    axis.set_xticks(ticks, ["p50", "p90", "p99", "p99.9"])
    axis.set_xlim(1, 2000)
    axis.set_xlabel("percentile")
    axis.set_ylabel("ack latency from the due time (us)")
    axis.set_title(f"{path}: 1 KiB, order 5, ack 1, {int(rate):,} msgs/s, 1 message per batch")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
PY
