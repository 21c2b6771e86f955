"""Learning curves of a run: `python -m vpd_lightning.run.plot runs/<name>/version_N`.

Reads the CSV logger's `metrics.csv` and draws the curves a person checks first (reward, held-out
accuracy, M-step and E-step losses, teacher-student KL, entropy) into `curves.png` next to it.
`fit` calls this at the end of every run that has a CSV log.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

PANELS = (
    ("reward", ("train/reward_mean", "train/success_fraction")),
    ("held-out accuracy", ("val/", "test/")),
    ("losses", ("mstep/loss", "estep/loss")),
    ("teacher-student KL, entropy", ("mstep/teacher_student_kl", "mstep/student_entropy")),
    ("BCO", ("estep/implicit_reward", "estep/margin", "estep/delta")),
    ("response length", ("train/response_length",)),
)


def read_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric as (step, value) pairs, skipping empty cells."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                number = float(value)
                if math.isfinite(number):
                    series[key].append((step, number))
    return dict(series)


def plot_run(run_dir: str | Path) -> Path:
    """Write `curves.png` for the run in `run_dir` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_csv = run_dir / "metrics.csv"
    if not metrics_csv.is_file():
        raise FileNotFoundError(f"{metrics_csv} does not exist: plot needs a CSVLogger run folder")
    series = read_series(metrics_csv)
    panels = []
    for title, prefixes in PANELS:
        keys = sorted(k for k in series if any(k.startswith(p) for p in prefixes))
        if keys:
            panels.append((title, keys))
    if not panels:
        raise ValueError(f"{metrics_csv} holds none of the metrics vpd_lightning logs")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            steps, values = zip(*series[key], strict=True)
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out = run_dir / "curves.png"
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vpd_lightning.run.plot runs/<name>/version_N")
    print(plot_run(sys.argv[1]))


if __name__ == "__main__":
    main()
