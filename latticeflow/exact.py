"""Exact results used to validate samplers: the free scalar field and 2D U(1) Wilson gauge theory.

Free scalar field (φ⁴ standard form of :mod:`latticeflow.theories.phi4` at λ = 0, m² > 0)
-------------------------------------------------------------------------------------------
The action on a periodic lattice of shape ``(L0, L1, ...)`` (V sites, d axes) is

    S = Σ_x [ Σ_μ (φ(x+μ̂) − φ(x))² + m² φ(x)² ]            (note: no factor ½).

Expanding the square and shifting the summation variable, Σ_x (φ(x+μ̂) − φ(x))² =
Σ_x φ(x)(2φ(x) − φ(x+μ̂) − φ(x−μ̂)), so S = φᵀ(−Δ + m²)φ with the lattice Laplacian
(Δφ)(x) = Σ_μ [φ(x+μ̂) + φ(x−μ̂) − 2φ(x)]. Written as a Gaussian, S = ½ φᵀKφ with

    K = 2(−Δ + m²),   eigenvalues  K(p) = 2(p̂² + m²),   p̂² = Σ_μ 4 sin²(p_μ/2),

for momenta p_μ = 2π k_μ / L_μ (plane waves diagonalise the translation-invariant K). Hence, with
the plain Lebesgue measure Π_x dφ(x):

* ``G(x) = <φ(0) φ(x)> = (K⁻¹)_{0x} = (1/V) Σ_p e^{ipx} / K(p)`` (an inverse FFT);
* ``χ₂ = Σ_x G(x) = 1/K(0) = 1/(2m²)``;
* ``C(t) = Σ_{x⃗} G(t, x⃗)`` (zero spatial momentum, t along axis 0)
  ``= (1/L0) Σ_{p0} e^{i p0 t} / K(p0, 0⃗)``;
* ``log Z = log ∫ dφ e^{−½φᵀKφ} = (V/2) log 2π − ½ Σ_p log K(p)``.

C(t) has a single pole: solving p̂0² + m² = 0 at p0 = iE gives 4 sinh²(E/2) = m², i.e.
cosh E = 1 + m²/2. On the periodic lattice the momentum sum is exactly
C(t) = cosh(E(t − L0/2)) / (4 sinh E · sinh(E L0/2)), so the cosh effective mass equals
E = arccosh(1 + m²/2) at every t (see :func:`free_mass`).

2D U(1) Wilson action on a periodic L0 × L1 torus (V = L0·L1 plaquettes, 2V links)
----------------------------------------------------------------------------------
Conventions of :mod:`latticeflow.theories.u1`: P(x) = θ₀(x) + θ₁(x+0̂) − θ₀(x+1̂) − θ₁(x),
S = −β Σ_x cos P(x), Q = (1/2π) Σ_x wrap(P(x)) with wrap to (−π, π].

*Partition function.* With Haar measure normalised to one per link (dθ/2π), expand every
Boltzmann factor in characters, e^{β cos P} = Σ_{n∈ℤ} I_n(β) e^{inP}. Each link enters exactly two
plaquettes with opposite signs, so integrating it gives δ_{n_x, n_y} for those two plaquettes; on
the connected torus all n_x are equal (this is the constraint Π_x e^{iP(x)} = 1). Therefore

    Z = Σ_{n∈ℤ} I_n(β)^V,       <cos P> = (1/V) ∂ log Z / ∂β = Σ_n w_n I_n'(β) / I_n(β),

with w_n = I_n^V / Z and I_n' = (I_{n−1} + I_{n+1}) / 2. With the Lebesgue measure dθ per link,
log Z gains 2V log 2π.

*Topological charge.* Add a theta term, Z(θ) = ∫ e^{−S + iθQ}. The single-plaquette factor
f(φ) = e^{β cos φ + iθ wrap(φ)/2π} is still 2π-periodic in φ, so the same argument with its
Fourier coefficients c_n(θ) = (1/2π) ∫_{−π}^{π} dφ e^{β cos φ} e^{−i(n − θ/2π)φ} gives
Z(θ) = Σ_n c_n(θ)^V. Write c_n(θ) = g(n − θ/2π) with the real, even function
g(ν) = (1/π) ∫_0^π dφ e^{β cos φ} cos(νφ) (so g(n) = I_n(β)). Z(θ) is even in θ, hence

    <Q²> = −∂²_θ log Z(θ)|₀ = −Z''(0)/Z(0)
         = −(V / 4π²) Σ_n w_n [ g''(n)/g(n) + (V − 1) (g'(n)/g(n))² ],

g'(n) = −(1/π)∫_0^π φ sin(nφ) e^{β cos φ} dφ, g''(n) = −(1/π)∫_0^π φ² cos(nφ) e^{β cos φ} dφ,
evaluated with :func:`scipy.integrate.quad` (oscillatory weights). The n = 0 term alone is the
infinite-volume result χ_t = <wrap(φ)²>_β / 4π² for a single plaquette.
All Bessel functions enter through ``scipy.special.ive`` (I_n(β) e^{−β}) and the sums over n are
done as log-sum-exp, truncated once (I_n/I_0)^{max(V−2, 1)} < 1e-17.

Tiny tori: for V = 1 the plaquette is identically 0; for V = 2 the two plaquettes satisfy
P₁ = −P₂ exactly (Σ_x P(x) = 0 as real numbers, every link cancels), so Q = 0 almost surely. The
θ-series converges only algebraically there, so <Q²> = 0 is returned directly for V ≤ 2.

*Charge distribution.* Z(θ)/Z(0) = Σ_q P(Q = q) e^{iθq}, and every wrapped plaquette lies in
(−π, π], so |Q| < V/2: Z(θ) is a trigonometric polynomial of degree < V/2, and its values at the
M = V + 1 angles θ_j = 2πj/M give P(q) exactly by a discrete Fourier transform,
P(q) = (1/M) Σ_j Z(θ_j) cos(θ_j q) / Z(0) (Z(θ) is even). The θ-series needs g at non-integer
orders, where it decays only algebraically: integrating by parts,
|g(ν)| ≤ e^β / (π|ν|), so the orders |n| > N of Σ_n g(n − θ/2π)^V add at most
2 (C/N)^V (1 + N/(V − 1)) to Z(θ)/I₀^V ≥ 1, C = e^β / (π I₀(β)). N is the first order where this
is below 1e-14, so each P(q) is exact to about 1e-14 (absolute); g(ν) e^{−β} is integrated by
Gauss–Legendre quadrature on [0, π] (accurate to ~1e-14 for the orders needed). Small tori at
large β need many orders (N grows like C (1e14)^{1/(V−1)}); they are refused beyond
``_MAX_CHARGE_ORDERS``.

*Wilson loops.* Inserting W = e^{i Σ_{x∈A} P(x)} for a planar R × T loop enclosing A = RT plaquettes
shifts n → n − 1 inside A, so on the torus <W(R,T)> = Σ_n I_{n−1}^A I_n^{V−A} / Σ_n I_n^V
(1 ≤ R ≤ L0, 1 ≤ T ≤ L1); for
V → ∞ only n = 0 survives and <W(R,T)> = (I_1(β)/I_0(β))^{RT} (area law, Creutz ratio
−log(I_1/I_0)).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate, special

_TRUNCATION = 1e-17
_MAX_N = 100_000
_CHARGE_TAIL = 1e-14
_MAX_CHARGE_ORDERS = 500


# --------------------------------------------------------------------------------------------
# Free scalar field
# --------------------------------------------------------------------------------------------


def _check_free(shape: tuple[int, ...], m2: float) -> None:
    if m2 <= 0:
        raise ValueError(f"the free field needs m2 > 0, got {m2}")
    if len(shape) == 0 or any(int(n) < 1 for n in shape):
        raise ValueError(f"invalid lattice shape {shape}")


def free_kernel_eigenvalues(shape: tuple[int, ...], m2: float) -> np.ndarray:
    """Eigenvalues K(p) = 2(p̂² + m²) of K = 2(−Δ + m²) on the FFT momentum grid, shape ``shape``.

    Entry ``[k0, k1, ...]`` belongs to p_μ = 2π k_μ / L_μ (numpy FFT ordering).
    """
    _check_free(shape, m2)
    grids = np.meshgrid(*[2 * np.pi * np.arange(n) / n for n in shape], indexing="ij")
    p_hat2 = sum(4 * np.sin(p / 2) ** 2 for p in grids)
    return 2 * (p_hat2 + m2)


def free_two_point(shape: tuple[int, ...], m2: float) -> np.ndarray:
    """G(x) = <φ(0)φ(x)> = (1/V) Σ_p e^{ipx}/K(p), shape ``shape`` (G[0, 0, ...] = <φ²>)."""
    return np.fft.ifftn(1.0 / free_kernel_eigenvalues(shape, m2)).real


def free_susceptibility(shape: tuple[int, ...], m2: float) -> float:
    """χ₂ = Σ_x G(x) = 1/K(0) = 1/(2m²) (independent of the lattice size)."""
    _check_free(shape, m2)
    return 1.0 / (2.0 * m2)


def free_zero_momentum_correlator(shape: tuple[int, ...], m2: float) -> np.ndarray:
    """C(t) = Σ_{x⃗} G(t, x⃗) with t along axis 0, shape ``(L0,)``."""
    g = free_two_point(shape, m2)
    return g.reshape(shape[0], -1).sum(axis=1)


def free_log_z(shape: tuple[int, ...], m2: float) -> float:
    """log Z = (V/2) log 2π − ½ Σ_p log K(p), Lebesgue measure Π_x dφ(x)."""
    k = free_kernel_eigenvalues(shape, m2)
    return 0.5 * k.size * math.log(2 * math.pi) - 0.5 * float(np.log(k).sum())


def free_mass(m2: float) -> float:
    """Lattice mass E = arccosh(1 + m²/2): the exact cosh effective mass of the free C(t)."""
    if m2 <= 0:
        raise ValueError(f"the free field needs m2 > 0, got {m2}")
    return math.acosh(1.0 + m2 / 2.0)


# --------------------------------------------------------------------------------------------
# 2D U(1) gauge theory
# --------------------------------------------------------------------------------------------


def _u1_volume(beta: float, shape: tuple[int, int]) -> int:
    if len(shape) != 2 or any(int(n) < 1 for n in shape):
        raise ValueError(f"U(1) exact results need a 2D lattice shape, got {shape}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return int(shape[0]) * int(shape[1])


def _bessel_orders(beta: float, volume: int) -> int:
    """Largest |n| kept: the first n with (I_n/I_0)^{max(V−2,1)} < 1e-17, plus one."""
    power = max(volume - 2, 1)
    i0 = special.ive(0, beta)
    n = 0
    while n < _MAX_N:
        n += 1
        if (special.ive(n, beta) / i0) ** power < _TRUNCATION:
            return n + 1
    raise RuntimeError(f"Bessel series did not converge for beta={beta}")


def _log_weights(beta: float, volume: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Orders n = −N..N, normalised weights w_n = I_n^V/Σ I_m^V and log Σ_n (I_n e^{−β})^V."""
    nmax = _bessel_orders(beta, volume)
    n = np.arange(-nmax, nmax + 1)
    log_terms = special.xlogy(volume, special.ive(n, beta))
    log_sum = float(special.logsumexp(log_terms))
    return n, np.exp(log_terms - log_sum), log_sum


