"""The six gradient estimators of the KL divergences, behind one interface.

Every estimator maps ``(flow, action, batch)`` to an :class:`EstimatorOutput` whose
``surrogate`` is the scalar to backpropagate. For the reverse direction the batch is base noise
z ~ q₀; for the forward direction it is target data x ~ p (e.g. an HMC ensemble).

* ``reverse-standard``: ∇ mean[log q(T(z)) + S(T(z))] (total derivative).
* ``reverse-droppath``: path gradient; ∇_x log q at frozen parameters by autograd through the
  inverse flow, then ∇ mean[sg(∇_x log q + ∇_x S) · T(z)].
* ``reverse-fastpath``: the same gradient, with ∇_x log q from the score recursion that runs
  alongside sampling (no inverse).
* ``forward-standard``: maximum likelihood, ∇ −mean log q(x) through the inverse (implicit
  function theorem for numerically inverted layers).
* ``forward-droppath``: the path gradient of KL(p‖q), which has the reverse integrand under the
  data law: z = T⁻¹(x) is computed without a graph and the reverse drop-in estimator runs from z.
* ``forward-fastpath``: the same gradient written as the reverse KL of the pull-back p♯ against
  q₀, with ∇_z log p♯ propagated through the inversion pass by the score recursion.

``objective`` is the detached KL estimate up to constants: mean(log q + S) for the reverse
direction (= KL(q‖p) − log Z) and −mean log q(x) for the forward one (= KL(p‖q) + const).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from latticeflow.flows.flow import Flow
from latticeflow.theories.base import Action

ESTIMATORS = ("reverse-standard", "reverse-droppath", "reverse-fastpath",
              "forward-standard", "forward-droppath", "forward-fastpath")


@dataclass
class EstimatorOutput:
    """``surrogate``: scalar to backprop; ``objective``: detached scalar; ``log_weight``,
    ``action`` and ``log_q``: detached ``(batch,)`` with log w = −S − log q."""

    surrogate: Tensor
    objective: Tensor
    log_weight: Tensor
    action: Tensor
    log_q: Tensor


def _output(surrogate: Tensor, objective: Tensor, action: Tensor, log_q: Tensor
            ) -> EstimatorOutput:
    action, log_q = action.detach(), log_q.detach()
    return EstimatorOutput(surrogate, objective.detach(), -action - log_q, action, log_q)


def _sum_sites(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def _path_surrogate(x: Tensor, score_q: Tensor, action: Action) -> Tensor:
    """mean[sg(∇_x log q + ∇_x S) · x]: its gradient is E[(∇_x log q + ∇_x S) · ∂_θ x]."""
    g = (score_q - action.force(x.detach())).detach()
    return _sum_sites(g * x).mean()


def _score_by_inverse(flow: Flow, x: Tensor) -> Tensor:
    """∇_x log q(x) at fixed parameters, by autograd through the (implicit) inverse."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(flow.log_prob(x).sum(), x)
    return score


def _path_from_noise(flow: Flow, action: Action, z: Tensor, fast: bool) -> tuple[Tensor, Tensor,
                                                                                  Tensor]:
    """(surrogate, S, log q) of the path estimator started from base samples ``z``."""
    if fast:
        x, log_q, score = flow.forward_and_score(z)
    else:
        x, log_q = flow(z)
        score = _score_by_inverse(flow, x)
    return _path_surrogate(x, score, action), action(x.detach()), log_q


def reverse_standard(flow: Flow, action: Action, z: Tensor) -> EstimatorOutput:
    x, log_q = flow(z)
    s = action(x)
    loss = (log_q + s).mean()
    return _output(loss, loss, s, log_q)


def _reverse_path(fast: bool) -> Callable[[Flow, Action, Tensor], EstimatorOutput]:
    def estimator(flow: Flow, action: Action, z: Tensor) -> EstimatorOutput:
        surrogate, s, log_q = _path_from_noise(flow, action, z, fast)
        return _output(surrogate, (log_q + s).mean(), s, log_q)
    return estimator


def forward_standard(flow: Flow, action: Action, x: Tensor) -> EstimatorOutput:
    _, log_q = flow.inverse(x)
    loss = -log_q.mean()
    return _output(loss, loss, action(x), log_q)


def forward_droppath(flow: Flow, action: Action, x: Tensor) -> EstimatorOutput:
    with torch.no_grad():
        z, _ = flow.inverse(x)
    surrogate, s, log_q = _path_from_noise(flow, action, z, fast=False)
    return _output(surrogate, -log_q.mean(), s, log_q)


def forward_fastpath(flow: Flow, action: Action, x: Tensor) -> EstimatorOutput:
    """Path gradient of KL(p♯‖q₀) with z = T⁻¹(x): E[∇_z log(p♯/q₀)(z) · ∂_θ z].

    The pull-back score ∇_z log p♯ is propagated through the inversion pass itself (one VJP per
    layer), so neither a second forward pass nor autograd through the inverse is needed. It
    equals ``forward-droppath`` (the reverse integrand under the data law) to round-off.
    """
    z, log_q, score_z = flow.inverse_and_score(x, action.force(x))
    surrogate = _sum_sites((score_z - flow.prior.score(z)).detach() * z).mean()
    return _output(surrogate, -log_q.mean(), action(x), log_q)


_REGISTRY: dict[str, Callable[[Flow, Action, Tensor], EstimatorOutput]] = {
    "reverse-standard": reverse_standard,
    "reverse-droppath": _reverse_path(fast=False),
    "reverse-fastpath": _reverse_path(fast=True),
    "forward-standard": forward_standard,
    "forward-droppath": forward_droppath,
    "forward-fastpath": forward_fastpath,
}


def get_estimator(name: str) -> Callable[[Flow, Action, Tensor], EstimatorOutput]:
    """The estimator called ``name`` (one of :data:`ESTIMATORS`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return _REGISTRY[name]


def direction(name: str) -> str:
    """"reverse" (batches are base noise) or "forward" (batches are target data)."""
    return name.split("-", 1)[0]
