#!/usr/bin/env python3
"""Compare the training curves of several runs under a common wall-clock budget.

Reads each run's ``metrics.csv`` (columns documented in ``latticeflow.training``). The budget is
the shortest wall time among the runs. The table gives, per run, the steps done and the last
measured ESS at a quarter, half, three quarters and all of the budget, plus the mean loss of
the last 100 steps within the budget. ``--plot`` draws the loss (running mean) and the ESS of
all runs against wall time or step.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from latticeflow import script_support as ss
from latticeflow.errors import LatticeflowError
from latticeflow.statistics import running_mean
from latticeflow.training import read_metrics

EXAMPLES = (
    "python analysis/training_curves.py runs/u1_fast runs/u1_standard "
    "--labels fastpath,standard --plot curves.png",
    "python analysis/training_curves.py runs/phi4_L16 runs/phi4_L16_transfer --x step",
)
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


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("training_curves.py", __doc__, EXAMPLES)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="training run directories (or their metrics.csv files)")
    parser.add_argument("--labels", metavar="A,B,...",
                        help="names of the runs (default: directory names)")
    parser.add_argument("--plot", metavar="PATH", help="write the curves (PNG)")
    parser.add_argument("--x", choices=("time", "step"), default="time",
                        help="horizontal axis of the plot (default: wall time)")
    return parser


def run(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else [
        Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise LatticeflowError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    if args.plot:
        ss.check_output_dir(Path(args.plot).parent)
    curves = [read_curve(r, label) for r, label in zip(args.runs, labels, strict=True)]
    print(report(curves))
    if args.plot:
        print(f"wrote {plot(curves, args.plot, args.x)}")
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
