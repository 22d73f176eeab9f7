#!/usr/bin/env python3
"""log Z, free energy and variational bounds from a trained flow; reweighting to nearby parameters.

Draws N fresh, independent samples x ~ q from the flow of a checkpoint and prints the
importance-sampling estimate of log Z = log E_q[e^{−S − log q}] (Lebesgue measure; U(1) also
Haar-normalised) with a jackknife error, log Z / V, the free energy per site F/V = −log Z / V,
the ESS, the reverse bound ELBO = E_q[log w] ≤ log Z and, given an ensemble of p (HMC), the
forward bound log Z ≤ EUBO = E_p[−S − log q]; the exact value and the deviation in units of
the error where it is known (free field, 2D U(1)). An estimate with too few effective samples
(ESS · N < 100) or too heavy-tailed weights (Pareto k̂ > 0.7) is flagged as untrustworthy.
--reweight moves expectation values (plaquette, Q², m², |m|) and log Z to a nearby parameter
point with the same draws, refusing when the ESS collapses.

An ensemble file as ENSEMBLE_OR_RUN needs --checkpoint: its rows are Markov-chain states, not
independent draws from q, so log mean w over them would be biased. The flow's fresh draws give
log Z, and the ensemble (a sample of p) gives the forward bound.
"""

from __future__ import annotations

import argparse
import sys

from latticeflow import script_support as ss
from latticeflow import thermodynamics as thermo
from latticeflow.studies import thermodynamics as study

EXAMPLES = (
    "python analysis/thermodynamics.py runs/u1_beta2",
    "python analysis/thermodynamics.py runs/u1_beta2 --hmc runs/u1_beta2_hmc.h5 -K 200 "
    "--reweight beta=2.1 --reweight beta=1.9 --json thermo.json",
    "python analysis/thermodynamics.py runs/free_nmcmc.h5 --checkpoint runs/free "
    "--n 50000 --reweight m2=1.1",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("thermodynamics.py", __doc__, EXAMPLES)
    parser.add_argument("source", metavar="ENSEMBLE_OR_RUN",
                        help="run directory or checkpoint file of a trained flow; or an "
                             "ensemble (.h5) of p, which then needs --checkpoint")
    parser.add_argument("--checkpoint", metavar="RUN",
                        help="the flow (run directory or checkpoint) when ENSEMBLE_OR_RUN is "
                             "an ensemble")
    parser.add_argument("--hmc", metavar="FILE.h5",
                        help="ensemble of p (HMC) for the forward bound EUBO")
    ss.add_thermalization(parser)
    parser.add_argument("--n", type=int, default=20000,
                        help="number of fresh flow samples (default 20000)")
    parser.add_argument("--batch-size", type=int, default=1024,
                        help="flow samples per batch (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flow draws (default 0)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--bins", type=int, default=thermo.DEFAULT_BINS,
                        help=f"jackknife blocks of the log Z error "
                             f"(default {thermo.DEFAULT_BINS})")
    parser.add_argument("--reweight", action="append", default=[],
                        metavar="NAME=VALUE[,NAME=VALUE]",
                        help="reweight to changed action parameters (U(1): beta; φ⁴: m2, lam "
                             "or kappa, lam); repeat for several targets")
    parser.add_argument("--json", metavar="PATH",
                        help='write {"log_z", "log_z_error", "log_z_per_site", "ess", "elbo", '
                             '"eubo", ..., "exact_log_z", "reweighting": [...]} to PATH')
    return parser


def run(args: argparse.Namespace) -> int:
    record = study.compute(study.ThermodynamicsSettings(
        source=args.source, checkpoint=args.checkpoint, hmc=args.hmc,
        thermalization=args.thermalization, n=args.n, batch_size=args.batch_size,
        seed=args.seed, device=args.device, bins=args.bins, reweight=tuple(args.reweight)))
    print(study.report(record))
    if args.json:
        ss.write_json(args.json, record)
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
