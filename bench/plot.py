#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Plot throughput per policy over the stream from policy_bench's --series JSON.

    bench/plot.py SERIES.json [OUT.png]        (default OUT: bench/policy_throughput.png)

Needs matplotlib (Debian: apt-get install python3-matplotlib; then run it with /usr/bin/python3).
One panel per scenario; x = position in the stream (calls), y = simulated items per second over
each window of calls; the squeeze window is shaded.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Oracle dashed black, vramguard bold, anchors thin.
STYLE = {
    "oracle": dict(color="black", linestyle="--", linewidth=1.6),
    "vramguard-weighted": dict(color="tab:red", linewidth=2.4),
    "vramguard": dict(color="tab:orange", linewidth=2.0),
    "fixed-token-budget": dict(color="tab:blue", linewidth=1.2),
    "tune-once": dict(color="tab:green", linewidth=1.2),
    "shrink-0.9-remember": dict(color="tab:purple", linewidth=1.2),
    "halve-remember-callsite": dict(color="tab:brown", linewidth=1.2),
    "halve-restart-forget": dict(color="tab:gray", linewidth=1.2),
    "fixed-conservative": dict(color="tab:olive", linewidth=1.2),
}
ORDER = list(STYLE)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[2] if len(sys.argv) > 2 else "bench/policy_throughput.png"
    with open(sys.argv[1]) as f:
        data = json.load(f)
    scenarios = data["scenarios"]
    names = [n for n in ("steady/packed", "squeeze/packed", "steady/padded", "squeeze/padded") if n in scenarios]
    names += [n for n in scenarios if n not in names]
    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.6 * rows), squeeze=False, sharex=True)
    window = data["window_calls"]
    for ax, name in zip(axes.flat, names):
        s = scenarios[name]
        x = [c + window / 2 for c in s["window_first_call"]]
        series = s["items_per_sim_s"]
        for policy in sorted(series, key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER)):
            ax.plot(x, series[policy], label=policy, **STYLE.get(policy, {}))
        if "squeeze_calls" in s:
            a, b = s["squeeze_calls"]
            ax.axvspan(a, b, color="tab:red", alpha=0.08, label="squeeze (40 % taken)")
        ax.set_title(name)
        ax.set_ylabel("items / simulated s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(f"call (request) index; windows of {window} calls")
    handles, labels = axes.flat[1 if len(names) > 1 else 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.suptitle("Batch-sizing policies on the same simulated GPU and skewed stream (bench/policy_bench)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
