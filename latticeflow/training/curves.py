"""Training curves of several runs compared under a common wall-clock budget.

Each run's ``metrics.csv`` (:mod:`latticeflow.training.metrics`) becomes a :class:`Curve`. The
budget is the shortest wall time among the runs; :func:`report` gives, per run, the steps done
and the last measured ESS at a quarter, half, three quarters and all of the budget, plus the
mean loss of the last ``LOSS_WINDOW`` steps within the budget. :func:`plot` draws the loss
(running mean) and the ESS of all runs against wall time or step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from latticeflow.base.errors import LatticeflowError
from latticeflow.statistics import running_mean
from latticeflow.training.metrics import read_metrics

BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
LOSS_WINDOW = 100


@dataclass
class Curve:
    """One run's metrics: ``step``, ``loss``, ``wall_time`` per step; ESS where measured."""

    label: str
    step: np.ndarray
    loss: np.ndarray
    wall_time: np.ndarray
    ess_step: np.ndarray
    ess_time: np.ndarray
    ess: np.ndarray

    def ess_at(self, seconds: float) -> float:
        """The last ESS measured at or before ``seconds`` of training (NaN if none yet)."""
        done = self.ess_time <= seconds
        return float(self.ess[done][-1]) if done.any() else float("nan")

    def steps_at(self, seconds: float) -> int:
        done = self.wall_time <= seconds
        return int(self.step[done][-1]) if done.any() else 0

    def loss_at(self, seconds: float) -> float:
        """Mean loss of the last ``LOSS_WINDOW`` steps done by ``seconds``."""
        loss = self.loss[self.wall_time <= seconds][-LOSS_WINDOW:]
        loss = loss[np.isfinite(loss)]
        return float(loss.mean()) if loss.size else float("nan")


def read_curve(run: str, label: str) -> Curve:
    """The curve of a run directory or of a ``metrics.csv`` path."""
    path = Path(run)
    path = path / "metrics.csv" if path.is_dir() else path
    if not path.is_file():
        raise LatticeflowError(f"{run}: no metrics.csv (not a training run directory)")
    try:
        m = read_metrics(path)
    except (KeyError, ValueError) as err:
        raise LatticeflowError(f"{path}: not a latticeflow metrics file ({err})") from None
    if m["step"].size == 0:
        raise LatticeflowError(f"{path}: no training steps recorded")
    measured = np.isfinite(m["ess"])
    return Curve(label, m["step"], m["loss"], m["wall_time"], m["step"][measured],
                 m["wall_time"][measured], m["ess"][measured])


def report(curves: list[Curve]) -> str:
    """The plain-text table at the common budget."""
    budget = min(float(c.wall_time[-1]) for c in curves)
    times = [f * budget for f in BUDGET_FRACTIONS]
    header = ["run", "steps"] + [f"ESS@{t:.0f}s" for t in times] + ["loss"]
    rows = [[c.label, str(c.steps_at(budget))] + [f"{c.ess_at(t):.3f}" for t in times]
            + [f"{c.loss_at(budget):.4f}"] for c in curves]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"common budget: {budget:.0f} s of training (the shortest run); ESS is the last "
             f"value measured by each time, loss the mean of the last {LOSS_WINDOW} steps"]
    lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
              for row in [header, *rows]]
    return "\n".join(lines)


def plot(curves: list[Curve], path: str, x: str) -> Path:
    """Loss (running mean) and ESS of every run against wall time (``x="time"``) or step."""
    figure = Figure(figsize=(8, 6), layout="constrained")
    loss_ax, ess_ax = figure.subplots(2, 1, sharex=True)
    lows, highs = [], []
    for c in curves:
        window = max(1, min(LOSS_WINDOW, c.loss.size // 20))
        smooth = running_mean(c.loss, window)
        xs = (c.wall_time if x == "time" else c.step)[window - 1:]
        line, = loss_ax.plot(xs, smooth, lw=1.3, label=c.label)
        if np.isfinite(smooth).any():
            lows.append(np.nanmin(smooth))
            highs.append(np.nanpercentile(smooth, 95))
        ess_ax.plot(c.ess_time if x == "time" else c.ess_step, c.ess, "o-", ms=3,
                    color=line.get_color(), label=c.label)
    if lows:  # keep the first steps' transient from flattening the curves
        pad = 0.1 * (max(highs) - min(lows)) or 1.0
        loss_ax.set_ylim(min(lows) - pad, max(highs) + pad)
    loss_ax.set_ylabel("loss (running mean)")
    loss_ax.legend(loc="upper right")
    ess_ax.set_ylabel("ESS / N")
    ess_ax.set_ylim(0.0, 1.02)
    ess_ax.set_xlabel("wall time [s]" if x == "time" else "training step")
    for ax in (loss_ax, ess_ax):
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return Path(path)


__all__ = ["BUDGET_FRACTIONS", "LOSS_WINDOW", "Curve", "plot", "read_curve", "report"]
