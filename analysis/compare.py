#!/usr/bin/env python3
"""Compare the observables of several ensembles (e.g. HMC against neural MCMC).

One table: value ± error of every common observable per ensemble, the deviation of each
ensemble from the first in units of the combined error, (v_i − v_0)/sqrt(σ_i² + σ_0²), and the
exact value where known; optionally one plot and a JSON file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latticeflow import measure
from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.measure import plots

EXAMPLES = (
    "python analysis/compare.py runs/free_hmc.h5 runs/free_nmcmc.h5",
    "python analysis/compare.py hmc.h5 flow.h5 -K 500,0 --labels HMC,flow "
    "--plot compare.png --json compare.json",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("compare.py", __doc__, EXAMPLES)
    parser.add_argument("ensembles", nargs="+", metavar="ENSEMBLE",
                        help="ensemble files; the first is the reference")
    parser.add_argument("-K", "--thermalization", default="0", metavar="K[,K2,...]",
                        help="rows dropped at the start of every chain: one value for all "
                             "ensembles or one per ensemble (default 0)")
    parser.add_argument("--labels", metavar="A,B,...",
                        help="names of the ensembles in the table (default: file names)")
    parser.add_argument("--plot", metavar="PATH", help="write the comparison plot (PNG)")
    parser.add_argument("--json", metavar="PATH",
                        help='write {"ensembles": [...], "observables": {NAME: {"exact", '
                             '"values": [{"value", "error", "deviation"}, ...]}}} to PATH')
    return parser


def run(args: argparse.Namespace) -> int:
    n = len(args.ensembles)
    thermalization = ss.parse_int_list(args.thermalization, n, "--thermalization")
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != n:
        raise LatticeflowError(f"--labels: {len(labels)} labels for {n} ensembles")
    if args.plot:
        ss.check_output_dir(Path(args.plot).parent)
    results = [measure.analyse(path, k, correlators=False)
               for path, k in zip(args.ensembles, thermalization, strict=True)]
    comparison = measure.compare(results, labels)
    print(ss.comparison_report(comparison))
    if args.json:
        ss.write_json(args.json, comparison.as_dict())
    if args.plot:
        print(f"wrote {plots.plot_comparison(comparison, args.plot)}")
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
