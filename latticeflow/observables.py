"""Observables on batches of lattice configurations (torch in, torch out; device and dtype kept).

Scalar φ⁴ (field ``(B, L0, L1, ...)``, V sites, d axes)
-------------------------------------------------------
* magnetisation per site ``m = (1/V) Σ_x φ(x)``, per configuration ``(B,)``;
* full correlator per configuration, averaged over translations (FFT):
  ``G_i(y) = (1/V) Σ_x φ_i(x) φ_i(x+y)``, ``(B, L0, L1, ...)``; note Σ_y G_i(y) = V m_i²;
* connected correlator ``G_c(y) = <G_i(y)> − <m>²`` with <·> the batch mean: the disconnected
  part is the square of the batch-mean magnetisation (the estimate of the translation-invariant
  one-point function <φ(x)>). For a jackknife / Γ-method pass the resampled means of G_i and m to
  :func:`connect`. In a Z₂-symmetric finite-volume ensemble <m> → 0 and G_c → <G_i>;
* susceptibility: flow-literature convention ``χ₂ = Σ_y G_c(y) = V(<m²> − <m>²)`` (default);
  ``absolute=True`` gives the broken-phase variant ``V(<m²> − <|m|>²)``;
* Binder cumulant ``U = 1 − <m⁴>/(3<m²>²)`` (0 for a Gaussian m);
* zero-momentum correlator along axis 0: ``C(t) = Σ_{y⃗} G_c(t, y⃗)`` (sum over the other axes),
  and ``m_eff(t) = arccosh[(C(t−1) + C(t+1)) / (2C(t))]``;
* second-moment correlation length from G̃(p) = Σ_y G_c(y) e^{−ip·y}:
  ``ξ₂² = (G̃(0)/G̃(p_min) − 1) / p̂²`` with p_min = 2π/L along one axis and p̂² = 4 sin²(π/L).

Functions whose names end in ``_from_means`` (and :func:`connect`, :func:`binder_cumulant`,
:func:`effective_mass`, :func:`second_moment_correlation_length`, :func:`creutz_ratio`) take
ensemble means, so resampled means can be pushed through them for error propagation.

U(1) (links ``(B, 2, L0, L1)``)
-------------------------------
Plaquette P(x) = θ₀(x) + θ₁(x+0̂) − θ₀(x+1̂) − θ₁(x); mean plaquette (1/V)Σ cos P; topological
charge Q = (1/2π) Σ_x wrap(P(x)) (an integer up to round-off, returned as a raw float; see
:func:`round_charge`); rectangular Wilson loops W(R,T) with R along axis 0 and T along axis 1,
averaged over positions; Creutz ratios.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latticeflow.lattice import plaquette, shift, wrap
from latticeflow.theories.base import Action

# --------------------------------------------------------------------------------------------
# Scalar field
# --------------------------------------------------------------------------------------------


def _lattice_dims(phi: Tensor) -> tuple[int, ...]:
    """The lattice axes of a batched scalar field (all but the first)."""
    return tuple(range(1, phi.dim()))


def magnetization(phi: Tensor) -> Tensor:
    """m = (1/V) Σ_x φ(x) per configuration: ``(B, L0, ...)`` → ``(B,)``."""
    return phi.mean(_lattice_dims(phi))


def correlator_per_config(phi: Tensor) -> Tensor:
    """Full translation-averaged correlator G_i(y) = (1/V) Σ_x φ(x)φ(x+y), shape of ``phi``.

    Computed as ifft(|fft φ|²)/V over the lattice axes; no disconnected part removed.
    """
    dims = _lattice_dims(phi)
    volume = math.prod(phi.shape[1:])
    power = torch.fft.fftn(phi, dim=dims).abs().square()
    return torch.fft.ifftn(power, dim=dims).real / volume


def connect(g_mean: Tensor, m_mean: Tensor) -> Tensor:
    """Connected correlator from means: G_c(y) = <G_i(y)> − <m>².

    ``m_mean`` has the leading shape of ``g_mean`` (e.g. ``()`` for ``(L0, L1)``, or ``(K,)`` for
    K jackknife resamples ``(K, L0, L1)``) and is broadcast over the lattice axes.
    """
    m_mean = torch.as_tensor(m_mean, dtype=g_mean.dtype, device=g_mean.device)
    m_mean = m_mean.reshape(m_mean.shape + (1,) * (g_mean.dim() - m_mean.dim()))
    return g_mean - m_mean.square()


def connected_correlator(phi: Tensor) -> Tensor:
    """Batch estimate G_c(y) = <G_i(y)> − <m>², shape ``(L0, L1, ...)``."""
    return connect(correlator_per_config(phi).mean(0), magnetization(phi).mean())


def susceptibility_from_means(m2_mean: Tensor, m_mean: Tensor, volume: int) -> Tensor:
    """χ₂ = V(<m²> − <m>²); pass <|m|> as ``m_mean`` for the broken-phase variant."""
    return volume * (m2_mean - m_mean**2)


def susceptibility(phi: Tensor, absolute: bool = False) -> Tensor:
    """χ₂ = Σ_y G_c(y) = V(<m²> − <m>²) over the batch (0-dim tensor).

    ``absolute=True``: V(<m²> − <|m|>²) instead.
    """
    m = magnetization(phi)
    volume = math.prod(phi.shape[1:])
    first = m.abs().mean() if absolute else m.mean()
    return susceptibility_from_means(m.square().mean(), first, volume)


def binder_cumulant(m2_mean: Tensor, m4_mean: Tensor) -> Tensor:
    """U = 1 − <m⁴> / (3<m²>²), from the means of m² and m⁴."""
    return 1 - m4_mean / (3 * m2_mean**2)


def binder_cumulant_batch(phi: Tensor) -> Tensor:
    """Binder cumulant of the batch (0-dim tensor)."""
    m2 = magnetization(phi).square()
    return binder_cumulant(m2.mean(), m2.square().mean())


def action_density(phi: Tensor, action: Action) -> Tensor:
    """S/V per configuration, ``(B,)``; ``action`` is any :class:`Action`."""
    return action(phi) / math.prod(phi.shape[1:])


def zero_momentum(g: Tensor, ndim: int) -> Tensor:
    """Sum over lattice axes 1..d−1 of the trailing ``ndim`` (= d) axes.

    ``(..., L0, L1, ...)`` → ``(..., L0)``. Applied to G_i or G_c this gives the zero-momentum
    correlator C(t), t along axis 0.
    """
    if ndim < 1:
        raise ValueError("ndim must be >= 1")
    dims = tuple(range(g.dim() - ndim + 1, g.dim()))
    return g.sum(dims) if dims else g


def zero_momentum_correlator_per_config(phi: Tensor) -> Tensor:
    """Full C_i(t) = Σ_{y⃗} G_i(t, y⃗) per configuration, ``(B, L0)``.

    The connected C(t) is <C_i(t)> − (V/L0)<m>².
    """
    return zero_momentum(correlator_per_config(phi), phi.dim() - 1)


def zero_momentum_correlator(phi: Tensor) -> Tensor:
    """Connected C(t) = Σ_{y⃗} G_c(t, y⃗) of the batch, ``(L0,)``."""
    return zero_momentum(connected_correlator(phi), phi.dim() - 1)


def effective_mass(c: Tensor) -> Tensor:
    """m_eff(t) = arccosh[(C(t−1) + C(t+1)) / (2C(t))] for t = 1 .. L0−2 along the last axis.

    ``(..., L0)`` → ``(..., L0−2)``; entry k belongs to t = k + 1. NaN where the argument is < 1.
    """
    return torch.acosh((c[..., :-2] + c[..., 2:]) / (2 * c[..., 1:-1]))


def momentum_correlator(g: Tensor, axis: int = 0) -> tuple[Tensor, Tensor]:
    """(G̃(0), G̃(p_min)) of a correlator ``g`` of shape ``(L0, L1, ...)`` (no batch axis).

    G̃(p) = Σ_y g(y) cos(p·y) with p_min = 2π/L_axis along ``axis`` (g is symmetric, y → −y).
    """
    size = g.shape[axis]
    coord = torch.arange(size, device=g.device, dtype=g.dtype)
    view = [1] * g.dim()
    view[axis] = size
    phase = torch.cos(2 * math.pi * coord / size).view(view)
    return g.sum(), (g * phase).sum()


def second_moment_correlation_length(g0: Tensor, gp: Tensor, size: int) -> Tensor:
    """ξ₂ = sqrt[(G̃(0)/G̃(p_min) − 1) / p̂²], p̂² = 4 sin²(π/L), from the two momentum means."""
    p_hat2 = 4 * math.sin(math.pi / size) ** 2
    return torch.sqrt((g0 / gp - 1) / p_hat2)


def correlation_length(phi: Tensor, axis: int = 0) -> Tensor:
    """ξ₂ of the batch from its connected correlator, p_min along ``axis``."""
    g0, gp = momentum_correlator(connected_correlator(phi), axis)
    return second_moment_correlation_length(g0, gp, phi.shape[1 + axis])


# --------------------------------------------------------------------------------------------
# U(1) gauge field
# --------------------------------------------------------------------------------------------


def _check_links(links: Tensor) -> None:
    if links.dim() != 4 or links.shape[1] != 2:
        raise ValueError(f"U(1) links must be (batch, 2, L0, L1), got {tuple(links.shape)}")


def plaquette_mean(links: Tensor) -> Tensor:
    """(1/V) Σ_x cos P(x) per configuration, ``(B,)``."""
    _check_links(links)
    return torch.cos(plaquette(links)).mean((1, 2))


def topological_charge(links: Tensor) -> Tensor:
    """Q = (1/2π) Σ_x wrap(P(x)) per configuration, raw float ``(B,)``.

    Σ_x P(x) = 0 identically on the torus, so Q is an integer up to round-off.
    """
    _check_links(links)
    return wrap(plaquette(links)).sum((1, 2)) / (2 * math.pi)


def round_charge(q: Tensor) -> Tensor:
    """Nearest integer of a raw charge (same dtype)."""
    return torch.round(q)


def _line_sum(theta: Tensor, mu: int, length: int) -> Tensor:
    """Σ_{k<length} θ(x + k μ̂) for a ``(B, L0, L1)`` link component."""
    return sum(shift(theta, mu, k) for k in range(length))


def wilson_loop(links: Tensor, r: int, t: int) -> Tensor:
    """Re W(R,T) averaged over positions, per configuration ``(B,)``; R along 0̂, T along 1̂.

    Loop phase: Σ_{k<R} θ₀(x+k0̂) + Σ_{j<T} θ₁(x+R0̂+j1̂) − Σ_{k<R} θ₀(x+T1̂+k0̂) − Σ_{j<T} θ₁(x+j1̂),
    traversed counter-clockwise like the plaquette (W(1,1) = cos P). Needs 1 ≤ R ≤ L0/2 and
    1 ≤ T ≤ L1/2.
    """
    _check_links(links)
    size0, size1 = links.shape[2], links.shape[3]
    if not (1 <= r <= size0 // 2 and 1 <= t <= size1 // 2):
        raise ValueError(
            f"need 1 <= R <= L0/2, 1 <= T <= L1/2; got R={r}, T={t} on {size0}x{size1}"
        )
    bottom = _line_sum(links[:, 0], 0, r)
    left = _line_sum(links[:, 1], 1, t)
    phase = bottom + shift(left, 0, r) - shift(bottom, 1, t) - left
    return torch.cos(phase).mean((1, 2))


def wilson_loop_table(links: Tensor, rmax: int, tmax: int) -> Tensor:
    """W(R,T) for 0 ≤ R ≤ rmax, 0 ≤ T ≤ tmax, ``(B, rmax+1, tmax+1)``; W(0,·) = W(·,0) = 1."""
    table = torch.ones(links.shape[0], rmax + 1, tmax + 1, dtype=links.dtype, device=links.device)
    for r in range(1, rmax + 1):
        for t in range(1, tmax + 1):
            table[:, r, t] = wilson_loop(links, r, t)
    return table


def creutz_ratio(w_rt: Tensor, w_r1t1: Tensor, w_rt1: Tensor, w_r1t: Tensor) -> Tensor:
    """χ(R,T) = −log[W(R,T) W(R−1,T−1) / (W(R,T−1) W(R−1,T))] from the four loop means."""
    return -torch.log(w_rt * w_r1t1 / (w_rt1 * w_r1t))


def creutz_ratio_table(w: Tensor) -> Tensor:
    """χ(R,T) for R, T ≥ 1 from a mean table ``(..., rmax+1, tmax+1)`` → ``(..., rmax, tmax)``."""
    return creutz_ratio(w[..., 1:, 1:], w[..., :-1, :-1], w[..., 1:, :-1], w[..., :-1, 1:])
