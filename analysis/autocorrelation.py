#!/usr/bin/env python3
"""Autocorrelation analysis of an ensemble (Γ-method, Wolff 2004).

Prints per observable the integrated autocorrelation time τ_int ± error, the automatic window W,
N/τ_int and the first values of the normalised autocorrelation ρ(t) = Γ(t)/Γ(0); with --plots
writes ρ(t) with the window marked, τ_int(W) with its error band, and the Monte Carlo histories.
"""

from __future__ import annotations

import argparse
import sys

from latticeflow import measure
from latticeflow import script_support as ss
from latticeflow.measure import plots

EXAMPLES = (
    "python analysis/autocorrelation.py runs/free_hmc.h5 --plots plots/free_hmc",
    "python analysis/autocorrelation.py runs/u1_beta2.h5 -K 200 --json tau.json",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("autocorrelation.py", __doc__, EXAMPLES)
    parser.add_argument("ensemble", help="ensemble file (latticeflow HDF5, schema v1)")
    ss.add_thermalization(parser)
    parser.add_argument("--json", metavar="PATH",
                        help='write {"n", "sampler", "thermalization", "observables": {NAME: '
                             '{"tau_int", "tau_int_error", "window"}}} to PATH')
    parser.add_argument("--plots", metavar="DIR",
                        help="write autocorrelation.png, tau_int.png and histories.png into DIR")
    return parser


def run(args: argparse.Namespace) -> int:
    plot_dir = ss.check_output_dir(args.plots) if args.plots else None
    result = measure.analyse(args.ensemble, args.thermalization, correlators=False)
    print(ss.autocorrelation_report(result))
    if args.json:
        ss.write_json(args.json, ss.autocorrelation_record(result))
    if plot_dir is not None:
        for path in plots.standard_plots(result, plot_dir, autocorrelation=True):
            print(f"wrote {path}")
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
