#!/usr/bin/env python3
"""ESS of trained flows on fresh samples, with their training time (own and whole lineage).

For each run directory it draws ``--n`` fresh independent samples x ~ q in batches, and prints
the normalised ESS (Σw)²/(N Σw²) of w = e^{−S}/q, the sampling seconds, and the training wall
time recorded in the checkpoint; the lineage time adds the run directories of the recipe's
``init_from`` ancestors (found next to it, ``<recipe dir>/<name>``) whose weights the run
started from. ``--json FILE`` also
writes the rows.

``--diagonal-shifts K`` (and ``--z2``) measures instead the ESS of the flow averaged over the
lattice shifts (k, k, …), k < K (and φ → −φ): the mixture (1/|G|) Σ_g q(g⁻¹ y) of
:mod:`latticeflow.flows.symmetrize`, whose draws cost about |G| plain ones. Against the plain
ESS it shows how much of the flow's error is broken symmetry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import latticeflow as lf
from latticeflow import script_support as ss
from latticeflow.base.errors import LatticeflowError
from latticeflow.flows.samples import fresh_ess
from latticeflow.flows.symmetrize import SymmetrizedFlow, diagonal_shifts
from latticeflow.training.checkpoint import checkpoint_path, read_checkpoint
from latticeflow.training.lineage import lineage_training_seconds

EXAMPLES = ("python analysis/flow_ess.py runs/phi4_L16 runs/phi4_L32 --n 16384",
            "python analysis/flow_ess.py runs/phi4_critical_heatbath_L32 --diagonal-shifts 16")


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("flow_ess.py", __doc__, EXAMPLES)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (or checkpoints)")
    parser.add_argument("--n", type=int, default=16384, help="fresh samples (default: 16384)")
    parser.add_argument("--batch", type=int, default=1024, help="batch size (default: 1024)")
    parser.add_argument("--seed", type=int, default=12345, help="sampling seed")
    parser.add_argument("--lattice", type=int, metavar="L",
                        help="sample on L×L instead of the training lattice (weights do not "
                             "depend on L)")
    parser.add_argument("--diagonal-shifts", type=int, metavar="K",
                        help="average the flow's density over the shifts (k, k, ...), k < K")
    parser.add_argument("--z2", action="store_true",
                        help="average over phi -> -phi as well (with --diagonal-shifts)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    return parser


def training_seconds(run: Path) -> tuple[float, float]:
    """(own, lineage) training wall seconds of a run directory (its recipe is the file
    ``<name>.toml`` beside the run directory, as ``latticeflow run`` lays them out)."""
    checkpoint = checkpoint_path(run)
    state, _ = read_checkpoint(checkpoint)
    recipe_file = checkpoint.parent.parent / f"{state['recipe']['name']}.toml"
    if not recipe_file.is_file():
        if state["recipe"].get("init_from") is not None:
            raise LatticeflowError(f"{run}: its recipe {recipe_file} is missing, so its "
                                   f"init_from lineage cannot be followed")
        return float(state["wall_time"]), float(state["wall_time"])
    own, lineage = lineage_training_seconds(lf.load_recipe(recipe_file), state)
    if lineage is None:
        raise LatticeflowError(f"{run}: a checkpoint of its init_from lineage is missing")
    return own, lineage


def run(args: argparse.Namespace) -> int:
    if args.n < 2 or args.batch < 1:
        raise LatticeflowError("--n must be >= 2 and --batch >= 1")
    if args.diagonal_shifts is not None and args.diagonal_shifts < 1:
        raise LatticeflowError("--diagonal-shifts must be >= 1")
    if args.z2 and args.diagonal_shifts is None:
        raise LatticeflowError("--z2 needs --diagonal-shifts (use --diagonal-shifts 1 for "
                               "phi -> -phi alone)")
    if args.json and args.json.exists():
        raise LatticeflowError(f"{args.json} exists; remove it first")
    rows = []
    for path in args.runs:
        flow = lf.load_flow(path, lattice=None if args.lattice is None
                            else f"{args.lattice}x{args.lattice}")
        sampler, symmetries = flow.flow, 1
        if args.diagonal_shifts is not None:
            try:
                sampler = SymmetrizedFlow(flow.flow, diagonal_shifts(
                    len(flow.lattice), args.diagonal_shifts, args.z2))
            except ValueError as error:
                raise LatticeflowError(f"{path}: {error}") from None
            symmetries = len(sampler.symmetries)
        value, seconds = fresh_ess(sampler, flow.action, args.n, args.batch,
                                   torch.Generator().manual_seed(args.seed))
        own, lineage = training_seconds(path)
        row = {"run": str(path), "lattice": list(flow.lattice), "step": flow.step,
               "n": args.n, "symmetries": symmetries, "ess": value, "sampling_s": seconds,
               "training_s": own, "lineage_training_s": lineage}
        rows.append(row)
        averaged = f" (averaged over {symmetries} symmetries)" if symmetries > 1 else ""
        print(f"{path}: ESS {row['ess']:.4f}{averaged} on {args.n} fresh samples "
              f"({seconds:.0f} s), "
              f"step {flow.step}, training {own / 60:.1f} min (lineage {lineage / 60:.1f} min)",
              flush=True)
    if args.json:
        ss.write_json(args.json, rows)
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