def u1_log_z(beta: float, shape: tuple[int, int], measure: str = "haar") -> float:
    """log Z = log Σ_n I_n(β)^V.

    ``measure="haar"``: dθ/2π per link (Z(β=0) = 1); ``measure="lebesgue"``: dθ per link, which adds
    2V log 2π (2V links).
    """
    volume = _u1_volume(beta, shape)
    if measure not in ("haar", "lebesgue"):
        raise ValueError(f"measure must be 'haar' or 'lebesgue', got {measure!r}")
    _, _, log_sum = _log_weights(beta, volume)
    log_z = volume * beta + log_sum
    if measure == "lebesgue":
        log_z += 2 * volume * math.log(2 * math.pi)
    return log_z


def u1_mean_plaquette(beta: float, shape: tuple[int, int]) -> float:
    """<cos P> = (1/V) ∂_β log Z = Σ_n w_n (I_{n−1} + I_{n+1}) / (2 I_n)."""
    volume = _u1_volume(beta, shape)
    n, w, _ = _log_weights(beta, volume)
    keep = w > 0
    n, w = n[keep], w[keep]
    ratio = (special.ive(n - 1, beta) + special.ive(n + 1, beta)) / (2 * special.ive(n, beta))
    return float(np.sum(w * ratio))


def _g_derivatives(beta: float, n: int) -> tuple[float, float]:
    """e^{−β} g'(n) and e^{−β} g''(n), g(ν) = (1/π)∫_0^π e^{β cos φ} cos(νφ) dφ."""
    opts = {"epsabs": 1e-14, "epsrel": 1e-12, "limit": 400}

    def weight(phi: float, power: int) -> float:
        return phi**power * math.exp(beta * (math.cos(phi) - 1.0))

    if n == 0:
        g1 = 0.0
        g2 = integrate.quad(weight, 0.0, math.pi, args=(2,), **opts)[0]
    else:
        g1 = integrate.quad(weight, 0.0, math.pi, args=(1,), weight="sin", wvar=n, **opts)[0]
        g2 = integrate.quad(weight, 0.0, math.pi, args=(2,), weight="cos", wvar=n, **opts)[0]
    return -g1 / math.pi, -g2 / math.pi


