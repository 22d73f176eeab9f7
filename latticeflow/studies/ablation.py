"""Ablation of the φ⁴ flow's levers at an equal wall-clock training budget.

Each variant (an architecture override and an estimator) is trained from scratch, or from the
same trained weights (:class:`Start`), on the same target for the same number of wall-clock
seconds, with Adam, a linear warm-up and a cosine decay
of the learning rate over the *time* budget (so every variant ends its schedule when its time is
up, whatever its cost per step). Its ESS is then measured on ``n_fresh`` fresh independent
samples, which are not part of the training budget. Rows report steps, seconds per step, the
final training objective mean(log q + S) and the ESS.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latticeflow.base.errors import LatticeflowError
from latticeflow.estimators import get_estimator
from latticeflow.flows import build_flow
from latticeflow.flows.samples import fresh_ess
from latticeflow.theories import Action
from latticeflow.training.checkpoint import (
    can_start_from,
    checkpoint_path,
    inherited_weights,
    read_checkpoint,
    with_legacy_keys,
)


@dataclass(frozen=True)
class Variant:
    """One row: a label, ``[flow]`` overrides and the estimator."""

    label: str
    architecture: dict[str, Any] = field(default_factory=dict)
    estimator: str = "reverse-fastpath"


@dataclass(frozen=True)
class AblationSettings:
    """The shared budget: ``seconds`` of training per variant, batch, peak learning rate,
    warm-up steps, gradient clipping, the fresh-sample count and batch, the seed, and the
    lattice extents ``transfer`` (L×L…) on which the trained weights are also measured."""

    seconds: float = 240.0
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    grad_clip: float = 10.0
    n_fresh: int = 16384
    fresh_batch: int = 512
    seed: int = 0
    transfer: tuple[int, ...] = ()


#: Variants for a :class:`Start`: overrides of the trained flow's architecture (coarse levels).
COARSE_LEVEL_VARIANTS = [
    Variant("the trained flow, continued"),
    Variant("+ coarse levels 4, 8, 16 (2 couplings each)",
            {"coarse": [4, 8, 16], "coarse_couplings": 2}),
    Variant("+ coarse levels 4, 8, 16 (4 couplings each)",
            {"coarse": [4, 8, 16], "coarse_couplings": 4}),
    Variant("+ coarse levels 2, 4, 8, 16 (2 couplings each)",
            {"coarse": [2, 4, 8, 16], "coarse_couplings": 2}),
]


@dataclass(frozen=True)
class Start:
    """Trained weights every variant starts from (a checkpoint's ``architecture`` and ``model``):
    a variant's overrides then apply to that architecture and may only add coarse levels, which
    start as the identity (:func:`~latticeflow.flows.multiscale.with_coarse_levels`)."""

    architecture: dict[str, Any]
    model: dict[str, torch.Tensor]

    @classmethod
    def from_run(cls, run: str | os.PathLike) -> Start:
        """The trained weights of a run directory or checkpoint file (any φ⁴ action)."""
        state, _ = read_checkpoint(checkpoint_path(run))
        if state["theory"] != "phi4":
            raise LatticeflowError(f"{run}: a {state['theory']} flow; the ablation needs phi4")
        return cls(with_legacy_keys("phi4", state["architecture"]), state["model"])

    def variant(self, variant: Variant) -> Variant:
        """``variant`` with its overrides resolved against the start's architecture."""
        return Variant(variant.label, {**self.architecture, **variant.architecture},
                       variant.estimator)

    def flow(self, variant: Variant, lattice: tuple[int, ...], action: Action
             ) -> torch.nn.Module:
        """The variant's flow on ``lattice`` for ``action``, holding the start's weights."""
        architecture = self.variant(variant).architecture
        if not can_start_from(self.architecture, architecture):
            raise ValueError(f"variant {variant.label!r} changes more than coarse levels")
        flow = build_flow("phi4", lattice, architecture, action.params())
        flow.load_state_dict(inherited_weights(self.model, self.architecture, architecture,
                                               flow.state_dict()))
        return flow


@dataclass
class AblationRow:
    label: str
    architecture: dict[str, Any]
    estimator: str
    parameters: int
    steps: int
    train_s: float
    s_per_step: float
    objective: float
    ess: float
    ess_s: float
    transfer_ess: dict[int, float] = field(default_factory=dict)


def train_for(variant: Variant, action: Action, lattice: tuple[int, ...],
              settings: AblationSettings, start: Start | None = None
              ) -> tuple[torch.nn.Module, int, float, float]:
    """Train ``variant`` for ``settings.seconds``, from scratch or from ``start``; returns
    (flow, steps, seconds, objective of the last 20 steps)."""
    torch.manual_seed(settings.seed)
    flow = (build_flow("phi4", lattice, variant.architecture, action.params()) if start is None
            else start.flow(variant, lattice, action))
    target = flow.training_target(action)
    estimator = get_estimator(variant.estimator)
    optimizer = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    recent: list[float] = []
    steps, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < settings.seconds:
        warm = min(1.0, (steps + 1) / settings.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * elapsed / settings.seconds))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warm * cosine
        out = estimator(flow, target, flow.sample_prior(settings.batch_size))
        optimizer.zero_grad()
        out.surrogate.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), settings.grad_clip)
        optimizer.step()
        steps += 1
        recent = (recent + [float(out.objective)])[-20:]
    return flow, steps, time.perf_counter() - started, sum(recent) / len(recent)


