"""Monotone rational-quadratic splines: the elementwise map, its derivatives and its inverse.

A spline of K bins on [x₀, x_K] has knots (x_i, y_i), i = 0..K, increasing in both coordinates,
and positive slopes δ_i at the knots. On bin i, with w = x_{i+1} − x_i, h = y_{i+1} − y_i,
s = h/w, ξ = (x − x_i)/w ∈ [0, 1] and Δ = δ_i + δ_{i+1} − 2s,

    y  = y_i + h [s ξ² + δ_i ξ(1 − ξ)] / D,     D = s + Δ ξ(1 − ξ),
    y' = s² N / D²,                             N = δ_{i+1} ξ² + 2s ξ(1 − ξ) + δ_i (1 − ξ)²,
    (log y')' = (N_ξ / N − 2 D_ξ / D) / w,      N_ξ = 2δ_{i+1} ξ + 2s(1 − 2ξ) − 2δ_i(1 − ξ),
                                                D_ξ = Δ (1 − 2ξ).

The map is C¹ (y' = δ_i at knot i from both sides) and strictly increasing. Its inverse solves,
with r = y − y_i, the quadratic a ξ² + b ξ + c = 0, a = h(s − δ_i) + rΔ, b = hδ_i − rΔ, c = −rs,
whose root in [0, 1] is ξ = 2c / (−b − √(b² − 4ac)) (the form without cancellation).

:func:`real_line_spline` uses it on [−B, B] with identity tails outside (δ₀ = δ_K = 1), the
map of the φ⁴ spline coupling. :func:`circular_spline` uses it on [0, 2π) with δ_K = δ₀, a map of
the circle with a continuous derivative (Rezende et al. 2020), followed by a rotation; the map of
the U(1) spline coupling. Parameters carry the bin axis at position 1 (the channel axis of a
conditioner's output); ``x`` has the shape of the parameters without that axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from latticeflow.lattice import mod_2pi

#: Smallest bin width and height, as fractions of the interval, and smallest knot slope.
MIN_BIN = 1e-3
MIN_SLOPE = 1e-3
#: softplus(SLOPE_OFFSET) + MIN_SLOPE = 1: a raw slope of zero plus this offset is a unit slope.
SLOPE_OFFSET = math.log(math.expm1(1 - MIN_SLOPE))
TWO_PI = 2 * math.pi


@dataclass
class Knots:
    """Knot positions ``x``, ``y`` and slopes ``slope``, each ``(batch, K + 1, ...)``."""

    x: Tensor
    y: Tensor
    slope: Tensor


def _cumulative(fractions: Tensor, low: float, high: float) -> Tensor:
    """Knot positions low = p₀ < p₁ < … < p_K = high from bin fractions summing to one."""
    inner = low + (high - low) * torch.cumsum(fractions, dim=1)[:, :-1]
    edge = fractions[:, :1]
    return torch.cat([torch.full_like(edge, low), inner, torch.full_like(edge, high)], dim=1)


def _fractions(raw: Tensor) -> Tensor:
    k = raw.shape[1]
    return MIN_BIN + (1 - MIN_BIN * k) * torch.softmax(raw, dim=1)


def real_line_knots(raw_widths: Tensor, raw_heights: Tensor, raw_slopes: Tensor,
                    bound: float) -> Knots:
    """Knots on [−bound, bound] from unconstrained conditioner outputs: widths and heights
    ``(batch, K, ...)`` through a softmax, the K − 1 interior slopes through a softplus; the end
    slopes are 1, so the identity tails join the spline with a continuous derivative."""
    ones = torch.ones_like(raw_slopes[:, :1])
    slope = torch.cat([ones, MIN_SLOPE + F.softplus(raw_slopes), ones], dim=1)
    return Knots(_cumulative(_fractions(raw_widths), -bound, bound),
                 _cumulative(_fractions(raw_heights), -bound, bound), slope)


def _bin_of(knots: Tensor, value: Tensor) -> Tensor:
    """Index i of the bin [p_i, p_{i+1}) holding ``value`` (clamped to 0..K − 1), shape
    ``(batch, 1, ...)``."""
    k = knots.shape[1] - 1
    index = (value.unsqueeze(1) >= knots[:, 1:-1]).sum(1, keepdim=True)
    return index.clamp(0, k - 1)


def _bin_quantities(knots: Knots, index: Tensor) -> tuple[Tensor, ...]:
    """(x_i, y_i, w, h, δ_i, δ_{i+1}) of the bins ``index``, each with the bin axis removed."""
    def take(t: Tensor, shift: int = 0) -> Tensor:
        return t.gather(1, index + shift).squeeze(1)

    x0, y0 = take(knots.x), take(knots.y)
    return x0, y0, take(knots.x, 1) - x0, take(knots.y, 1) - y0, take(knots.slope), \
        take(knots.slope, 1)


def spline(x: Tensor, knots: Knots, need_dlog: bool = False
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(y, log y', (log y')') of the spline at ``x`` inside [x₀, x_K]; the last is ``None`` unless
    ``need_dlog``."""
    x0, y0, w, h, d0, d1 = _bin_quantities(knots, _bin_of(knots.x, x))
    s = h / w
    xi = ((x - x0) / w).clamp(0, 1)
    t = xi * (1 - xi)
    delta = d0 + d1 - 2 * s
    denominator = s + delta * t
    numerator = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2
    y = y0 + h * (s * xi * xi + d0 * t) / denominator
    log_deriv = 2 * torch.log(s) + torch.log(numerator) - 2 * torch.log(denominator)
    if not need_dlog:
        return y, log_deriv, None
    dn = 2 * d1 * xi + 2 * s * (1 - 2 * xi) - 2 * d0 * (1 - xi)
    dd = delta * (1 - 2 * xi)
    return y, log_deriv, (dn / numerator - 2 * dd / denominator) / w


