"""The Fourier Gaussian base for scalar fields: a translation-invariant Gaussian, exact by FFT.

A Gaussian whose covariance commutes with lattice translations is diagonal in momentum space.
This layer maps white noise z (a standard normal per site) to

    x = K z,   K = F⁻¹ diag(σ(k)) F,

with F the discrete Fourier transform over the lattice axes and σ(k) > 0 even in k, so K is real
and symmetric and x ~ N(0, C) with C = K² = F⁻¹ diag(σ²) F. Then

    log|det K| = Σ_k log σ(k)          (the same for every configuration)
    ∇_x log q(x) = −C⁻¹ x              (behind a standard normal base)

and, as a layer of the score recursion (DESIGN §4), s_x = K⁻ᵀ s_z = K⁻¹ s_z forward and
s_z = K s_x backwards: one real FFT pair each way, no VJP. The variances follow the lattice
momentum k̂² = Σ_μ 4 sin²(k_μ/2) (k_μ = 2π n_μ / L_μ), through t = k̂²/4d ∈ [0, 1] in a
precision polynomial

    1/σ²(k) = Σ_{j<n} a_j t^j,   a_j = exp(c_j) > 0,

whose n coefficients are the only parameters: the same for every lattice size, so a trained base
moves between lattices like the couplings do (t keeps the terms of one size, which keeps the
optimisation well conditioned). The free field S = Σ_x[Σ_μ(∂_μφ)² + m²φ²] has
1/σ² = 2(k̂² + m²), i.e. n = 2 and a = (2m², 8d) (:meth:`FourierGaussian.free_field`); its
samples are then exact (constant importance weight). The map is odd in z (Z₂) and commutes with
translations, axis permutations and reflections.

Shapes: fields ``(batch, L0, L1, ...)``; ``lattice`` = ``(L0, L1, ...)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from latticeflow.lattice import checkerboard


def lattice_momentum_squared(lattice: tuple[int, ...], onesided: bool = False,
                             device=None, dtype=None) -> Tensor:
    """k̂² = Σ_μ 4 sin²(k_μ/2) on the momentum grid of ``lattice`` (FFT frequency order;
    ``onesided``: the last axis holds only the L/2 + 1 non-negative momenta, the layout of
    ``torch.fft.rfftn``)."""
    grids = [4 * torch.sin(k / 2) ** 2 for k in _momentum_grids(lattice, onesided)]
    return sum(grids).to(device=device, dtype=dtype or torch.get_default_dtype())


def _momentum_grids(lattice: tuple[int, ...], onesided: bool) -> tuple[Tensor, ...]:
    """k_μ = 2π n_μ / L_μ per axis on the momentum grid of ``lattice``, float64 (layout as
    :func:`lattice_momentum_squared`)."""
    axes = []
    for i, n in enumerate(lattice):
        half = onesided and i == len(lattice) - 1
        freq = torch.fft.rfftfreq(n) if half else torch.fft.fftfreq(n)
        axes.append(2 * math.pi * freq.to(dtype=torch.float64))
    return torch.meshgrid(*axes, indexing="ij")


class FourierGaussian(nn.Module):
    """x = K z with K diagonal in momentum space (module docstring); a layer of :class:`Flow`.

    ``n_terms``: the degree + 1 of the precision polynomial in t = k̂²/4d.
    ``log_coefficients``: the initial c_j (default 0: precision 1 + t + t² + …, a mild
    smoothing that leaves every coefficient room to move either way).
    """

    def __init__(self, lattice: tuple[int, ...], n_terms: int = 3,
                 log_coefficients: list[float] | None = None):
        super().__init__()
        if n_terms < 1:
            raise ValueError(f"n_terms must be at least 1, got {n_terms}")
        if log_coefficients is None:
            log_coefficients = [0.0] * n_terms
        if len(log_coefficients) != n_terms:
            raise ValueError(f"{n_terms} coefficients expected, got {len(log_coefficients)}")
        self.lattice = tuple(lattice)
        self.log_coefficients = nn.Parameter(torch.tensor(log_coefficients))
        self.register_buffer("t_half", self.reduced_momentum(True), persistent=False)
        self.register_buffer("t_full", self.reduced_momentum(False), persistent=False)

    def reduced_momentum(self, onesided: bool) -> Tensor:
        """t = k̂²/4d ∈ [0, 1] on the momentum grid (``onesided``: the rfft layout)."""
        return lattice_momentum_squared(self.lattice, onesided) / (4 * len(self.lattice))

    @classmethod
    def free_field(cls, lattice: tuple[int, ...], m2: float) -> FourierGaussian:
        """The exact sampler of the free field S = Σ[Σ_μ(∂_μφ)² + m²φ²] (m² > 0)."""
        if not m2 > 0:
            raise ValueError(f"the free field needs m2 > 0, got {m2}")
        return cls(lattice, n_terms=2,
                   log_coefficients=[math.log(2 * m2), math.log(8.0 * len(lattice))])

    def _axes(self, x: Tensor) -> tuple[int, ...]:
        return tuple(range(x.dim() - len(self.lattice), x.dim()))

    def log_sigma(self, t: Tensor) -> Tensor:
        """log σ(k) = −½ log Σ_j a_j t^j at the reduced momenta ``t`` = k̂²/4d."""
        powers = torch.stack([t ** j for j in range(len(self.log_coefficients))])
        coefficients = torch.exp(self.log_coefficients).to(t.dtype)
        precision = torch.tensordot(coefficients, powers, dims=1)
        return -0.5 * torch.log(precision)

    def variance(self) -> Tensor:
        """σ²(k) on the full momentum grid, shape ``lattice`` (the FFT's frequency order)."""
        return torch.exp(2 * self.log_sigma(self.t_full.to(self.log_coefficients.dtype)))

    def filter(self, x: Tensor, power: float) -> Tensor:
        """F⁻¹ diag(σ^power) F x over the lattice axes of ``x``."""
        axes = self._axes(x)
        factor = torch.exp(power * self.log_sigma(self.t_half.to(x.dtype)))
        return torch.fft.irfftn(torch.fft.rfftn(x, dim=axes) * factor, s=self.lattice, dim=axes)

    def log_det(self, x: Tensor) -> Tensor:
        """log|det K| = Σ_k log σ(k), repeated for each configuration of ``x``."""
        total = self.log_sigma(self.t_full.to(x.dtype)).sum()
        return total.expand(x.shape[0])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """x = K z and log|det K|."""
        return self.filter(z, 1.0), self.log_det(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z = K⁻¹ x and log|det K⁻¹|."""
        return self.filter(x, -1.0), -self.log_det(x)

    def forward_and_score(self, z: Tensor, score_z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, log|det K|, s_x = K⁻¹ s_z); the log-determinant does not depend on z."""
        with torch.no_grad():
            score_x = self.filter(score_z, -1.0)
        x, log_det = self(z)
        return x, log_det, score_x

    def inverse_and_score(self, x: Tensor, score_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z, log|det K⁻¹|, s_z = K s_x)."""
        with torch.no_grad():
            score_z = self.filter(score_x, 1.0)
        z, log_det = self.inverse(x)
        return z, log_det, score_z


def sublattice_momentum(lattice: tuple[int, ...], onesided: bool = False, device=None,
                        dtype=None) -> Tensor:
    """t = mean over axis pairs μ < ν of (1 − cos k_μ cos k_ν)/2 ∈ [0, 1], the reduced
    momentum of one checkerboard sublattice (its neighbours sit at x ± μ̂ ± ν̂; in 2D
    4t = Σ_± 4 sin²((k_0 ± k_1)/2)/2). Invariant under k → k + (π, …, π), as every
    translation-invariant kernel of the sublattice is. Layout as
    :func:`lattice_momentum_squared`; needs at least two axes."""
    if len(lattice) < 2:
        raise ValueError(f"a checkerboard sublattice needs at least two axes, got {lattice}")
    cosines = [torch.cos(k) for k in _momentum_grids(lattice, onesided)]
    pairs = [(m, n) for m in range(len(lattice)) for n in range(m + 1, len(lattice))]
    t = sum((1 - cosines[m] * cosines[n]) / 2 for m, n in pairs) / len(pairs)
    return t.to(device=device, dtype=dtype or torch.get_default_dtype())


class SublatticeFourierGaussian(FourierGaussian):
    """The Fourier Gaussian on the sites of one checkerboard ``parity``; the other sites pass
    through unchanged: x = P K P z + (1 − P) z, P the projector onto the parity.

    σ follows the sublattice momentum t (:func:`sublattice_momentum`), so σ(k + π) = σ(k): K
    commutes with the staggering (−1)^{Σx_μ} and hence with P, and P K P is a translation-
    invariant Gaussian kernel of the sublattice (translations by x ± μ̂ ± ν̂). Each pair
    {k, k + π} gives one eigenvalue σ(k) on the sublattice: log|det| = ½ Σ_k log σ(k).
    """

    def __init__(self, lattice: tuple[int, ...], parity: int, n_terms: int = 3,
                 log_coefficients: list[float] | None = None):
        super().__init__(lattice, n_terms, log_coefficients)
        self.register_buffer("on_sublattice", checkerboard(self.lattice, parity),
                             persistent=False)

    def reduced_momentum(self, onesided: bool) -> Tensor:
        """The sublattice momentum t of :func:`sublattice_momentum`."""
        return sublattice_momentum(self.lattice, onesided)

    def filter(self, x: Tensor, power: float) -> Tensor:
        """P F⁻¹ diag(σ^power) F P x + (1 − P) x."""
        moved = super().filter(torch.where(self.on_sublattice, x, 0.0), power)
        return torch.where(self.on_sublattice, moved, x)

    def log_det(self, x: Tensor) -> Tensor:
        """½ Σ_k log σ(k): the sublattice's half of the spectrum."""
        return 0.5 * super().log_det(x)
