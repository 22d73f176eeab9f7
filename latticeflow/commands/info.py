"""``latticeflow info``: a human summary of an ensemble file or a checkpoint."""

from __future__ import annotations

import argparse
import json
import textwrap
import zipfile
from pathlib import Path

import numpy as np

from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import EnsembleReader
from latticeflow.ensemble.proposals import ProposalSummary, read_proposal_summary
from latticeflow.training import CHECKPOINT_NAME, checkpoint_path, read_checkpoint

CHECKPOINT_SUFFIXES = (".pt", ".pth")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "info", help="summarise an ensemble (.h5) or a checkpoint / run directory",
        description="Print what an ensemble or a checkpoint holds.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow info runs/quickstart/nmcmc.h5
              latticeflow info runs/quickstart"""),
    )
    parser.add_argument("path", type=Path, help="ensemble file, checkpoint file or run directory")
    parser.set_defaults(handler=run)


def _lines(pairs: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in pairs)


def ensemble_summary(path: Path) -> str:
    with EnsembleReader(path) as reader:
        meta = reader.metadata
        accepted = reader.read("accepted")
        chains = len(np.unique(reader.read("chain"))) if "chain" in meta.datasets else 1
        writer = reader.writer_pid
    pairs: list[tuple[str, object]] = [
        ("file", path), ("kind", "latticeflow ensemble (format v1)"), ("theory", meta.theory),
        ("parameters", json.dumps(meta.action_params, sort_keys=True)),
        ("lattice", "x".join(map(str, meta.lattice))), ("sampler", meta.sampler),
        ("n_complete", meta.n_complete), ("chains", chains),
        ("acceptance", f"{accepted.mean():.4f}" if len(accepted) else "n/a"),
        ("seed", meta.seed), ("sampler_params", json.dumps(meta.sampler_params, sort_keys=True)),
        ("created", meta.created), ("latticeflow", meta.latticeflow_version),
    ]
    if meta.checkpoint_sha256:
        pairs.append(("checkpoint_sha256", meta.checkpoint_sha256))
    if writer is not None:
        pairs.append(("being written", f"by pid {writer}; n_complete is as of now"))
    proposals = read_proposal_summary(path)
    if proposals is not None:
        pairs += _proposal_pairs(proposals)
    return _lines(pairs)


def _proposal_pairs(summary: ProposalSummary) -> list[tuple[str, object]]:
    """The NMCMC proposal diagnostics (over all proposals, not the stored rows)."""
    k = "n/a (too few proposals)" if summary.pareto_k is None else f"{summary.pareto_k:.3f}"
    return [("proposals", summary.proposals),
            ("proposal ESS", f"{summary.ess:.4f}"), ("proposal Pareto k", k),
            ("non-finite proposals", summary.nonfinite)]


def checkpoint_summary(path: Path) -> str:
    state, digest = read_checkpoint(path)
    recipe = state["recipe"]
    training = recipe.get("training", {})
    ess = state["ess"]
    return _lines([
        ("file", path), ("kind", "latticeflow checkpoint"), ("recipe", recipe.get("name")),
        ("theory", state["theory"]),
        ("parameters", json.dumps(state["action"], sort_keys=True)),
        ("lattice", "x".join(map(str, state["lattice"]))),
        ("architecture", json.dumps(state["architecture"], sort_keys=True)),
        ("estimator", training.get("estimator")),
        ("step", f"{state['step']} of {training.get('steps')}"),
        ("last ESS", "n/a" if ess is None else f"{ess:.4f} (step {state['ess_step']})"),
        ("skipped steps", state["skipped_steps"]),
        ("training time", f"{state['wall_time']:.0f} s"), ("sha256", digest),
    ])


def run(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.exists():
        raise LatticeflowError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise LatticeflowError(f"{path}: a directory without {CHECKPOINT_NAME} (not a run "
                                   f"directory)")
        summary = checkpoint_summary(checkpoint_path(path))
    elif path.suffix in CHECKPOINT_SUFFIXES or (path.suffix not in (".h5", ".hdf5")
                                                and zipfile.is_zipfile(path)):
        summary = checkpoint_summary(path)  # torch checkpoints are zip archives
    else:
        summary = ensemble_summary(path)
    print(summary)
    return 0
