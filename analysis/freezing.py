#!/usr/bin/env python3
"""Topological freezing across the U(1) β ladder: where each sampler's gain comes from.

For every β it reads the recipe ``RUNS/u1_flow_beta<β>_L<L>.toml`` and its trained flow, and,
when it exists, the Haar-prior recipe ``RUNS/u1_haar_beta<β>_L<L>.toml`` (``[flow] prior =
"uniform"``) and its flow (``latticeflow run`` the recipes first). At equal sampling wall time
it compares (a) HMC tuned as a careful user tunes it and started from exact samples, (b) the
exact sampler, (c) independent Metropolis with the plaquette prior alone, (d) the plaquette-
prior flow and (e) the Haar-prior flow (left out, with a note, without its recipe): χ_t = ⟨Q²⟩/V
against the exact value, τ_int(Q²), the cost per independent Q² sample, the training seconds
(own and whole init_from lineage), the break-even number of independent samples N* against (a)
and the reliable flag (every chain ≥ 50 τ_int). Writes ``freezing.md``, ``freezing.json``,
``freezing.png`` and the Q histories (``charges.npz``, arrays ``<sampler>_beta<β>`` of shape
(rows per chain, chains)) into ``--out``; the method is documented in
``latticeflow/studies/freezing.py``. ``--quick`` is a smoke test on tiny budgets."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.studies import freezing
from latticeflow.studies import freezing_report as report

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
    parser.add_argument("--chain-counts", type=int, nargs="+", metavar="N",
                        default=list(freezing.FreezingSettings.chain_counts),
                        help="HMC chain counts whose throughput is measured (default: 1 4 16 "
                             "64 256 1024)")
    parser.add_argument("--pilot", type=float, default=10.0, metavar="SECONDS",
                        help="HMC pilot run per trajectory length (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 s per sampler, 1-16 HMC chains, short tuning")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (created; existing outputs need --force)")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    return parser


def run(args: argparse.Namespace) -> int:
    if (args.budget <= 0 or args.pilot <= 0 or min(args.chain_counts) < 1 or args.seed < 0
            or args.lattice < 1):
        raise LatticeflowError("--budget and --pilot must be > 0, --chain-counts and --lattice "
                               ">= 1, --seed >= 0")
    if not args.quiet:  # the per-β summary lines and progress bars
        logging.getLogger("latticeflow").setLevel(logging.INFO)
    existing = [args.out / name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.force:
        raise LatticeflowError(f"{existing[0]} exists; use --force to replace it")
    if args.quick:
        settings = freezing.FreezingSettings(
            budget_s=2.0, chain_counts=(1, 4, 16), throughput_trajectories=2,
            tau_factors=(0.5, 1.0), pilot_s=0.3, n_tune=20, batch=256, seed=args.seed)
    else:
        settings = freezing.FreezingSettings(budget_s=args.budget, seed=args.seed,
                                             chain_counts=tuple(sorted(set(args.chain_counts))),
                                             pilot_s=args.pilot)
    inputs = freezing.ladder_inputs(args.runs, sorted(args.betas), args.lattice)
    points = freezing.run_freezing_study(inputs, settings)
    ss.check_output_dir(args.out)
    table = report.markdown_table(points, (args.lattice, args.lattice))
    (args.out / "freezing.md").write_text(table + "\n")
    ss.write_json(args.out / "freezing.json", {
        "settings": asdict(settings), "rows": report.records(points),
        "points": [{"beta": p.beta, "hmc_tuning": p.hmc_tuning, "notes": p.notes}
                   for p in points]})
    report.plot(points, args.out / "freezing.png")
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
