#!/usr/bin/env python3
"""ESS of trained flows on fresh samples, with their training time (own and whole lineage).

For each run directory it draws ``--n`` fresh independent samples x ~ q in batches, and prints
the normalised ESS (Σw)²/(N Σw²) of w = e^{−S}/q, the sampling seconds, and the training wall
time recorded in the checkpoint; the lineage time adds the run directories of the recipe's
``init_from`` ancestors (found next to it, ``<recipe dir>/<name>``). ``--json FILE`` also
writes the rows.
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
from latticeflow.training import CHECKPOINT_NAME
from latticeflow.training.checkpoint import checkpoint_path, read_checkpoint

EXAMPLES = ("python analysis/flow_ess.py runs/phi4_L16 runs/phi4_L32 --n 16384",)


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("flow_ess.py", __doc__, EXAMPLES)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (or checkpoints)")
    parser.add_argument("--n", type=int, default=16384, help="fresh samples (default: 16384)")
    parser.add_argument("--batch", type=int, default=1024, help="batch size (default: 1024)")
    parser.add_argument("--seed", type=int, default=12345, help="sampling seed")
    parser.add_argument("--lattice", type=int, metavar="L",
                        help="sample on L×L instead of the training lattice (weights do not "
                             "depend on L)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    return parser


def training_seconds(run: Path) -> tuple[float, float]:
    """(own, lineage) training wall seconds of a run directory."""
    checkpoint = checkpoint_path(run)
    state, _ = read_checkpoint(checkpoint)
    own = total = float(state["wall_time"])
    recipe_dir = checkpoint.parent.parent   # a run directory is <recipe dir>/<name>
    init_from = state["recipe"].get("init_from")
    while init_from is not None:
        parent = lf.load_recipe(recipe_dir / init_from)
        checkpoint = parent.default_run_dir() / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise LatticeflowError(f"{run}: lineage link {checkpoint} is missing")
        total += float(read_checkpoint(checkpoint)[0]["wall_time"])
        recipe_dir, init_from = checkpoint.parent.parent, parent.init_from
    return own, total


def run(args: argparse.Namespace) -> int:
    if args.n < 2 or args.batch < 1:
        raise LatticeflowError("--n must be >= 2 and --batch >= 1")
    if args.json and args.json.exists():
        raise LatticeflowError(f"{args.json} exists; remove it first")
    rows = []
    for path in args.runs:
        flow = lf.load_flow(path, lattice=None if args.lattice is None
                            else f"{args.lattice}x{args.lattice}")
        value, seconds = fresh_ess(flow.flow, flow.action, args.n, args.batch,
                                   torch.Generator().manual_seed(args.seed))
        own, lineage = training_seconds(path)
        row = {"run": str(path), "lattice": list(flow.lattice), "step": flow.step,
               "n": args.n, "ess": value, "sampling_s": seconds,
               "training_s": own, "lineage_training_s": lineage}
        rows.append(row)
        print(f"{path}: ESS {row['ess']:.4f} on {args.n} fresh samples ({seconds:.0f} s), "
              f"step {flow.step}, training {own / 60:.1f} min (lineage {lineage / 60:.1f} min)",
              flush=True)
    if args.json:
        ss.write_json(args.json, rows)
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
