"""The masked elementwise coupling and the score recursion (fast path), written once.

A coupling splits the field into a frozen part F and an active part A (a boolean mask over the
field, without batch axis). It leaves y_F = x_F and maps every active component elementwise,
y_A = h(x_A; x_F), with derivative d = ∂y_A/∂x_A > 0 and log-determinant ℓ = Σ_A log d.
(The map may depend on x_F both through a conditioner and directly, as the U(1) link update does
through the plaquette it sits in; it must not couple different active components.)

Score recursion (DESIGN §4). With s_x = ∇_x log q(x) and y = T(x),

    s_{y,A} = (s_{x,A} − ∂ℓ/∂x_A) / d
    s_{y,F} = s_{x,F} − [(∂y_A/∂x_F)ᵀ s_{y,A} + ∂ℓ/∂x_F]

and the bracket is one vector–Jacobian product, of Σ y_A·sg(s_{y,A}) + ℓ with respect to x,
restricted to F. Subclasses give ∂ℓ/∂x_A in closed form (``dlog_deriv``) so that one input-only
VJP per layer suffices. The reverse direction, s_x = Jᵀ s_y + ∇_x ℓ, is the same VJP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ElementwiseUpdate:
    """The result of a coupling on a batch; all tensors have the shape of the field batch.

    ``y``: output field (y_F = x_F). ``log_deriv``: log ∂y_A/∂x_A on active components, zero on
    frozen ones. ``dlog_deriv``: ∂(log ∂y_A/∂x_A)/∂x_A on active components, zero elsewhere.
    """

    y: Tensor
    log_deriv: Tensor
    dlog_deriv: Tensor


def _sum_sites(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


class MaskedCoupling(nn.Module):
    """Base class: subclasses implement :meth:`update` and :meth:`invert`."""

    def __init__(self, active: Tensor):
        super().__init__()
        # Not persistent: masks follow the lattice the flow is built for, weights do not.
        self.register_buffer("active", active.bool(), persistent=False)

    def update(self, x: Tensor) -> ElementwiseUpdate:
        """Apply the coupling, differentiably in ``x`` and in the parameters."""
        raise NotImplementedError

    def invert(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x, log_deriv)`` with T(x) = y and ``log_deriv`` as in :meth:`update` at x.

        Differentiable in ``y`` and the parameters with the correct first derivatives (implicit
        function theorem where the inverse is numerical).
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """y = T(x) and log|det ∂y/∂x| per configuration."""
        u = self.update(x)
        return u.y, _sum_sites(u.log_deriv)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """x = T⁻¹(y) and log|det ∂x/∂y| per configuration."""
        x, log_deriv = self.invert(y)
        return x, -_sum_sites(log_deriv)

    def forward_and_score(self, x: Tensor, score_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(y, log|det J|, s_y) from (x, s_x): one layer of the fast-path recursion.

        The returned ``y`` keeps its graph to the parameters (and to ``x``); the returned score is
        detached. Parameter gradients are never formed here: the VJP asks for ``x`` only.
        """
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            u = self.update(x)
            score_active = (score_x - u.dlog_deriv) * torch.exp(-u.log_deriv)
            score_active = torch.where(self.active, score_active, 0.0).detach()
            (vjp,) = torch.autograd.grad(
                (u.y * score_active).sum() + u.log_deriv.sum(), x, retain_graph=True
            )
        score_y = torch.where(self.active, score_active, score_x - vjp)
        return u.y, _sum_sites(u.log_deriv), score_y

    def inverse_and_score(self, y: Tensor, score_y: Tensor) -> tuple[Tensor, Tensor]:
        """(x, s_x) from (y, s_y), s_x = Jᵀ s_y + ∇_x ℓ: the recursion run backwards.

        Both outputs are detached; used to pull a score back through the flow.
        """
        with torch.no_grad():
            x, _ = self.invert(y)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            u = self.update(x)
            score_active = torch.where(self.active, score_y, 0.0).detach()
            (vjp,) = torch.autograd.grad((u.y * score_active).sum() + u.log_deriv.sum(), x)
        return x.detach(), torch.where(self.active, vjp, score_y + vjp)
