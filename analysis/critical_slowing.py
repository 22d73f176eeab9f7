#!/usr/bin/env python3
"""Critical slowing down of φ⁴ on the line m² = −4, m_p·L = 4: tuned HMC against neural MCMC.

For every L it reads ``RUNS/phi4_critical_L<L>.toml`` (or the ``--recipe`` name) and that
recipe's trained flow (``latticeflow run`` the recipe first), tunes HMC (chain count for
throughput, trajectory length and step size from pilot runs, equilibrium start), runs HMC and
neural MCMC for equal sampling wall time and reports <|m|> and χ₂ = V(<m²> − <m>²) with
Γ-method errors against a long HMC reference, τ_int of |m| and m², the acceptance, the cost
per independent χ₂ sample, the training time and the break-even number of independent samples,
and the dynamic exponent z of HMC. Writes ``critical_slowing.md``, ``critical_slowing.json``
and ``critical_slowing.png`` into ``--out`` (never replaced without --force). The reference
runs are cached in ``--out``/hmc_reference.json and reused while the action matches and the
cached budget is large enough (--new-reference reruns them). Method:
``latticeflow/studies/critical_slowing.py``. ``--quick`` is a smoke test on tiny budgets.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.studies import critical_slowing as cs
from latticeflow.studies import critical_slowing_report as report

EXAMPLES = (
    "python analysis/critical_slowing.py --out docs/critical_slowing",
    "python analysis/critical_slowing.py --L 8 16 --budget 120 --reference-factor 20 --out out",
    "python analysis/critical_slowing.py --recipe 'phi4_critical_heatbath_L{L}.toml' --L 16 32 "
    "--out out",
)
OUTPUTS = ("critical_slowing.md", "critical_slowing.json", "critical_slowing.png")
CACHE = "hmc_reference.json"


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("critical_slowing.py", __doc__, EXAMPLES)
    parser.add_argument("--runs", type=Path, default=Path("runs"),
                        help="folder of the recipes (default: runs)")
    parser.add_argument("--recipe", default=cs.RECIPE_NAME, metavar="NAME",
                        help="recipe file name in --runs, {L} standing for the extent "
                             f"(default: {cs.RECIPE_NAME})")
    parser.add_argument("--L", type=int, nargs="+", default=[8, 16, 32, 64],
                        help="lattice extents of the critical line (default: 8 16 32 64)")
    parser.add_argument("--budget", type=float, default=60.0, metavar="SECONDS",
                        help="sampling wall time per sampler and L (default: 60)")
    parser.add_argument("--reference-factor", type=float, default=10.0, metavar="K",
                        help="HMC reference runs for K × the budget (default: 10)")
    parser.add_argument("--pilot", type=float, default=10.0, metavar="SECONDS",
                        help="HMC pilot run per trajectory length (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: ~1 s budgets, few chains, short tuning")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder (created; existing outputs need --force)")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument("--new-reference", action="store_true",
                        help="rerun the HMC reference runs instead of reusing the cache")
    return parser


def settings_from(args: argparse.Namespace) -> cs.SlowingSettings:
    if args.quick:
        return cs.SlowingSettings(budget_s=1.0, reference_factor=2.0, chain_counts=(1, 4, 16),
                                  throughput_trajectories=2, pilot_s=0.2, n_tune=20,
                                  therm_factor=2.0, nmcmc_batch=64, seed=args.seed)
    return cs.SlowingSettings(budget_s=args.budget, reference_factor=args.reference_factor,
                              pilot_s=args.pilot, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    if (args.budget <= 0 or args.reference_factor < 1 or args.pilot <= 0 or args.seed < 0
            or min(args.L) < 2):
        raise LatticeflowError("--budget and --pilot must be > 0, --reference-factor >= 1, "
                               "--seed >= 0, --L >= 2")
    if not args.quiet:
        logging.getLogger("latticeflow").setLevel(logging.INFO)
    existing = [args.out / name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.force:
        raise LatticeflowError(f"{existing[0]} exists; use --force to replace it")
    sizes = sorted(set(args.L))
    inputs = [cs.check_trained(path, L)
              for path, L in zip(cs.critical_recipes(args.runs, sizes, args.recipe), sizes,
                                 strict=True)]
    settings = settings_from(args)
    cache_path = args.out / CACHE
    cache = {} if args.new_reference or not cache_path.exists() else _read(cache_path)
    ss.check_output_dir(args.out)
    points = cs.run_critical_slowing(inputs, settings, cache,
                                     on_reference=lambda c: ss.write_json(cache_path, c))
    table = report.markdown_table(points)
    (args.out / "critical_slowing.md").write_text(table + "\n")
    ss.write_json(args.out / "critical_slowing.json", report.records(points, settings))
    report.plot(points, args.out / "critical_slowing.png")
    print(table)
    print(f"wrote {', '.join(str(args.out / name) for name in OUTPUTS)}")
    return ss.EXIT_OK


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LatticeflowError(f"{path}: unreadable reference cache ({exc}); use "
                               f"--new-reference") from None


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
