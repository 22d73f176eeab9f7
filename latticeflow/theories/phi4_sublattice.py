"""φ⁴ with the even sublattice integrated out exactly.

Both φ⁴ forms of :mod:`latticeflow.theories.phi4` read, with the standard form's field φ or the
hopping form's ϕ written x,

    S(x) = Σ_x [a x² + b x⁴] − c Σ_links x(s) x(s+μ̂),

(a, b, c) = (2d + m², λ, 2) for :class:`Phi4` and (1 − 2λ̂, λ̂, 2κ) for :class:`Phi4Hopping`.
On a lattice with even extents every link joins an *even* site (Σ_μ x_μ even) to an *odd* one, so
given the odd sites the even sites are independent, each with the one-site density

    p(y | h) = exp(−a y² − b y⁴ + c h y) / Z(h),   h = Σ_μ [x(e+μ̂) + x(e−μ̂)] (its 2d neighbours),

(on a 2-wide axis both terms are the same site, counted twice, as in S) and the odd sites have
the exact marginal p(x_odd) ∝ exp(−Σ_odd [a x² + b x⁴]) Π_even Z(h_e).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latticeflow.lattice import checkerboard, shift
from latticeflow.theories.base import Action
from latticeflow.theories.phi4 import Phi4, Phi4Hopping

_LOG_2PI = math.log(2 * math.pi)
_TAIL = 50.0  # quadrature window: where log(integrand) is within _TAIL of its maximum
_PER_WIDTH = 5.0  # quadrature points per local width 1/√V''(y)
_TOL = 1e-11  # bound on the interpolation error of ⟨y⟩ = dF/ds (that of F is far smaller)
_START = 32.0  # initial table range in s = c·h
_BLOCK = 256  # table nodes per quadrature block
_MAX_NODES = 2**21


def _neighbour_sum(x: Tensor) -> Tensor:
    """Σ_μ [x(s+μ̂) + x(s−μ̂)] for ``x`` of shape ``(batch, L0, L1, ...)``."""
    return sum(shift(x, mu, 1) + shift(x, mu, -1) for mu in range(x.dim() - 1))


class SiteConditional:
    """The one-site density p(y | h) = exp(−a y² − b y⁴ + c h y) / Z(h).

    Needs b ≥ 0, and a > 0 when b = 0 (a < 0 with b > 0 is a double well). Z is tabulated as
    F(s) = log ∫ exp(−a y² − b y⁴ + s y) dy in s = c·h on a uniform grid of |s| (F is even), from
    float64 trapezoid quadrature, which converges spectrally for this entire, fast-decaying
    integrand, and interpolated piecewise-cubically (Hermite: F and F' = ⟨y⟩ at the nodes). The
    node spacing is set from the largest fourth cumulant F'''' so that the interpolated ⟨y⟩ is
    within about 1e-11 of the exact one; the table is doubled in range when an input needs it.
    All methods act elementwise on tensors of any shape, dtype and device.
    """

    def __init__(self, a: float, b: float, c: float):
        self.a, self.b, self.c = float(a), float(b), float(c)
        if not all(math.isfinite(v) for v in (self.a, self.b, self.c)):
            raise ValueError(f"SiteConditional needs finite a, b, c, got {a}, {b}, {c}")
        if self.b < 0 or (self.b == 0 and self.a <= 0):
            raise ValueError(f"exp(−a y² − b y⁴) is not normalisable for a={a}, b={b}: "
                             "need b >= 0, and a > 0 when b = 0")
        self._s_max = 0.0
        self._step = 0.0
        self._nodes: tuple[Tensor, ...] | None = None  # F, F(s+step) − F(s), F' at the nodes
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = {}

    @property
    def h_range(self) -> float:
        """The largest |h| the current table covers (0 before first use)."""
        if self._nodes is None:
            return 0.0
        return math.inf if self.c == 0 else self._s_max / abs(self.c)

    def _window(self, s: float) -> tuple[float, float]:
        """An interval outside which exp(s y − V(y)) < e^−_TAIL · its maximum, V = a y² + b y⁴."""
        a, b = self.a, self.b
        if b > 0:  # for |y| ≥ r: V − s|y| ≥ (5/8) b y⁴ ≥ 5 _TAIL
            r = max((8 * s / b) ** (1 / 3), (8 * _TAIL / b) ** 0.25, 2 * math.sqrt(abs(a) / b))
        else:
            r = s / (2 * a) + 1.1 * math.sqrt(_TAIL / a)
        y = torch.linspace(-r, r, 4097, dtype=torch.float64)
        g = s * y - a * y**2 - b * y**4
        keep = torch.nonzero(g >= g.max() - _TAIL)
        step = 2 * r / 4096
        return y[keep[0, 0]].item() - step, y[keep[-1, 0]].item() + step

    def _quadrature(self, s: Tensor, step: float) -> tuple[Tensor, ...]:
        """F(s), ⟨y⟩_s, Var_s(y), κ₄(s) (fourth cumulant) and F(s + step) − F(s), the latter as
        log⟨e^{step·y}⟩_s without cancellation, at float64 nodes ``s`` ≥ 0, ascending."""
        out = []
        for block in s.split(_BLOCK):
            # the left tail is widest at the smallest s, the right tail at the largest
            lo, hi = self._window(block[0].item())[0], self._window(block[-1].item())[1]
            dy = 1 / (_PER_WIDTH * math.sqrt(2 * self.a + 12 * self.b * max(lo * lo, hi * hi)))
            y = torch.arange(lo, hi + dy, dy, dtype=torch.float64)
            g = block[:, None] * y - self.a * y**2 - self.b * y**4
            top = g.max(1, keepdim=True).values
            w = torch.exp(g - top)
            z = w.sum(1)
            mean = (w @ y) / z
            dev2 = (y - mean[:, None]) ** 2
            var = (w * dev2).sum(1) / z
            k4 = (w * dev2 * dev2).sum(1) / z - 3 * var**2
            incr = torch.log1p((w @ torch.expm1(step * y)) / z)
            out.append((top[:, 0] + torch.log(z * dy), mean, var, k4, incr))
        return tuple(torch.cat(parts) for parts in zip(*out, strict=True))

    def _build(self, s_max: float) -> None:
        """Tabulate F, F' on [0, s_max] with a spacing chosen from max |κ₄| (coarse pass)."""
        var0 = self._quadrature(torch.zeros(1, dtype=torch.float64), 0.0)[2].item()
        coarse = min(0.25, 1 / (16 * math.sqrt(var0)))  # ⟨y⟩ varies on a scale ~ 1/sd in s
        k4 = self._quadrature(torch.arange(0, s_max + coarse, coarse, dtype=torch.float64), 0.0)[3]
        m4 = max(2 * k4.abs().max().item(), 1e-300)  # factor 2: maxima between coarse nodes
        # cubic Hermite: |ΔF'| ≤ √3/216 δ³ max|F''''|,  |ΔF| ≤ δ⁴/384 max|F''''|
        step = min(coarse, (_TOL * 216 / (math.sqrt(3) * m4)) ** (1 / 3))
        n = math.ceil(s_max / step) + 1
        if n > _MAX_NODES:
            raise ValueError(f"|c·h| up to {s_max:g} needs a table of {n} nodes (limit "
                             f"{_MAX_NODES}) for a={self.a}, b={self.b}")
        step = s_max / (n - 1)
        f, df, _, _, incr = self._quadrature(torch.linspace(0, s_max, n, dtype=torch.float64), step)
        df[0] = 0.0  # F is even
        self._s_max, self._step, self._nodes = s_max, step, (f, incr, df)
        self._cache.clear()

    def _table(self, s_abs_max: float, device: torch.device, dtype: torch.dtype
               ) -> tuple[Tensor, ...]:
        if self._nodes is None or s_abs_max > self._s_max:
            s_max = max(_START, self._s_max)
            while s_max < s_abs_max:
                s_max *= 2
            self._build(s_max)
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device=device, dtype=dtype) for t in self._nodes)
        return self._cache[key]

    def _interpolate(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(F(|s|), dF/d|s| of the same cubic, sign(s)) at s = c·h; NaN where h is not finite."""
        s = self.c * h
        finite = torch.isfinite(s)
        u = torch.where(finite, s.abs(), torch.zeros_like(s))
        f, incr, df = self._table(u.max().item() if u.numel() else 0.0, u.device, u.dtype)
        x = u / self._step
        i = x.detach().floor().long().clamp(max=f.numel() - 2)
        t = x - i
        # F(s_i + step) − F(s_i) from the increment table, not as a difference of large values
        rise, d0, d1 = incr[i], self._step * df[i], self._step * df[i + 1]
        t2 = t * t
        value = f[i] + t2 * (3 - 2 * t) * rise + t * (1 - t) ** 2 * d0 + t2 * (t - 1) * d1
        slope = (6 * t * (1 - t) * rise + (1 - t) * (1 - 3 * t) * d0
                 + t * (3 * t - 2) * d1) / self._step
        nan = torch.full_like(value, math.nan)
        return torch.where(finite, value, nan), torch.where(finite, slope, nan), torch.sign(s)

    def log_normalizer(self, h: Tensor) -> Tensor:
        """log Z(h), differentiable in h (d/dh = c·:meth:`mean`, exactly for the interpolant)."""
        return self._interpolate(h)[0]

    def mean(self, h: Tensor) -> Tensor:
        """⟨y⟩_h = (1/c) d log Z/dh, the derivative of the interpolant :meth:`log_normalizer`."""
        _, slope, sign = self._interpolate(h)
        return sign * slope

    def log_prob(self, y: Tensor, h: Tensor) -> Tensor:
        """log p(y | h), broadcasting ``y`` against ``h``; differentiable in both."""
        y2 = y * y
        return -self.a * y2 - self.b * y2 * y2 + self.c * h * y - self.log_normalizer(h)

    def sample(self, h: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exact draws y ~ p(· | h), shape/dtype/device of ``h``; all randomness comes from
        ``generator`` (on ``h``'s device; the global generator if None), so a seeded generator
        reproduces the draws.

        Rejection sampling from b y⁴ ≥ b (2t²y² − t⁴): propose y ~ N(s/P, 1/P), s = c h,
        P = 2(a + 2bt²), accept with probability exp(−b (y² − t²)²). The acceptance rate is
        largest at t² = E_proposal[y²] = s²/P² + 1/P, i.e. at the unique positive root of
        P³ − 2aP² − 4bP − 4bs², found by Newton's method from above (every iterate is ≥ the root,
        so P > 0 and t² ≥ 0 throughout). For b = 0 the proposal is exact.
        """
        s = self.c * h.detach().to(torch.float64).reshape(-1)
        if not torch.isfinite(s).all():
            raise ValueError("SiteConditional.sample needs finite h")
        a, b = self.a, self.b
        if b == 0:
            p, t2 = torch.full_like(s, 2 * a), torch.zeros_like(s)
        else:  # Fujiwara's bound on the roots, then Newton (monotone: the cubic is convex there)
            p = 2 * torch.clamp((2 * b * s * s) ** (1 / 3), min=max(2 * abs(a), 2 * math.sqrt(b)))
            for _ in range(100):
                step = ((p - 2 * a) * p * p - 4 * b * (p + s * s)) / (p * (3 * p - 4 * a) - 4 * b)
                p = p - step
                if bool((step <= 1e-12 * p).all()):
                    break
            t2 = (p - 2 * a) / (4 * b)
        mu, sd = s / p, p.rsqrt()
        y = torch.empty_like(s)
        todo = torch.arange(s.numel(), device=s.device)
        while todo.numel():
            z = torch.randn(todo.numel(), generator=generator, dtype=s.dtype, device=s.device)
            u = torch.rand(todo.numel(), generator=generator, dtype=s.dtype, device=s.device)
            prop = mu[todo] + sd[todo] * z
            ok = u < torch.exp(-b * (prop * prop - t2[todo]) ** 2)
            y[todo[ok]] = prop[ok]
            todo = todo[~ok]
        return y.reshape(h.shape).to(h.dtype)


class Phi4EvenMarginal(Action):
    """φ⁴ (either form) with the even sites integrated out; fields ``(batch, L0, L1, ...)``.

    The ODD sites hold the physical field; the EVEN sites hold auxiliary, independent standard
    normal variables (placeholders a flow may leave alone):

        S_marg(x) = Σ_odd [a x² + b x⁴] − Σ_even log Z(h_e) + Σ_even [x_e²/2 + ½ log 2π],

    so exp(−S_marg) has the same integral over all sites as exp(−S), and for any configuration

        −S(x) = −S_marg(x) − Σ_even log N(x_e) + Σ_even log p(x_e | h_e)

    (N the standard normal density), i.e. log p(x) = log p_odd(x_odd) + Σ_even log p(x_e | h_e)
    with p_odd the exact marginal of the odd sites. Needs even lattice extents. :meth:`complete`
    turns an auxiliary-representation sample into a physical one. ``params()`` is the wrapped
    action's, so the action card stays that of the physical theory.
    """

    theory = "phi4"

    def __init__(self, action: Phi4 | Phi4Hopping):
        if not isinstance(action, Phi4 | Phi4Hopping):
            raise TypeError(f"Phi4EvenMarginal wraps Phi4 or Phi4Hopping, got {action!r}")
        self.action = action
        self._conditionals: dict[int, SiteConditional] = {}
        self._even_masks: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def conditional(self, d: int) -> SiteConditional:
        """The even-site density p(y | h) in ``d`` dimensions (a = 2d + m² in the standard form)."""
        if d not in self._conditionals:
            act = self.action
            if isinstance(act, Phi4):
                abc = (2 * d + act.m2, act.lam, 2.0)
            else:
                abc = (1 - 2 * act.lam, act.lam, 2 * act.kappa)
            self._conditionals[d] = SiteConditional(*abc)
        return self._conditionals[d]

    def _parts(self, x: Tensor) -> tuple[SiteConditional, Tensor, Tensor]:
        """(conditional, even-site mask ``lattice``, h at the even sites ``(batch, n_even)``)."""
        lattice = self.field_shape(tuple(x.shape[1:]))
        key = (lattice, x.device)
        if key not in self._even_masks:
            self._even_masks[key] = checkerboard(lattice, 0, device=x.device)
        even = self._even_masks[key]
        h = _neighbour_sum(torch.where(even, torch.zeros_like(x), x))
        return self.conditional(len(lattice)), even, h[:, even]

    def __call__(self, x: Tensor) -> Tensor:
        cond, even, h = self._parts(x)
        odd, aux = x[:, ~even], x[:, even]
        odd2 = odd * odd
        return ((cond.a * odd2 + cond.b * odd2 * odd2).sum(1)
                + (0.5 * aux * aux + 0.5 * _LOG_2PI).sum(1) - cond.log_normalizer(h).sum(1))

    def force(self, x: Tensor) -> Tensor:
        """−∂S_marg/∂x: −2a x − 4b x³ + c Σ_{even nbrs e} ⟨y⟩_{h_e} (odd), −x (even)."""
        cond, even, h = self._parts(x)
        means = torch.zeros_like(x)
        means[:, even] = cond.mean(h)
        odd = -2 * cond.a * x - 4 * cond.b * x**3 + cond.c * _neighbour_sum(means)
        return torch.where(even, -x, odd)

    def field_shape(self, lattice: tuple[int, ...]) -> tuple[int, ...]:
        if any(n % 2 for n in lattice):
            raise ValueError(f"the even-site marginal needs even lattice extents, got {lattice}")
        return tuple(lattice)

    def params(self) -> dict[str, float | str]:
        return self.action.params()

    def complete(self, x: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        """Replace the auxiliary even entries by exact heat-bath draws given the odd sites.

        Returns ``(x_full, delta)`` with delta ``(batch,)`` = Σ_even [log p(x_e,new | h_e)
        − log N(aux_e)], so that log q_full(x_full) = log q(x) + delta for a sampler of density q
        in the auxiliary representation. ``x`` is not modified.
        """
        cond, even, h = self._parts(x)
        aux = x[:, even]
        y = cond.sample(h, generator)
        full = x.clone()
        full[:, even] = y
        delta = (cond.log_prob(y, h) + 0.5 * aux * aux + 0.5 * _LOG_2PI).sum(1)
        return full, delta

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.action!r})"
