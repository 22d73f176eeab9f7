#!/usr/bin/env python3
"""Estimator study (issue 8): when do path gradients and the fast path pay off?

Reverse KL: reverse-standard, reverse-droppath and reverse-fastpath train the φ⁴ (m² = −4,
λ = 8) and U(1) (β = 2) flows on 8x8 from the same initialisation and seeds with equal
wall-clock budgets (round-robin time slices); ESS/N on a fixed batch against wall time and step,
and the gradient variance of the standard and path estimators along every run. Forward KL:
forward-standard (maximum likelihood) and forward-fastpath on fixed HMC sets of two sizes;
KL on training and held-out data, forward ESS on the held-out set, reverse ESS.

Writes OUT/results.md (tables), OUT/results.json (summaries and raw curves) and PNGs. Timing
runs single-threaded (torch.set_num_threads(1)). The computations live in
latticeflow.studies (estimators, estimator_runs, estimator_report).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from latticeflow import script_support as ss
from latticeflow.studies import estimators as study
from latticeflow.studies.estimator_report import write_outputs
from latticeflow.studies.estimator_runs import run_study

ACTIONS_DIR = Path(__file__).resolve().parents[1] / "actions"
EXAMPLES = (
    "python analysis/estimator_study.py --quick --out runs/estimator_study_quick",
    "python analysis/estimator_study.py --out runs/estimator_study -v",
    "python analysis/estimator_study.py --theories phi4 --seeds 5 --budget 120 "
    "--forward-seeds 3 --forward-budget 60",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("estimator_study.py", __doc__, EXAMPLES)
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets and batches (smoke test, a minute or two)")
    parser.add_argument("--out", default="runs/estimator_study", metavar="DIR",
                        help="output directory (default runs/estimator_study)")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help=f"reverse-KL seeds 0..N-1 (default {study.StudyConfig().seeds}, "
                             f"quick {study.QUICK.seeds})")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help=f"reverse-KL training time per estimator and seed (default "
                             f"{study.ReverseConfig().budget_s:g}, quick "
                             f"{study.QUICK.reverse.budget_s:g})")
    parser.add_argument("--forward-seeds", type=int, metavar="N",
                        help=f"forward-KL seeds 0..N-1 (default {study.ForwardConfig().seeds}, "
                             f"quick {study.QUICK.forward.seeds})")
    parser.add_argument("--forward-budget", type=float, metavar="SECONDS",
                        help=f"forward-KL training time per estimator, set and seed (default "
                             f"{study.ForwardConfig().budget_s:g}, quick "
                             f"{study.QUICK.forward.budget_s:g})")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="training precision (default float32)")
    parser.add_argument("--theories", nargs="+", default=list(study.THEORY_CARDS),
                        metavar="THEORY",
                        help=f"theories to study (default: {' '.join(study.THEORY_CARDS)})")
    return parser


def run(args: argparse.Namespace) -> int:
    config = study.study_config(quick=args.quick, dtype=args.dtype, theories=args.theories,
                                seeds=args.seeds, budget_s=args.budget,
                                forward_seeds=args.forward_seeds,
                                forward_budget_s=args.forward_budget)
    out = ss.check_output_dir(args.out)
    torch.set_num_threads(1)
    setups = {name: study.theory_setup(name, ACTIONS_DIR) for name in dict.fromkeys(args.theories)}
    result = run_study(config, setups, logging.getLogger("estimator_study").info)
    paths = write_outputs(result, out)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
