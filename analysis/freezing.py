#!/usr/bin/env python3
"""Topological freezing: HMC against neural MCMC across the U(1) β ladder.

For every β it reads the recipe ``RUNS/u1_beta<β>_L<L>.toml`` and that recipe's trained flow
(``latticeflow run`` the recipe first), draws an HMC and a neural-MCMC ensemble of equal sampling
wall time, and reports χ_t = ⟨Q²⟩/V against the exact value, τ_int(Q²), the acceptance and the
cost per independent Q² sample (wall seconds × 2τ_int / N) of both samplers. Writes
``freezing.md``, ``freezing.json``, ``freezing.png`` and the Q histories (``charges.npz``, arrays
``<sampler>_beta<β>`` of shape (rows per chain, chains)) into ``--out``; the method is documented
in ``latticeflow/studies/freezing.py``. ``--quick`` is a smoke test on tiny budgets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from latticeflow import script_support as ss
from latticeflow.errors import LatticeflowError
from latticeflow.studies import freezing

EXAMPLES = (
    "python analysis/freezing.py --out docs/freezing",
    "python analysis/freezing.py --betas 2 4 6 --budget 120 --out out/freezing",
)
OUTPUTS = ("freezing.md", "freezing.json", "freezing.png", "charges.npz")


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("freezing.py", __doc__, EXAMPLES)
    parser.add_argument("--runs", type=Path, default=Path("runs"),
                        help="folder of the recipes (default: runs)")
    parser.add_argument("--betas", type=float, nargs="+", default=[2, 3, 4, 5, 6],
                        metavar="β", help="the β ladder (default: 2 3 4 5 6)")
    parser.add_argument("--lattice", type=int, default=8, metavar="L",
                        help="lattice extent L of the recipes (default: 8)")
    parser.add_argument("--budget", type=float, default=60.0, metavar="SECONDS",
                        help="sampling wall time per sampler and β (default: 60)")
    parser.add_argument("--hmc-chains", type=int, default=16, metavar="N",
                        help="vectorised HMC chains (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 s per sampler, 20 HMC thermalisation trajectories")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (created; existing outputs need --force)")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.budget <= 0 or args.hmc_chains < 1 or args.seed < 0 or args.lattice < 1:
        raise LatticeflowError("--budget must be > 0, --hmc-chains and --lattice >= 1, "
                               "--seed >= 0")
    if not args.quiet:  # the per-β summary lines and progress bars
        logging.getLogger("latticeflow").setLevel(logging.INFO)
    existing = [args.out / name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.force:
        raise LatticeflowError(f"{existing[0]} exists; use --force to replace it")
    settings = freezing.FreezingSettings(
        budget_s=2.0 if args.quick else args.budget, hmc_chains=args.hmc_chains,
        hmc_therm=20 if args.quick else 200, seed=args.seed,
        nmcmc_batch=256 if args.quick else 1024)
    recipes = freezing.ladder_recipes(args.runs, sorted(args.betas), args.lattice)
    points = freezing.run_freezing_study(recipes, settings)
    ss.check_output_dir(args.out)
    table = freezing.markdown_table(points, (args.lattice, args.lattice))
    (args.out / "freezing.md").write_text(table + "\n")
    ss.write_json(args.out / "freezing.json", {"settings": vars(settings),
                                               "rows": freezing.records(points)})
    freezing.plot(points, args.out / "freezing.png")
    histories = {f"{name}_beta{point.beta:g}": q.astype(np.int16)
                 for point in points for name, q in point.charges.items()}
    np.savez_compressed(args.out / "charges.npz", **histories)
    print(table)
    print(f"wrote {', '.join(str(args.out / name) for name in OUTPUTS)}")
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
