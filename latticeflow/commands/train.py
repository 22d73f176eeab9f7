"""``latticeflow train``: train a flow from a run recipe (``runs/*.toml``).

Under ``torchrun`` (``torchrun --nproc_per_node=K -m latticeflow.cli train RECIPE``) the K
processes train one flow data-parallel; see :mod:`latticeflow.training.trainer` and docs/gpu.md.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

import torch

from latticeflow.base.distributed import distributed_session, label_logs
from latticeflow.base.errors import LatticeflowError
from latticeflow.config import load_recipe
from latticeflow.workflows.train import TrainSettings, train_run

log = logging.getLogger("latticeflow")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="train a flow from a run recipe",
        description="Train the flow of a run recipe (runs/*.toml). The output directory gets "
                    "checkpoint.pt, metrics.csv and training.png. An existing checkpoint is "
                    "never overwritten: continue it with --resume or start over with --force. "
                    "Ctrl-C writes a checkpoint of the last completed step. Under torchrun the "
                    "processes train data-parallel (training.batch_size per process); rank 0 "
                    "writes the files.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow train runs/quickstart.toml
              latticeflow train runs/phi4_L16.toml --steps 5000 --resume
              latticeflow train runs/phi4_L32.toml --init-from runs/phi4_L16
              torchrun --nproc_per_node=4 -m latticeflow.cli train runs/phi4_L32.toml --tf32"""),
    )
    parser.add_argument("recipe", type=Path, help="run recipe (TOML)")
    parser.add_argument("--steps", type=_non_negative, metavar="N",
                        help="total number of training steps (overrides training.steps)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the recipe)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output directory (default: <recipe directory>/<recipe name>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from the checkpoint in the output directory")
    mode.add_argument("--force", action="store_true",
                      help="start over, replacing an existing checkpoint, metrics and plot")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="start from the weights of another run (checkpoint file or run "
                             "directory; same theory and architecture, any lattice size); "
                             "default: the run of the recipe's init_from, trained first if "
                             "it is not complete")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 is often fastest on "
                             "a busy machine)")
    parser.add_argument("--tf32", action="store_true",
                        help="let float32 matmuls and convolutions use TF32 on CUDA during "
                             "training (faster on Ampere and later; sampling never uses it)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the couplings with torch.compile (recipe key "
                             "training.compile); compile time is logged before the first step "
                             "and not counted in the training time")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.steps is not None:
        overrides["training.steps"] = args.steps
    if args.device is not None:
        overrides["device"] = args.device
    if args.compile:
        overrides["training.compile"] = True
    recipe = load_recipe(args.recipe, overrides)
    if args.threads is not None:
        if args.threads < 1:
            raise LatticeflowError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = TrainSettings(out=args.out, resume=args.resume, force=args.force,
                             init_from=args.init_from, tf32=args.tf32, report=True,
                             lineage_overrides={k: v for k, v in overrides.items()
                                                if k == "device"},
                             source=str(args.recipe))
    with distributed_session(recipe.device) as context:
        if context is not None:
            label_logs(context)
        train_run(recipe, settings, context)
    return 0
