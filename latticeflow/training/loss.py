"""What one training step computes: :class:`TrainingLoss` (flow and estimator as one module, so
that DDP's forward wraps the estimator) and the step's reported statistics (:class:`StepStats`).

The fast-path estimators call ``torch.autograd.grad`` on intermediate tensors during the forward
pass (one input-only VJP per layer). That does not disturb DDP: those calls ask for gradients
with respect to layer inputs only, so autograd never reaches the parameters' gradient
accumulators, where DDP's reduction hooks sit; the hooks fire only in the final ``backward``.
Every parameter receives a gradient in every estimator, so ``find_unused_parameters=False``
(tested against a single-process step on the concatenated batch in
``tests/test_distributed.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from latticeflow.estimators import EstimatorOutput
from latticeflow.flows import Flow
from latticeflow.theories import Action


class TrainingLoss(nn.Module):
    """The training loss of a batch as a module, so that DDP's forward wraps the estimator.

    ``forward(batch, reverse_noise)`` returns ``(loss to backprop, objective, log w)``; with
    ``reverse_noise`` (forward estimators with ``reverse_weight`` w > 0) the loss and objective
    are (1 − w)·main + w·(reverse-fastpath on the noise), and log w is the main estimator's.
    """

    def __init__(self, flow: Flow, action: Action,
                 estimator: Callable[[Flow, Action, Tensor], EstimatorOutput],
                 reverse_term: Callable[[Flow, Action, Tensor], EstimatorOutput],
                 reverse_weight: float):
        super().__init__()
        self.flow, self.action = flow, action
        self.estimator, self.reverse_term = estimator, reverse_term
        self.reverse_weight = reverse_weight

    def forward(self, batch: Tensor, reverse_noise: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.estimator(self.flow, self.action, batch)
        if reverse_noise is None:
            return out.surrogate, out.objective, out.log_weight
        w = self.reverse_weight
        reverse = self.reverse_term(self.flow, self.action, reverse_noise)
        return ((1 - w) * out.surrogate + w * reverse.surrogate,
                (1 - w) * out.objective + w * reverse.objective, out.log_weight)


@dataclass
class StepStats:
    """One step as reported (the same on every rank): ``loss`` (the objective of the global
    batch) and ``logw_std`` are NaN when the step is skipped; ``grad_norm`` is the norm of the
    (rank-averaged) gradient; ``interrupt``: some rank has a pending Ctrl-C."""

    loss: float
    logw_std: float
    finite: bool
    grad_norm: Tensor
    interrupt: bool


__all__ = ["StepStats", "TrainingLoss"]
