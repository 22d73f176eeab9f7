#!/usr/bin/env python3
"""Ablation of the φ⁴ flow's levers at an equal wall-clock training budget.

Trains each variant from scratch on one action card and lattice for ``--seconds`` of wall time,
then measures its ESS on ``--fresh`` fresh samples (method: ``latticeflow/studies/ablation.py``).
The variants: the Fourier Gaussian base alone; RealNVP (affine couplings) on a normal and on a
Fourier base; spline couplings on a normal and on a Fourier base; the last with the standard
reverse-KL estimator instead of the fast path; and Z₂-equivariant splines on a Fourier base.
``--transfer`` also measures each trained flow, untrained there, on larger
lattices. With ``--init RUN`` every variant starts from that run's trained weights instead: the
variants are then the trained flow continued as it is and with coarse levels added (identity at
first; ``latticeflow/flows/multiscale.py``). Writes ``ablation.md`` and ``ablation.json`` into
``--out``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.studies import ablation
from latticeflow.theories import load_action_card

EXAMPLES = ("python analysis/phi4_ablation.py actions/phi4_critical_L32.toml --L 32 "
            "--seconds 240 --out docs/phi4",
            "python analysis/phi4_ablation.py actions/phi4_critical_L32.toml --L 32 --init "
            "RUN --seconds 300 --batch 8 --lr 0.003 --out DIR")
OUTPUTS = ("ablation.md", "ablation.json")
FOURIER, SPLINE = {"base": "fourier"}, {"transform": "spline"}
VARIANTS = [
    ablation.Variant("Fourier base alone", {"base": "fourier", "n_couplings": 0}),
    ablation.Variant("affine, normal base"),
    ablation.Variant("affine, Fourier base", FOURIER),
    ablation.Variant("spline, normal base", SPLINE),
    ablation.Variant("spline, Fourier base", {**SPLINE, **FOURIER}),
    ablation.Variant("spline, Fourier base", {**SPLINE, **FOURIER}, "reverse-standard"),
    ablation.Variant("Z₂ spline, Fourier base", {**SPLINE, **FOURIER, "z2": True}),
    ablation.Variant("spline, Fourier base, even sites by heat bath",
                     {**SPLINE, **FOURIER, "heat_bath": True}),
]

def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("phi4_ablation.py", __doc__, EXAMPLES)
    parser.add_argument("card", type=Path, help="a phi4 action card")
    parser.add_argument("--L", type=int, required=True, help="lattice extent (L×L)")
    parser.add_argument("--seconds", type=float, default=240.0,
                        help="training wall time per variant (default: 240)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="peak learning rate of Adam (default: 0.002)")
    parser.add_argument("--transfer", type=int, nargs="+", default=[], metavar="L",
                        help="also measure each trained flow on these (even) extents")
    parser.add_argument("--fresh", type=int, default=16384,
                        help="fresh samples for the ESS (default: 16384)")
    parser.add_argument("--init", type=Path, metavar="RUN",
                        help="start every variant from this run's (or checkpoint's) weights")
    parser.add_argument("--only", type=int, nargs="+", metavar="I",
                        help="run only these variants (0-based indices)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    return parser


def run(args: argparse.Namespace) -> int:
    action = load_action_card(args.card)
    if action.theory != "phi4":
        raise LatticeflowError(f"{args.card}: a {action.theory} card; the ablation needs phi4")
    if any(n < 4 or n % 2 for n in [args.L, *args.transfer]):
        raise LatticeflowError("--L and --transfer extents must be even and >= 4")
    if args.seconds <= 0 or args.batch < 1 or args.fresh < 2 or args.lr <= 0:
        raise LatticeflowError("--seconds, --batch, --fresh and --lr must be positive")
    existing = [args.out / name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.force:
        raise LatticeflowError(f"{existing[0]} exists; use --force to replace it")
    start = None if args.init is None else ablation.Start.from_run(args.init)
    catalogue = VARIANTS if start is None else ablation.COARSE_LEVEL_VARIANTS
    if args.only and not all(0 <= i < len(catalogue) for i in args.only):
        raise LatticeflowError(f"--only: variant indices run from 0 to {len(catalogue) - 1}")
    variants = [catalogue[i] for i in args.only] if args.only else catalogue
    settings = ablation.AblationSettings(seconds=args.seconds, batch_size=args.batch,
                                         n_fresh=args.fresh, lr=args.lr,
                                         transfer=tuple(args.transfer))
    rows = ablation.run_ablation(variants, action, (args.L, args.L), settings, start=start)
    ss.check_output_dir(args.out)
    origin = "from scratch" if args.init is None else f"from the weights of {args.init}"
    title = (f"φ⁴ ablation, {args.card.name} on {args.L}×{args.L}: {args.seconds:.0f} s of "
             f"training per variant {origin}, batch {args.batch}, peak learning rate {args.lr:g}, "
             f"ESS on {args.fresh} fresh samples.")
    table = ablation.markdown_table(rows, title)
    (args.out / "ablation.md").write_text(table + "\n")
    ss.write_json(args.out / "ablation.json", {"settings": vars(settings),
                                               "card": str(args.card), "L": args.L,
                                               "init": None if args.init is None
                                               else str(args.init),
                                               "rows": ablation.records(rows)})
    print(table)
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
