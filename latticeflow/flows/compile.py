"""``torch.compile`` for flows: the couplings' pure pieces for training, the whole forward for
sampling.

Training (:func:`compile_couplings`). Every coupling's :meth:`~MaskedCoupling.condition` (the
conditioner network and its features) and :meth:`~MaskedCoupling.transform` (the elementwise map
with its derivatives) are replaced by compiled callables, stored as instance attributes. The
score recursion of :class:`~latticeflow.flows.coupling.MaskedCoupling` stays eager: its
per-layer input-only ``autograd.grad`` runs over the compiled graphs' backward functions, so
every estimator keeps its meaning. The compiled callables are not submodules, so ``state_dict``
is unchanged: a checkpoint written by a compiled run loads eager and the reverse.

* Couplings of one flow share compiled graphs: their parameters and buffers are graph inputs,
  and only the integers that fix a coupling's geometry (direction, stripe axis) and the grad
  mode of the input are guarded on. The cache limit is raised to hold those variants.
* The fast path backpropagates twice through each coupling's graph (the score's VJP, then the
  loss), so AOTAutograd must not donate the saved tensors of its backward to its outputs.
* Numerical inversion (root finding) stays eager; it calls the eager NCP map.

Sampling (:func:`compile_forward`) compiles ``Flow.forward`` (z → x, log q) as one graph for a
fixed batch size, for long neural-MCMC runs.

Compilation happens at the first call. Callers that report step times warm up explicitly
first, so that compile time is never hidden in the first steps.
"""

from __future__ import annotations

import torch

from latticeflow.base.errors import LatticeflowError
from latticeflow.flows.coupling import MaskedCoupling
from latticeflow.flows.flow import Flow

#: Compiled variants one code object may hold (couplings × grad modes × shapes of a run).
CACHE_SIZE_LIMIT = 64


def _require_compile(what: str) -> None:
    if not hasattr(torch, "compile"):
        raise LatticeflowError(f"{what}: torch {torch.__version__} has no torch.compile")


def compile_couplings(flow: Flow, backend: str = "inductor") -> Flow:
    """Compile every coupling's ``condition`` and ``transform`` in place (static shapes);
    returns ``flow``. Idempotent."""
    _require_compile("compile")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                CACHE_SIZE_LIMIT)
    torch._functorch.config.donated_buffer = False
    for coupling in flow.couplings:
        if not isinstance(coupling, MaskedCoupling) or "condition" in vars(coupling):
            continue
        coupling.condition = torch.compile(coupling.condition, backend=backend, dynamic=False)
        coupling.transform = torch.compile(coupling.transform, backend=backend, dynamic=False)
    return flow


def is_compiled(flow: Flow) -> bool:
    """Whether :func:`compile_couplings` has been applied to ``flow``."""
    return any("condition" in vars(c) for c in flow.couplings)


def compile_forward(flow: Flow, batch: int, backend: str = "inductor") -> None:
    """Compile ``flow``'s forward (z → x, log q) in place for batches of ``batch`` (static
    shapes), and compile it now, on a throw-away batch, rather than inside the first proposal
    batch. Raises :class:`LatticeflowError` when compiling is not possible here."""
    _require_compile("--compile")
    flow.compile(backend=backend, dynamic=False)
    device = flow.device
    try:
        with torch.no_grad():
            flow.sample(batch, generator=torch.Generator(device=device).manual_seed(0))
    except Exception as exc:  # Dynamo and Inductor fail with many exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LatticeflowError(f"--compile: torch.compile failed here ({first})") from None
