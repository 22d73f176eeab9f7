"""``latticeflow hmc``: the conventional HMC baseline into an HDF5 ensemble."""

from __future__ import annotations

import argparse
import logging
import math
import textwrap
from pathlib import Path

from latticeflow.base.errors import EXIT_INTERRUPTED, EXIT_OK
from latticeflow.commands._chainfile import add_output_options
from latticeflow.lattice import lattice_shape
from latticeflow.samplers.hmc import INTEGRATORS
from latticeflow.workflows.chainfile import OPTION_NAMES
from latticeflow.workflows.hmc import HMCRunSettings, hmc_run

log = logging.getLogger("latticeflow")


def parse_lattice(text: str) -> tuple[int, ...]:
    """argparse type: ``"8x8"`` → ``(8, 8)``."""
    return lattice_shape(text, "--lattice", "8x8")


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "hmc", help="HMC baseline ensemble for an action card",
        description="Hybrid Monte Carlo with the analytic force; writes an HDF5 ensemble "
                    "(schema in docs/ensemble-format.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow hmc actions/u1_beta2.toml --lattice 8x8 --n 10000 --out u1.h5
              latticeflow hmc actions/phi4_m2-4_lam8.toml --lattice 8x8 --n 5000 \\
                  --target-accept 0.8 --chains 4 --out phi4_hmc.h5
              latticeflow hmc actions/u1_beta2.toml --lattice 8x8 --n 20000 --out u1.h5 \\
                  --resume"""),
    )
    parser.add_argument("action_card", type=Path, help="action card (actions/*.toml)")
    parser.add_argument("--lattice", required=True, type=parse_lattice, help="e.g. 8x8")
    parser.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    add_output_options(parser, default_chunk=100)
    parser.add_argument("--step-size", type=finite_float, default=0.1,
                        help="ε (start value if tuned)")
    parser.add_argument("--trajectory-length", type=finite_float, default=1.0,
                        help="τ = n_steps·ε")
    parser.add_argument("--integrator", choices=tuple(INTEGRATORS), default="omelyan")
    parser.add_argument("--target-accept", type=finite_float, default=0.8,
                        help="tune ε to this acceptance during thermalisation (0 disables)")
    parser.add_argument("--therm", type=int, default=200, help="thermalisation trajectories")
    parser.add_argument("--save-every", type=int, default=1, help="store every k-th trajectory")
    parser.add_argument("--chains", type=int, default=1, help="independent chains, vectorised")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = HMCRunSettings(
        out=args.out, n=args.n, chunk=args.chunk, step_size=args.step_size,
        trajectory_length=args.trajectory_length, integrator=args.integrator,
        target_accept=args.target_accept, therm=args.therm, save_every=args.save_every,
        chains=args.chains, seed=args.seed, device=args.device, dtype=args.dtype,
        resume=args.resume, force=args.force, names=OPTION_NAMES)
    result = hmc_run(args.action_card, args.lattice, settings)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK
