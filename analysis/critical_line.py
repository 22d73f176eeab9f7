#!/usr/bin/env python3
"""φ⁴ line of constant physics: λ(L) at fixed m² with m_p·L = 4, from HMC.

For every L it runs HMC at three λ around a guess, measures the pole mass m_p from the
zero-momentum connected correlator and solves m_p(λ)·L = 4 by a weighted linear fit (method and
errors in ``latticeflow/studies/critical_line.py``). Writes ``critical_line.md`` and
``critical_line.json`` into ``--out``, and with ``--cards DIR`` one action card per L,
``phi4_critical_L<L>.toml``. ``--quick`` is a smoke test on tiny budgets.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.studies import critical_line as cl

EXAMPLES = (
    "python analysis/critical_line.py --L 8 16 32 64 --guess 6.0 5.1 4.7 4.45 --out docs/phi4",
    "python analysis/critical_line.py --quick --L 8 --guess 6.0 --out out/line",
)
OUTPUTS = ("critical_line.md", "critical_line.json")
CARD = """# analysis/critical_line.py: lam({L}) = {lam:.4f} +- {error:.4f}
description = "phi^4 on the line of constant physics m_p L = 4 at m2 = {m2:g}, L = {L}"
theory = "phi4"
form = "standard"
m2 = {m2:g}
lam = {lam:.4f}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("critical_line.py", __doc__, EXAMPLES)
    parser.add_argument("--L", type=int, nargs="+", required=True, help="lattice extents")
    parser.add_argument("--guess", type=float, nargs="+", required=True, metavar="λ",
                        help="a first guess of λ per L")
    parser.add_argument("--m2", type=float, default=-4.0, help="m² (default: -4)")
    parser.add_argument("--spacing", type=float, default=0.15, metavar="Δλ",
                        help="λ spacing of the three HMC runs (default: 0.15)")
    parser.add_argument("--trajectories", type=int, default=600, metavar="N",
                        help="production trajectories per run and chain (default: 600)")
    parser.add_argument("--chains", type=int, default=64, help="vectorised chains (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="HMC seed (default: 0)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 60 trajectories")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (created; existing outputs need --force)")
    parser.add_argument("--cards", type=Path, metavar="DIR",
                        help="also write one action card per L into DIR")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    return parser


def markdown_table(points: list[cl.CriticalPoint]) -> str:
    rows = []
    for p in points:
        runs = ", ".join(f"{q.lam:.3f}: {ss.format_value(q.mpl, q.error * q.L)}"
                         for q in p.points)
        seconds = sum(q.seconds for q in p.points)
        rows.append([str(p.L), ss.format_value(p.lam, p.error, 2), runs, f"{seconds:.0f}"])
    return ss.format_table(["L", "λ(L)", "m_p·L at λ (HMC)", "HMC s"], rows)


def run(args: argparse.Namespace) -> int:
    if len(args.L) != len(args.guess):
        raise LatticeflowError("give one --guess per --L")
    if min(args.L) < 4 or args.trajectories < 40 or args.chains < 1 or args.spacing <= 0:
        raise LatticeflowError("--L >= 4, --trajectories >= 40, --chains >= 1, --spacing > 0")
    if not args.quiet:
        logging.getLogger("latticeflow").setLevel(logging.INFO)
    targets = [args.out / name for name in OUTPUTS]
    if args.cards:
        targets += [args.cards / f"phi4_critical_L{L}.toml" for L in args.L]
    existing = [path for path in targets if path.exists()]
    if existing and not args.force:
        raise LatticeflowError(f"{existing[0]} exists; use --force to replace it")
    points = []
    for L, guess in zip(args.L, args.guess, strict=True):
        point = cl.find_critical_lambda(
            L, args.m2, guess, args.spacing, trajectories=60 if args.quick else args.trajectories,
            n_chains=args.chains, seed=args.seed, dtype="float32" if L >= 32 else "float64")
        points.append(point)
        print(f"L = {L}: λ = {point.lam:.4f} ± {point.error:.4f}", flush=True)
    ss.check_output_dir(args.out)
    table = markdown_table(points)
    (args.out / "critical_line.md").write_text(table + "\n")
    ss.write_json(args.out / "critical_line.json",
                  {"m2": args.m2, "target_mpl": cl.TARGET_MPL, "settings": vars(args) | {
                      "out": str(args.out), "cards": str(args.cards)},
                   "points": [p.to_dict() for p in points]})
    if args.cards:
        ss.check_output_dir(args.cards)
        for p in points:
            (args.cards / f"phi4_critical_L{p.L}.toml").write_text(
                CARD.format(m2=args.m2, L=p.L, lam=p.lam, error=p.error))
    print(table)
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
