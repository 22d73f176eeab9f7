"""The run's metrics file and its plot.

``metrics.csv``: one row per step (columns :data:`METRIC_COLUMNS`), flushed as it goes; on
resuming it is cut back to the checkpoint's step and continued. ``training.png``: loss and ESS
against step. The meaning of each column is in :mod:`latticeflow.training.trainer`.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from latticeflow.base.errors import LatticeflowError
from latticeflow.statistics import running_mean

METRICS_NAME = "metrics.csv"
PLOT_NAME = "training.png"
#: At most one plot refresh per this many seconds at intermediate checkpoints.
PLOT_INTERVAL_S = 60.0
METRIC_COLUMNS = ("step", "loss", "ess", "logw_std", "lr", "wall_time", "skipped_steps")


def _format(value: float | int | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.8g}"


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to ``last_step`` (rows after a checkpoint are redone)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != METRIC_COLUMNS:
        raise LatticeflowError(f"{path}: not a latticeflow metrics file (unexpected header)")
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a ``metrics.csv`` as float arrays (blank → NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {c: np.array([float(r[c]) if r[c] else np.nan for r in rows]) for c in METRIC_COLUMNS}


def plot_metrics(metrics: str | os.PathLike, out: str | os.PathLike, title: str = "") -> None:
    """``training.png``: loss (raw and running mean) and ESS against step."""
    m = read_metrics(metrics)
    fig = Figure(figsize=(8, 6), layout="constrained")
    loss_ax, ess_ax = fig.subplots(2, 1, sharex=True)
    step, loss = m["step"], m["loss"]
    loss_ax.plot(step, loss, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    window = max(1, len(loss) // 50)
    if window > 1 and np.isfinite(loss).sum() >= window:
        smooth = running_mean(loss, window)
        loss_ax.plot(step[window - 1:], smooth, color="tab:blue", lw=1.5,
                     label=f"mean of {window} steps")
        loss_ax.legend(loc="upper right")
        finite = smooth[np.isfinite(smooth)]
        if finite.size:  # keep the early transient from flattening the rest
            low, high = np.percentile(finite, [0, 98])
            pad = 0.1 * (high - low) or 1.0
            loss_ax.set_ylim(low - pad, high + pad)
    loss_ax.set_ylabel("loss (KL estimate + const)")
    loss_ax.grid(alpha=0.3)
    measured = np.isfinite(m["ess"])
    ess_ax.plot(step[measured], m["ess"][measured], "o-", color="tab:green", ms=3)
    ess_ax.set_ylim(0.0, 1.02)
    ess_ax.set_ylabel("ESS / N")
    ess_ax.set_xlabel("training step")
    ess_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=110)


class _MetricsLog:
    """Appends rows to ``metrics.csv`` (header first in a new file), flushed row by row; a no-op
    unless ``active`` (ranks other than 0)."""

    def __init__(self, path: Path, active: bool):
        self._file = None
        if active:
            new_file = not path.exists()
            self._file = open(path, "a", newline="")
            self._writer = csv.writer(self._file)
            if new_file:
                self._writer.writerow(METRIC_COLUMNS)

    def write(self, *row: float | int | None) -> None:
        if self._file is not None:
            self._writer.writerow([_format(v) for v in row])
            self._file.flush()

    def __enter__(self) -> _MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _format_ess(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


__all__ = ["METRICS_NAME", "METRIC_COLUMNS", "PLOT_INTERVAL_S", "PLOT_NAME", "plot_metrics",
           "read_metrics"]
