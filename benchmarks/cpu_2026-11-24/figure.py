"""assets/lr_range_tests.png: the LR range tests of this folder (2-core CPU, CIFAR-10 JPEG copy), each rule's
pick, and the peaks whose full runs were measured on an H100 at commit 858b4af (final accuracy beside each).

    PYTHONPATH=. python benchmarks/cpu_2026-11-24/figure.py
"""

import json
from pathlib import Path

import matplotlib.pyplot as plt

from helpers import plots
from helpers.lr_finder import from_curve

HERE = Path(__file__).parent
MEASURED = {  # full runs, H100, torch 2.11, commit 858b4af, CIFAR-10 (JPEG copy): peak -> final accuracy (%)
    "custom_resnet:writeup": {0.45: 90.93, 0.138: 90.50},
    "resnet18:fast": {0.4: 90.23, 0.0148: 86.93},
    "resnet18:writeup": {1.71e-4: 87.65, 2e-3: 87.26},
}

fig, axes = plt.subplots(1, len(MEASURED), figsize=(19, 5))
for ax, (spec, runs) in zip(axes, MEASURED.items()):
    row = json.loads((HERE / f"lrtest_{spec.replace(':', '_')}.json").read_text())["results"]["lrtest"][0]
    plots.plot_lr_finder(from_curve(row["lr_curve"]["lrs"], row["lr_curve"]["losses"]), ax=ax)
    for k, (peak, acc) in enumerate(runs.items()):
        ax.axvline(peak, color="tab:green", linewidth=2, alpha=0.6)
        ax.annotate(f"{peak:.3g}: {acc:.2f}%", (peak, 0.5 + 0.07 * k), xycoords=("data", "axes fraction"),
                    ha="center", va="bottom", color="tab:green", fontsize=9)
    ax.plot([], [], color="tab:green", linewidth=2, alpha=0.6, label="peak trained 20-24 epochs (H100): final acc.")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"{spec} ({row['optimizer']}, batch {row['batch_size']}), 100 steps")
fig.suptitle("LR range tests (2-core CPU, CIFAR-10 JPEG copy) against full runs at measured peaks "
             "(H100, commit 858b4af)")
fig.tight_layout()
fig.savefig(HERE.parents[1] / "assets" / "lr_range_tests.png", dpi=110)
