"""A normalizing flow: a base density followed by a stack of layers.

x = T(z) = T_K ∘ … ∘ T_1(z), z ~ q₀, log q(x) = log q₀(z) − Σ_k log|det J_k|.

A layer is a module with ``forward``/``inverse`` (the map and its log-determinant) and
``forward_and_score``/``inverse_and_score`` (one step of the score recursion, DESIGN §4): the
masked couplings (:class:`~latticeflow.flows.coupling.MaskedCoupling`) and the linear Fourier
Gaussian layer (:class:`~latticeflow.flows.fourier.FourierGaussian`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latticeflow.flows.priors import Prior
from latticeflow.theories.base import Action
from latticeflow.theories.phi4_sublattice import Phi4EvenMarginal


class Flow(nn.Module):
    """Flow over fields of shape ``prior.field_shape``; batches are ``(batch, *field_shape)``.

    ``couplings``: the layers in sampling order (the name is kept for checkpoint keys); may be
    empty (the base alone, e.g. the U(1) plaquette prior). ``heat_bath``: for a flow that
    models only the odd sites of a φ⁴ field, the odd sites' marginal (the target its layers are
    trained against; even entries are placeholder noise): :meth:`sample` then draws the even
    sites from their exact conditional, and its log q is the complete sampler's. Every other
    method works in the flow's own representation. :attr:`device` and :attr:`dtype`
    follow ``.to()`` through a scalar buffer that is not saved, so they exist without parameters.
    """

    def __init__(self, prior: Prior, couplings: list[nn.Module],
                 heat_bath: Phi4EvenMarginal | None = None):
        super().__init__()
        self.prior = prior
        self.heat_bath = heat_bath
        self.couplings = nn.ModuleList(couplings)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device the flow samples on."""
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the flow samples in."""
        return self.anchor.dtype

    @property
    def field_shape(self) -> tuple[int, ...]:
        return self.prior.field_shape

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, device=self.device, dtype=self.dtype, generator=generator)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """x = T(z) and log q(x)."""
        x, log_q = z, self.prior.log_prob(z)
        for coupling in self.couplings:
            x, log_det = coupling(x)
            log_q = log_q - log_det
        return x, log_q

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z = T⁻¹(x) and log q(x); differentiable (implicit function theorem for NCP layers)."""
        z, log_det_inverse = x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for coupling in reversed(self.couplings):
            z, log_det = coupling.inverse(z)
            log_det_inverse = log_det_inverse + log_det
        return z, self.prior.log_prob(z) + log_det_inverse

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x), shape ``(batch,)``."""
        return self.inverse(x)[1]

    def training_target(self, action: Action) -> Action:
        """The action the layers are trained against: ``action`` itself, or for a heat-bath
        flow the odd sites' marginal of it (the flow's own representation)."""
        return action if self.heat_bath is None else self.heat_bath

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` configurations of the theory: ``(x, log q(x))`` (with :attr:`heat_bath`,
        the even sites completed by their exact conditional; log q includes it)."""
        return self.complete(*self(self.sample_prior(n, generator)), generator)

    def complete(self, x: Tensor, log_q: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        """Draws ``x`` of density ``log_q`` in the flow's own representation as configurations
        of the theory: unchanged, or with :attr:`heat_bath` the even sites drawn from their
        exact conditional and its log density added to log q."""
        if self.heat_bath is None:
            return x, log_q
        x, log_conditional = self.heat_bath.complete(x, generator)
        return x, log_q + log_conditional

    def forward_and_score(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x = T(z), log q(x) and the detached score ∇_x log q(x), without inverting."""
        x, log_q, score = z, self.prior.log_prob(z), self.prior.score(z)
        for coupling in self.couplings:
            x, log_det, score = coupling.forward_and_score(x, score)
            log_q = log_q - log_det
        return x, log_q, score

    def inverse_and_score(self, x: Tensor, score_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z = T⁻¹(x) (with graph), log q(x), and the detached pull-back score ∇_z log p♯(z).

        ``score_x`` is ∇_x log p(x) of some density p; p♯(z) = p(T(z)) |det J_T(z)|.
        """
        z, log_det_inverse = x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for coupling in reversed(self.couplings):
            z, log_det, score_x = coupling.inverse_and_score(z, score_x)
            log_det_inverse = log_det_inverse + log_det
        return z, self.prior.log_prob(z) + log_det_inverse, score_x
