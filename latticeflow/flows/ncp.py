"""Non-compact projection (NCP) maps of the circle: mixtures of tan-transforms plus a shift.

For u ∈ [0, 2π) and a scale a = e^s, the tan-transform g_s(u) = 2 arctan(a tan(u/2)) (on the
branch that maps [0, 2π) onto itself) is a smooth increasing bijection of the circle. It is
evaluated without a branch as u plus a periodic correction (arctan(x) − arctan(y) =
arctan((x − y)/(1 + xy)) for xy ≥ 0, with numerator and denominator multiplied by cos²(u/2)):

    g_s(u)   = u + 2 arctan((a − 1) sin u / (1 + a + (1 − a) cos u)),

which is continuous across u = π and u = 2π in any precision (a branch test on u/2 > π/2 flips
by 2π when rounding moves u across π). Its derivatives are

    g_s'(u)  = a / D,      D = cos²(u/2) + a² sin²(u/2) = ½(1 + a²) + ½(1 − a²) cos u,
    g_s''(u) = a (1 − a²) sin u / (2 D²).

The NCP map is h(u) = Σ_i ρ_i g_{s_i}(u) + t with mixture weights ρ = softmax(logits); it maps
[0, 2π) increasingly onto [t, t + 2π). Parameters carry the mixture axis K at position 1 (the
channel axis of the conditioner output), so nothing is transposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latticeflow.flows.rootfind import solve_increasing
from latticeflow.lattice import mod_2pi

TWO_PI = 2 * torch.pi


@dataclass
class NCPParams:
    """``log_scale``, ``weights``: ``(batch, K, ...)``; ``shift``: ``(batch, ...)``."""

    log_scale: Tensor
    weights: Tensor
    shift: Tensor


def _components(u: Tensor, p: NCPParams) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(g_s(u), g_s'(u), a, cos u, sin u) of every component, ``(batch, K, ...)``."""
    a = torch.exp(p.log_scale)
    cos_u = torch.cos(u).unsqueeze(1)
    sin_u = torch.sin(u).unsqueeze(1)
    g = u.unsqueeze(1) + 2 * torch.atan((a - 1) * sin_u / (1 + a + (1 - a) * cos_u))
    dg = a / (0.5 * (1 + a * a) + 0.5 * (1 - a * a) * cos_u)
    return g, dg, a, cos_u, sin_u


def _second(dg: Tensor, a: Tensor, sin_u: Tensor) -> Tensor:
    """g_s''(u) = a(1 − a²) sin u / (2D²) = g_s'² (1 − a²) sin u / (2a)."""
    return dg * dg * (1 - a * a) * sin_u / (2 * a)


def ncp(u: Tensor, p: NCPParams, need_second: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """h(u), h'(u) and h''(u) (``None`` unless ``need_second``); u ∈ [0, 2π), ``(batch, ...)``.

    h'' is returned without a graph: it only enters the fast path's detached score.
    """
    g, dg, a, _, sin_u = _components(u, p)
    h = (p.weights * g).sum(1) + p.shift
    dh = (p.weights * dg).sum(1)
    if not need_second:
        return h, dh, None
    with torch.no_grad():
        return h, dh, (p.weights * _second(dg, a, sin_u)).sum(1)


def ncp_log_deriv_vjp(u: Tensor, p: NCPParams, grad_h: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradient of Σ [grad_h · h(u) + log h'(u)] in u, log_scale, weights and shift, in
    closed form and without a graph (the NCP part of the fast path's score step).

    With D as above, ∂g/∂log a = sin u · g', ∂g'/∂log a = g' (1 − g' a (1 − cos u)) and
    ∂h/∂u = h', ∂log h'/∂u = h''/h'. Shapes follow ``u`` and ``p``.
    """
    g, dg, a, cos_u, sin_u = _components(u, p)
    dh = (p.weights * dg).sum(1)
    d2h = (p.weights * _second(dg, a, sin_u)).sum(1)
    inv_dh = (1 / dh).unsqueeze(1)
    grad_h_k = grad_h.unsqueeze(1)
    grad_u = grad_h * dh + d2h / dh
    grad_weights = grad_h_k * g + inv_dh * dg
    grad_log_scale = p.weights * dg * (grad_h_k * sin_u + inv_dh * (1 - dg * a * (1 - cos_u)))
    return grad_u, grad_log_scale, grad_weights, grad_h


def ncp_inverse(v: Tensor, p: NCPParams) -> tuple[Tensor, Tensor, Tensor]:
    """u ∈ [0, 2π) with h(u) = v* ≡ v (mod 2π), v* ∈ [t, t + 2π); returns (u, v*, h'(u)).

    The root is found by :func:`solve_increasing` without a graph and then re-attached with one
    Newton step whose derivative is detached, u = u₀ − (h(u₀) − v*)/sg(h'(u₀)): the value is u₀ and
    the first derivatives in v and in the parameters are those of the implicit function theorem.
    """
    target = p.shift + mod_2pi(v - p.shift)
    detached = NCPParams(p.log_scale.detach(), p.weights.detach(), p.shift.detach())
    root = solve_increasing(lambda w: ncp(w, detached, need_second=False)[:2],
                            target.detach(), 0.0, TWO_PI)
    h, dh, _ = ncp(root, p, need_second=False)
    u = root - (h - target) / dh.detach()
    return u, target, ncp(u, p, need_second=False)[1]
