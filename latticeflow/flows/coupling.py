"""The masked elementwise coupling and the score recursion (fast path), written once.

A coupling splits the field into a frozen part F and an active part A (a boolean mask over the
field, without batch axis); its conditioner reads the visible part V ⊆ F (all of F by default).
It leaves y_F = x_F and maps every active component elementwise,
y_A = h(x_A; x_F), with derivative d = ∂y_A/∂x_A > 0 and log-determinant ℓ = Σ_A log d.
(The map may depend on x_F both through a conditioner and directly, as the U(1) link update does
through the plaquette it sits in; it must not couple different active components.)

Score recursion (DESIGN §4). With s_x = ∇_x log q(x) and y = T(x),

    s_{y,A} = (s_{x,A} − ∂ℓ/∂x_A) / d
    s_{y,F} = s_{x,F} − [(∂y_A/∂x_F)ᵀ s_{y,A} + ∂ℓ/∂x_F]

and the bracket is one vector–Jacobian product, of Σ y_A·sg(s_{y,A}) + ℓ with respect to x,
restricted to F. Subclasses give ∂ℓ/∂x_A in closed form (``dlog_deriv``) so that one input-only
VJP per layer suffices, and the detached score itself is computed without recording a graph.
The reverse direction, s_x = Jᵀ s_y + ∇_x ℓ, is the same VJP taken at the inverted point (on A
it is s_{y,A}·d + ∂ℓ/∂x_A); it drives the forward-KL fast path (DESIGN §4: the pull-back p♯ is
sampled by inverting data, and its score comes out of the inversion pass).

The VJP on F is :meth:`MaskedCoupling.frozen_vjp` for couplings that set
``closed_form_vjp``: their conditioners record their intermediate values, and the VJP is the
map's derivatives in closed form followed by the conditioner's input gradient layer by layer (no
autograd graph is walked and no parameter gradient is formed). Otherwise it is one
``autograd.grad`` over the layer's graph, taken with s_{y,A} as the output gradient of y.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ElementwiseUpdate:
    """The result of a coupling on a batch; all tensors have the shape of the field batch.

    ``y``: output field (y_F = x_F). ``log_deriv``: log ∂y_A/∂x_A on active components, zero on
    frozen ones. ``dlog_deriv``: ∂(log ∂y_A/∂x_A)/∂x_A on active components, zero elsewhere;
    only computed when asked for (``None`` otherwise, and for maps where it vanishes).
    """

    y: Tensor
    log_deriv: Tensor
    dlog_deriv: Tensor | None = None


def _sum_sites(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


class MaskedCoupling(nn.Module):
    """Base class: subclasses implement :meth:`condition`, :meth:`transform`, :meth:`untransform`.

    The conditioner output depends on the frozen part only, so it is the same whether computed
    from the input or from the output of the coupling; that lets every direction evaluate it once.
    """

    def __init__(self, active: Tensor, visible: Tensor | None = None):
        super().__init__()
        # Not persistent: masks follow the lattice the flow is built for, weights do not.
        self.register_buffer("active", active.bool(), persistent=False)
        if visible is not None and bool((visible.bool() & self.active).any()):
            raise ValueError("a coupling's conditioner may not read its own active components")
        self.register_buffer("visible", ~self.active if visible is None else visible.bool(),
                             persistent=False)

    def condition(self, x: Tensor) -> Any:
        """The conditioner output, a function of the frozen components of ``x`` only."""
        raise NotImplementedError

    def transform(self, x: Tensor, cond: Any, need_dlog: bool = False) -> ElementwiseUpdate:
        """Apply the coupling given its conditioner output, differentiably in ``x`` and ``cond``;
        ``need_dlog`` asks for ``dlog_deriv`` (the fast path needs it, sampling does not)."""
        raise NotImplementedError

    #: Whether :meth:`frozen_vjp` is implemented (else the score step uses autograd).
    closed_form_vjp = False

    def frozen_vjp(self, x: Tensor, cond: Any, score_active: Tensor) -> Tensor:
        """∇_x [Σ_A y_A·s_A + ℓ] at ``x`` on the frozen components, where ``cond`` is the
        conditioner output at ``x`` and s_A = ``score_active`` (zero on frozen components).

        Closed form, run without a graph; values on active components are unspecified.
        """
        raise NotImplementedError

    def untransform(self, y: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        """Return ``(x, log_deriv)`` with T(x) = y and ``log_deriv`` as in :meth:`transform` at x.

        Differentiable in ``y`` and ``cond`` with the correct first derivatives (implicit function
        theorem where the inverse is numerical).
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """y = T(x) and log|det ∂y/∂x| per configuration."""
        u = self.transform(x, self.condition(x))
        return u.y, _sum_sites(u.log_deriv)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """x = T⁻¹(y) and log|det ∂x/∂y| per configuration."""
        x, log_deriv = self.untransform(y, self.condition(y))
        return x, -_sum_sites(log_deriv)

    def forward_and_score(self, x: Tensor, score_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(y, log|det J|, s_y) from (x, s_x): one layer of the fast-path recursion.

        The returned ``y`` keeps its graph to the parameters (and to ``x``); the returned score is
        detached. Parameter gradients are never formed here: the VJP is in ``x`` only.
        """
        with torch.enable_grad():
            if not (self.closed_form_vjp or x.requires_grad):
                x = x.detach().requires_grad_(True)
            cond = self.condition(x)
            u = self.transform(x, cond, need_dlog=True)
            with torch.no_grad():  # the score is detached: record no graph for it
                if u.dlog_deriv is not None:
                    score_x = score_x - u.dlog_deriv
                score_active = torch.where(self.active, score_x * torch.exp(-u.log_deriv), 0.0)
                if self.closed_form_vjp:
                    vjp = self.frozen_vjp(x, cond, score_active)
            if not self.closed_form_vjp:
                (vjp,) = torch.autograd.grad((u.y, u.log_deriv.sum()), x,
                                             grad_outputs=(score_active, None), retain_graph=True)
        score_y = torch.where(self.active, score_active, score_x - vjp)
        return u.y, _sum_sites(u.log_deriv), score_y

    def inverse_and_score(self, y: Tensor, score_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, log|det ∂x/∂y|, s_x) from (y, s_y): the recursion run backwards, s_x = Jᵀs_y + ∇_xℓ.

        ``x`` keeps its graph to the parameters (and to ``y`` where it has one; implicit function
        theorem for numerical inverses); the score is detached. The conditioner is evaluated once
        and shared by the inversion and by the vector–Jacobian product.
        """
        if not self.closed_form_vjp:
            return self._inverse_and_score_by_autograd(y, score_y)
        with torch.enable_grad():
            cond = self.condition(y)
            x, log_deriv = self.untransform(y, cond)
        with torch.no_grad():
            score_active = torch.where(self.active, score_y, 0.0)
            at_x = self.transform(x, cond, need_dlog=True)
            grad_active = score_active * torch.exp(at_x.log_deriv)
            if at_x.dlog_deriv is not None:
                grad_active = grad_active + at_x.dlog_deriv
            score_x = torch.where(self.active, grad_active,
                                  score_y + self.frozen_vjp(x, cond, score_active))
        return x, -_sum_sites(log_deriv), score_x

    def _inverse_and_score_by_autograd(self, y: Tensor, score_y: Tensor
                                       ) -> tuple[Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            if not y.requires_grad:
                y = y.detach().requires_grad_(True)
            cond = self.condition(y)
            x, log_deriv = self.untransform(y, cond)
            probe = x.detach().requires_grad_(True)
            u = self.transform(torch.where(self.active, probe, y), cond)
            score_active = torch.where(self.active, score_y, 0.0).detach()
            grad_active, grad_frozen = torch.autograd.grad(
                (u.y, u.log_deriv.sum()), (probe, y), grad_outputs=(score_active, None),
                retain_graph=True)
        score_x = torch.where(self.active, grad_active, score_y + grad_frozen)
        return x, -_sum_sites(log_deriv), score_x
