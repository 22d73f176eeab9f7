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
from pathlib import Path

from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.training.curves import plot, read_curve, report

EXAMPLES = (
    "python analysis/training_curves.py runs/u1_fast runs/u1_standard "
    "--labels fastpath,standard --plot curves.png",
    "python analysis/training_curves.py runs/phi4_L16 runs/phi4_L16_transfer --x step",
)


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
