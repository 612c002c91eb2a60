"""Plots the held-out learning curves that `train_smollm2_head.py` records: acceptance against training tokens.

One line per curve file (one layout each): the engine's measured acceptance at draft position 1 and its accepted
drafts per cycle (k = 3, T = 1, probabilistic drafting solid, greedy dashed), and the teacher-forced acceptance
1 - TV of draft step 1 against the policy's own completions (dotted).

    python benchmarks/plot_head_curves.py   # reads benchmarks/results/head_curve_*.json
"""

import argparse
import glob
import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", nargs="+", default=sorted(glob.glob("benchmarks/results/head_curve_*.json")))
    parser.add_argument("--output", default="benchmarks/results/head_curves.png")
    args = parser.parse_args()

    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    first, cycle = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for index, path in enumerate(args.curves):
        with open(path, encoding="utf-8") as f:
            points = json.load(f)["points"]
        name = os.path.splitext(os.path.basename(path))[0].removeprefix("head_curve_")
        color = f"C{index}"
        tokens = [p["tokens"] / 1e6 for p in points]
        for mode, style in (("probabilistic", "-"), ("greedy", "--")):
            first.plot(
                tokens, [p[f"measured_acceptance_{mode}/position_1"] for p in points], style, color=color,
                marker="o", markersize=3, label=f"{name}, {mode}",
            )  # fmt: skip
            cycle.plot(
                tokens, [p[f"measured_accepted_length_{mode}"] for p in points], style, color=color, marker="o",
                markersize=3, label=f"{name}, {mode}",
            )  # fmt: skip
        first.plot(tokens, [p["acceptance/step_1"] for p in points], ":", color=color, label=f"{name}, 1 - TV")
    first.set_ylabel("acceptance at position 1 (held out)")
    cycle.set_ylabel("accepted drafts per cycle, k = 3 (held out)")
    for axis in (first, cycle):
        axis.set_xlabel("training tokens (millions)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