def u1_mean_q2(beta: float, shape: tuple[int, int]) -> float:
    """<Q²> = −(V/4π²) Σ_n w_n [g''(n)/I_n + (V−1)(g'(n)/I_n)²]; 0 for V ≤ 2 (see module doc)."""
    volume = _u1_volume(beta, shape)
    if volume <= 2:
        return 0.0
    n, w, _ = _log_weights(beta, volume)
    total = 0.0
    for order, weight in zip(n.tolist(), w.tolist(), strict=True):
        if weight == 0.0 or order < 0:
            continue
        a = special.ive(order, beta)
        d1, d2 = _g_derivatives(beta, order)
        term = weight * (d2 / a + (volume - 1) * (d1 / a) ** 2)
        total += term if order == 0 else 2 * term  # g', g'' are odd/even in n; squares are even
    return -volume * total / (4 * math.pi**2)


def u1_topological_susceptibility(beta: float, shape: tuple[int, int]) -> float:
    """χ_t = <Q²> / V on the L0 × L1 torus."""
    return u1_mean_q2(beta, shape) / _u1_volume(beta, shape)


def u1_topological_susceptibility_infinite(beta: float) -> float:
    """V → ∞ limit χ_t = <φ²>_β / 4π², single-plaquette density ∝ e^{β cos φ} on (−π, π]."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    _, d2 = _g_derivatives(beta, 0)
    return -d2 / special.ive(0, beta) / (4 * math.pi**2)


def _g_scaled(beta: float, nu: np.ndarray) -> np.ndarray:
    """e^{−β} g(ν) = (1/π)∫_0^π e^{β(cos φ − 1)} cos(νφ) dφ by Gauss–Legendre, any real ``nu``."""
    nodes, weights = np.polynomial.legendre.leggauss(
        32 + 2 * math.ceil(np.abs(nu).max()) + 2 * math.ceil(beta))
    phi = 0.5 * math.pi * (nodes + 1)
    return np.cos(np.multiply.outer(nu, phi)) @ (0.5 * weights * np.exp(beta * (np.cos(phi) - 1)))


def u1_charge_distribution(beta: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """P(Q = q) on the L0 × L1 torus for q = −⌊V/2⌋..⌊V/2⌋: ``(charges, probabilities)``.

    Discrete Fourier transform of Z(θ) (module doc), exact to about 1e-14 per probability
    (round-off below 0 is clipped); for V ≤ 2, Q = 0 almost surely. Raises ``ValueError`` where
    the θ-series would need more than ``_MAX_CHARGE_ORDERS`` orders (e.g. V = 4, or V = 6 at β = 3).
    """
    volume = _u1_volume(beta, shape)
    half = volume // 2
    charges = np.arange(-half, half + 1)
    if volume <= 2:
        return charges, (charges == 0).astype(float)
    c = 1 / (math.pi * special.ive(0, beta))
    orders = 1
    while 2 * (c / orders) ** volume * (1 + orders / (volume - 1)) > _CHARGE_TAIL:
        orders += 1
        if orders > _MAX_CHARGE_ORDERS:
            raise ValueError(f"the theta series converges too slowly on {shape} at beta={beta}")
    m = volume + 1
    theta = 2 * math.pi * np.arange(m) / m
    nu = np.arange(-orders, orders + 1)[None, :] - theta[:, None] / (2 * math.pi)
    z_theta = ((_g_scaled(beta, nu) / special.ive(0, beta)) ** volume).sum(1)
    probabilities = np.cos(np.outer(charges, theta)) @ z_theta / (m * z_theta[0])
    return charges, np.clip(probabilities, 0.0, None)


def u1_wilson_loop(beta: float, shape: tuple[int, int], r: int, t: int) -> float:
    """<W(R,T)> = Σ_n I_{n−1}^{A} I_n^{V−A} / Σ_n I_n^V on the torus, A = R·T < V.

    The loop's phase equals e^{i Σ P} over the R·T plaquettes it encloses, which holds for every
    1 <= R <= L0, 1 <= T <= L1 on the torus; W(1,1) = <cos P>.
    """
    volume = _u1_volume(beta, shape)
    area = r * t
    if r < 1 or t < 1 or r > shape[0] or t > shape[1]:
        raise ValueError(f"need 1 <= R <= L0 and 1 <= T <= L1, got R={r}, T={t}, shape={shape}")
    n, _, log_sum = _log_weights(beta, volume)
    log_terms = special.xlogy(area, special.ive(n - 1, beta)) + special.xlogy(
        volume - area, special.ive(n, beta)
    )
    return float(np.exp(special.logsumexp(log_terms) - log_sum))


def u1_wilson_loop_infinite(beta: float, r: int, t: int) -> float:
    """Infinite-volume <W(R,T)> = (I_1(β)/I_0(β))^{RT}.

    Finite-volume caveat: on an L0 × L1 torus the n ≠ 0 sectors add corrections of relative size
    ~ (I_1/I_0)^{V−RT}; use :func:`u1_wilson_loop` for the exact torus value.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return float((special.ive(1, beta) / special.ive(0, beta)) ** (r * t))
