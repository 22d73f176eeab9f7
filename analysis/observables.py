#!/usr/bin/env python3
"""Standard observables of an ensemble with honest errors.

Prints value ± error and τ_int ± error of every observable of the ensemble's theory
(Γ-method, chains as replicas), with exact values and deviations where they are known, plus the
φ⁴ correlators (C(t), effective mass, ξ₂) or the U(1) topology and Wilson-loop summary.
"""

from __future__ import annotations

import argparse
import sys

from latticeflow import measure
from latticeflow import script_support as ss
from latticeflow.measure import plots
from latticeflow.measure.pyerrors_export import to_pyerrors

EXAMPLES = (
    "python analysis/observables.py runs/free_hmc.h5",
    "python analysis/observables.py runs/u1_beta2.h5 --thermalization 200 "
    "--json u1_beta2.json --plots plots/u1_beta2",
    "python analysis/observables.py runs/u1_beta2.h5 -K 200 --pyerrors u1_beta2.json.gz",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("observables.py", __doc__, EXAMPLES)
    parser.add_argument("ensemble", help="ensemble file (latticeflow HDF5, schema v1)")
    ss.add_thermalization(parser)
    parser.add_argument("--json", metavar="PATH",
                        help='write {"n", "sampler", "acceptance", "observables": {NAME: '
                             '{"value", "error", "tau_int", "tau_int_error"}}} to PATH')
    parser.add_argument("--pyerrors", metavar="PATH",
                        help="write one pyerrors Obs per observable (chains as replicas "
                             "NAME|r0, NAME|r1, ...) to PATH (.json or .json.gz), replaced "
                             "like --json; needs pip install 'latticeflow[pyerrors]'")
    parser.add_argument("--plots", metavar="DIR",
                        help="write histories and correlator / topological-charge / "
                             "Wilson-loop PNGs into DIR")
    parser.add_argument("--wilson-max", type=int, default=None, metavar="R",
                        help="U(1): largest R and T of the Wilson-loop table (default L/2)")
    return parser


def run(args: argparse.Namespace) -> int:
    plot_dir = ss.check_output_dir(args.plots) if args.plots else None
    result = measure.analyse(args.ensemble, args.thermalization, wilson_max=args.wilson_max)
    print(ss.observables_report(result))
    if args.json:
        ss.write_json(args.json, measure.observables_record(result))
    if args.pyerrors:
        to_pyerrors(result, out=args.pyerrors, overwrite=True)
    if plot_dir is not None:
        for path in plots.standard_plots(result, plot_dir):
            print(f"wrote {path}")
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
