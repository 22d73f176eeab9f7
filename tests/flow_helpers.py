"""Small float64 flows with random (non-identity) weights for the exactness tests."""

from __future__ import annotations

import torch

from latticeflow.flows import Flow, build_flow
from latticeflow.theories.base import Action

ARCHS = {
    "phi4": {"n_couplings": 4, "hidden": [4], "kernel_size": 3},
    "u1": {"n_couplings": 4, "n_mixture": 3, "hidden": [4], "kernel_size": 3, "loop_length": 4},
}
#: Flow variants: "<theory>-<variant>" builds the theory's flow with these overrides.
ARCHS["phi4-fourier"] = {**ARCHS["phi4"], "base": "fourier"}
ARCHS["phi4-spline"] = {**ARCHS["phi4"], "transform": "spline", "n_bins": 4, "spline_bound": 1.5}
ARCHS["phi4-spline-z2"] = {**ARCHS["phi4-spline"], "z2": True}
ARCHS["phi4-multiscale"] = {**ARCHS["phi4-spline"], "base": "fourier", "coarse": [2, 4],
                            "coarse_couplings": 2}
#: The odd sites alone, the even ones integrated out (coarse blocks of 2×2 sites on 4×4).
ARCHS["phi4-heatbath"] = {**ARCHS["phi4-spline"], "base": "fourier", "coarse": [2],
                          "coarse_couplings": 2, "heat_bath": True}
ARCHS["u1-spline"] = {**ARCHS["u1"], "transform": "spline", "n_bins": 4}
#: Action parameters for the flows' base densities (the U(1) default, the plaquette prior).
PARAMS = {"phi4": None, "phi4-fourier": None, "phi4-spline": None, "phi4-spline-z2": None,
          "phi4-multiscale": None, "phi4-heatbath": {"form": "standard", "m2": -4.0, "lam": 5.0},
          "u1": {"beta": 1.5}, "u1-spline": {"beta": 1.5}}


def theory_of(variant: str) -> str:
    """The theory of a flow variant name ("phi4-fourier" → "phi4")."""
    return variant.split("-", 1)[0]


def random_flow(theory: str, lattice=(4, 4), std: float = 0.15, seed: int = 0) -> Flow:
    torch.manual_seed(seed)
    flow = build_flow(theory_of(theory), lattice, ARCHS[theory], PARAMS[theory]).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, std)
    return flow


def wrap_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a − b mapped to (−π, π] (for link angles)."""
    return torch.remainder(a - b + torch.pi, 2 * torch.pi) - torch.pi


class FlowDensityAction(Action):
    """S(x) = −log q*(x) of a frozen flow: a target whose exact samples and optimum are known."""

    theory = "test"

    def __init__(self, flow: Flow):
        self.flow = flow
        for p in flow.parameters():
            p.requires_grad_(False)

    def __call__(self, x):
        return -self.flow.log_prob(x)

    def force(self, x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.flow.log_prob(x).sum(), x)
        return grad

    def field_shape(self, lattice):
        return self.flow.field_shape

    def params(self):
        return {}