def spline_inverse(y: Tensor, knots: Knots) -> tuple[Tensor, Tensor]:
    """(x, log y'(x)) with spline(x) = y, for y inside [y₀, y_K]."""
    x0, y0, w, h, d0, d1 = _bin_quantities(knots, _bin_of(knots.y, y))
    s = h / w
    delta = d0 + d1 - 2 * s
    r = y - y0
    a = h * (s - d0) + r * delta
    b = h * d0 - r * delta
    c = -s * r
    xi = (2 * c / (-b - torch.sqrt((b * b - 4 * a * c).clamp_min(0)))).clamp(0, 1)
    t = xi * (1 - xi)
    numerator = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2
    denominator = s + delta * t
    log_deriv = 2 * torch.log(s) + torch.log(numerator) - 2 * torch.log(denominator)
    return x0 + w * xi, log_deriv


def real_line_spline(x: Tensor, knots: Knots, bound: float, need_dlog: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The spline on [−bound, bound], the identity outside: (y, log y', (log y')' or None)."""
    inside = x.abs() < bound
    y, log_deriv, dlog = spline(x.clamp(-bound, bound), knots, need_dlog)
    y = torch.where(inside, y, x)
    log_deriv = torch.where(inside, log_deriv, 0.0)
    if dlog is not None:
        dlog = torch.where(inside, dlog, 0.0)
    return y, log_deriv, dlog


def real_line_spline_inverse(y: Tensor, knots: Knots, bound: float) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`real_line_spline`: (x, log y'(x))."""
    inside = y.abs() < bound
    x, log_deriv = spline_inverse(y.clamp(-bound, bound), knots)
    return torch.where(inside, x, y), torch.where(inside, log_deriv, 0.0)


def circular_knots(raw_widths: Tensor, raw_heights: Tensor, raw_slopes: Tensor) -> Knots:
    """Knots of K bins on [0, 2π] from unconstrained conditioner outputs, each ``(batch, K, ...)``:
    widths and heights through a softmax, the K slopes δ₀ … δ_{K−1} through a softplus, and
    δ_K = δ₀, so that the spline's derivative is continuous where 2π joins 0 on the circle.

    Raw outputs all zero (with ``raw_slopes`` offset by :data:`SLOPE_OFFSET`) give the identity.
    """
    slope = MIN_SLOPE + F.softplus(raw_slopes)
    return Knots(_cumulative(_fractions(raw_widths), 0.0, TWO_PI),
                 _cumulative(_fractions(raw_heights), 0.0, TWO_PI),
                 torch.cat([slope, slope[:, :1]], dim=1))


def circular_spline(u: Tensor, knots: Knots, shift: Tensor | None = None,
                    need_dlog: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The circle map h(u) = S(u mod 2π) + t (mod 2π), S the spline of :func:`circular_knots` and
    t = ``shift`` (``(batch, ...)``, a rotation; ``None``: no rotation); ``u`` any angles of the
    shape of ``shift``. Returns (h(u) ∈ [0, 2π), log h'(u), (log h')(u)' or ``None`` unless
    ``need_dlog``); h' = S' does not depend on the rotation.

    Both wraps keep values in [0, 2π) in float32 too (:func:`~latticeflow.lattice.mod_2pi`), and
    their derivative is 1, so the map is differentiable in ``u``, the knots and the shift.
    """
    y, log_deriv, dlog = spline(mod_2pi(u), knots, need_dlog)
    return mod_2pi(y if shift is None else y + shift), log_deriv, dlog


def circular_spline_inverse(v: Tensor, knots: Knots, shift: Tensor | None = None
                            ) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`circular_spline`: (u ∈ [0, 2π) with h(u) ≡ v (mod 2π), log h'(u)),
    for any angles ``v``; analytic (one quadratic per bin), so differentiable without a root
    finder."""
    u, log_deriv = spline_inverse(mod_2pi(v if shift is None else v - shift), knots)
    return mod_2pi(u), log_deriv
