"""``latticeflow hmc``: the conventional HMC baseline into an HDF5 ensemble."""

from __future__ import annotations

import argparse
import logging
import math
import textwrap
from pathlib import Path

from latticeflow.commands._chainfile import (
    add_output_options,
    check_counts,
    run_to_file,
)
from latticeflow.device import select_device
from latticeflow.ensemble.output import check_seed, open_output
from latticeflow.errors import LatticeflowError
from latticeflow.lattice import lattice_shape
from latticeflow.samplers.hmc import INTEGRATORS, HMCConfig, HMCSampler
from latticeflow.theories import load_action_card

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
    check_counts(args)
    check_seed(args.seed, "--seed")
    select_device(args.device)  # rejects an unknown or absent device
    action = load_action_card(args.action_card)
    try:
        action.field_shape(args.lattice)  # rejects a lattice the theory cannot take
    except ValueError as exc:
        raise LatticeflowError(f"--lattice {'x'.join(map(str, args.lattice))}: {exc}") from None
    config = HMCConfig(step_size=args.step_size, trajectory_length=args.trajectory_length,
                       integrator=args.integrator, n_chains=args.chains, n_therm=args.therm,
                       save_every=args.save_every,
                       target_accept=args.target_accept or None, dtype=args.dtype,
                       device=args.device)
    sampler = HMCSampler(action, args.lattice, config, args.seed)
    header = sampler.header()
    log.debug("hmc: %r on lattice %s, %s", action, args.lattice, header["sampler_params"])
    expected = {"sampler": "hmc", "theory": header["theory"],
                "action_params": header["action_card"], "lattice": header["lattice"],
                "seed": header["seed"], "sampler_params": header["sampler_params"]}
    writer = open_output(args.out, args.resume, args.force, header, args.chunk, expected)

    def summary(_):
        return (f"acceptance {sampler.acceptance_rate:.3f}, ε = {sampler.step_size:.4g}, "
                f"{sampler.n_steps} steps per trajectory")

    return run_to_file(sampler, writer, args.n, args.chunk, summary)
