"""Markdown table of bbox AP / APr / APc / APf and mean training iteration time of runs.

    python benchmarks/one_stage_table.py OUT_DIR RUN [RUN ...]

Reads OUT_DIR/RUN/final_metrics.json and OUT_DIR/RUN/metrics.json (detectron2's "time",
seconds per iteration, the mean over the logged iterations after the first 20).
"""

import json
import os
import sys


def iteration_time(path):
    times = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "time" in row and row.get("iteration", 0) >= 20:
                times.append(row["time"])
    return sum(times) / len(times) if times else float("nan")


def main(out, runs):
    print("| run | AP | APr | APc | APf | s/iter |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        with open(os.path.join(out, run, "final_metrics.json")) as f:
            m = json.load(f)
        bbox = next(iter(m.values()))["bbox"]
        t = iteration_time(os.path.join(out, run, "metrics.json"))
        vals = " | ".join(f"{bbox[k]:.2f}" for k in ("AP", "APr", "APc", "APf"))
        print(f"| {run} | {vals} | {t:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