def run_ablation(variants: list[Variant], action: Action, lattice: tuple[int, ...],
                 settings: AblationSettings, log=print, start: Start | None = None
                 ) -> list[AblationRow]:
    """Every variant in turn (one at a time, so that they share the machine equally), each from
    scratch or each from ``start``."""
    rows = []
    for variant in variants:
        flow, steps, seconds, objective = train_for(variant, action, lattice, settings, start)
        if start is not None:
            variant = start.variant(variant)
        value, ess_s = fresh_ess(flow, action, settings.n_fresh, settings.fresh_batch,
                                 torch.Generator().manual_seed(settings.seed + 1))
        row = AblationRow(variant.label, variant.architecture, variant.estimator,
                          sum(p.numel() for p in flow.parameters()), steps, seconds,
                          seconds / max(steps, 1), objective, value, ess_s,
                          transfer_ess(flow, variant, action, lattice, settings))
        log(f"{row.label}: {steps} steps in {seconds:.0f} s, objective {objective:.4f}, "
            f"ESS {value:.4f}" + "".join(f", on L = {n}: {e:.4f}"
                                         for n, e in row.transfer_ess.items()))
        rows.append(row)
    return rows


def transfer_ess(flow: torch.nn.Module, variant: Variant, action: Action,
                 lattice: tuple[int, ...], settings: AblationSettings) -> dict[int, float]:
    """The fresh-sample ESS of ``flow``'s weights on each lattice of extent ``settings.transfer``
    (in every direction of ``lattice``), untrained there."""
    values = {}
    for extent in settings.transfer:
        moved = build_flow("phi4", (extent,) * len(lattice), variant.architecture,
                           action.params())
        moved.load_state_dict(flow.state_dict())
        values[extent], _ = fresh_ess(moved, action, settings.n_fresh, settings.fresh_batch,
                                      torch.Generator().manual_seed(settings.seed + 1))
    return values


def records(rows: list[AblationRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def markdown_table(rows: list[AblationRow], title: str) -> str:
    extents = sorted({n for r in rows for n in r.transfer_ess})
    lines = [title, "", "| variant | estimator | parameters | steps | s/step | mean(log q + S) "
             "| ESS (fresh) |" + "".join(f" ESS on L = {n} |" for n in extents),
             "|---|---|---|---|---|---|---|" + "---|" * len(extents)]
    for r in rows:
        lines.append(f"| {r.label} | {r.estimator} | {r.parameters} | {r.steps} "
                     f"| {r.s_per_step:.3f} | {r.objective:.3f} | {r.ess:.4f} |"
                     + "".join(f" {r.transfer_ess[n]:.4f} |" if n in r.transfer_ess else " — |"
                               for n in extents))
    return "\n".join(lines)
