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

TWO_PI = 2 * torch.pi


@dataclass
class NCPParams:
    """``log_scale``, ``weights``: ``(batch, K, ...)``; ``shift``: ``(batch, ...)``."""

    log_scale: Tensor
    weights: Tensor
    shift: Tensor


def ncp(u: Tensor, p: NCPParams, need_second: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """h(u), h'(u) and h''(u) (``None`` unless ``need_second``); u ∈ [0, 2π), ``(batch, ...)``.

    h'' is returned without a graph: it only enters the fast path's detached score.
    """
    a = torch.exp(p.log_scale)
    cos_u = torch.cos(u).unsqueeze(1)
    sin_u = torch.sin(u).unsqueeze(1)
    g = u.unsqueeze(1) + 2 * torch.atan((a - 1) * sin_u / (1 + a + (1 - a) * cos_u))
    a2 = a * a
    denom = 0.5 * (1 + a2) + 0.5 * (1 - a2) * cos_u
    dg = a / denom
    h = (p.weights * g).sum(1) + p.shift
    dh = (p.weights * dg).sum(1)
    if not need_second:
        return h, dh, None
    with torch.no_grad():
        d2g = a * (1 - a2) * sin_u / (2 * denom * denom)
        return h, dh, (p.weights * d2g).sum(1)


def ncp_inverse(v: Tensor, p: NCPParams) -> tuple[Tensor, Tensor, Tensor]:
    """u ∈ [0, 2π) with h(u) = v* ≡ v (mod 2π), v* ∈ [t, t + 2π); returns (u, v*, h'(u)).

    The root is found by :func:`solve_increasing` without a graph and then re-attached with one
    Newton step whose derivative is detached, u = u₀ − (h(u₀) − v*)/sg(h'(u₀)): the value is u₀ and
    the first derivatives in v and in the parameters are those of the implicit function theorem.
    """
    target = p.shift + torch.remainder(v - p.shift, TWO_PI)
    detached = NCPParams(p.log_scale.detach(), p.weights.detach(), p.shift.detach())
    root = solve_increasing(lambda w: ncp(w, detached, need_second=False)[:2],
                            target.detach(), 0.0, TWO_PI)
    h, dh, _ = ncp(root, p, need_second=False)
    u = root - (h - target) / dh.detach()
    return u, target, ncp(u, p, need_second=False)[1]
