"""Neural MCMC: independent Metropolis–Hastings with proposals from a trained flow.

A proposal x′ ~ q is accepted with probability min(1, w(x′)/w(x)), w = exp(−S − log q), where x
is the chain's current configuration. Proposals, their actions and log-weights are computed in
batches on the flow's device; the accept/reject recursion then runs on the host over the batch's
log-weights (one transfer per batch, never one per sample), and the chain configurations are
gathered on the device. The chain state (configuration, S, log q) carries across batches.

Non-finite log weights (S or log q infinite or NaN): such a proposal is never accepted, and a
chain starts at its first proposal with a finite log weight (row 0 of every chain is its
starting state, ``accepted`` true). They are counted with the other proposal statistics
(:attr:`FlowMetropolis.proposals`, :mod:`latticeflow.samplers.proposals`), and a run in which
they are more than a small fraction (:data:`NONFINITE_TOLERANCE`) stops with
:class:`NonFiniteProposals`.

Several chains: with ``n_chains = C`` every step proposes one configuration per chain; rows are
written round-robin, row i belonging to chain ``i % C`` (the ensemble's ``/chain`` dataset).
Proposals are drawn in batches of exactly ``batch_size`` steps whatever the caller's chunking,
and unused proposals are part of the resume state, so a resumed run reproduces an uninterrupted
one bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from latticeflow.base.errors import LatticeflowError
from latticeflow.flows.flow import Flow
from latticeflow.samplers.proposals import ProposalStats
from latticeflow.theories.base import Action

#: A run stops (:class:`NonFiniteProposals`) once more than ``NONFINITE_ALLOWANCE`` of its
#: proposals, and more than this fraction of them, have a non-finite log weight.
NONFINITE_TOLERANCE = 0.01
NONFINITE_ALLOWANCE = 10
_PROPOSALS = "proposals_"   # prefix of the proposal statistics in the resume state


def independence_chain(log_weight: np.ndarray, log_u: np.ndarray, current: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The Metropolis recursion for independence proposals.

    ``log_weight``, ``log_u``: ``(steps, chains)`` of the proposals and of uniform draws;
    ``current``: ``(chains,)`` log-weight of the states before the first step (−inf: no state
    yet, so the first finite proposal is accepted). A proposal with a non-finite log weight
    (±inf or NaN) is never accepted. Returns the accepted flags and, per step and chain, the
    index of the proposal that is the chain state (−1: still the state carried in from before
    the batch).
    """
    steps, chains = log_weight.shape
    state = np.full((steps, chains), -1, dtype=np.int64)
    accepted = np.zeros((steps, chains), dtype=bool)
    finite = np.isfinite(log_weight)
    current = current.astype(np.float64).copy()
    index = np.full(chains, -1, dtype=np.int64)
    with np.errstate(invalid="ignore"):  # −inf − (−inf) of a non-finite proposal: never taken
        for t in range(steps):
            accept = finite[t] & (log_u[t] < log_weight[t] - current)
            index = np.where(accept, t, index)
            current = np.where(accept, log_weight[t], current)
            state[t], accepted[t] = index, accept
    return accepted, state


class NonFiniteProposals(LatticeflowError):
    """More than :data:`NONFINITE_TOLERANCE` of a run's proposals have a non-finite log
    weight: the flow or the action is broken (the message says how many)."""


class FlowMetropolis:
    """Independent Metropolis–Hastings chains driven by ``flow``; the sampler protocol of
    :mod:`latticeflow.samplers.chain` with rows ``configs, action, accepted, log_q,
    log_weight`` (and ``chain`` when ``n_chains > 1``)."""

    def __init__(self, flow: Flow, action: Action, *, seed: int, batch_size: int = 1024,
                 n_chains: int = 1, store_dtype: torch.dtype = torch.float32):
        if batch_size < 1 or n_chains < 1:
            raise ValueError("batch_size and n_chains must be >= 1")
        self.flow, self.action = flow.eval(), action
        self.batch_size, self.n_chains, self.store_dtype = batch_size, n_chains, store_dtype
        self.device, self.dtype = flow.device, flow.dtype
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.rows_emitted = 0
        self._pending: dict[str, Tensor] | None = None  # proposals drawn but not yet used
        self._state: dict[str, Tensor] | None = None    # (C, ...) current chain state
        self.proposals = ProposalStats()  # every proposal used, across resumes
        self._session_rows = self._session_accepted = 0

    @torch.no_grad()
    def _propose(self) -> dict[str, Tensor]:
        """One batch: ``batch_size`` steps × ``n_chains`` proposals, all on the device."""
        n = self.batch_size * self.n_chains
        x, log_q = self.flow.sample(n, generator=self.generator)
        u = torch.rand(n, device=self.device, dtype=torch.float64, generator=self.generator)
        s = self.action(x)
        return {"x": x, "log_q": log_q.double(), "action": s.double(), "log_u": torch.log(u)}

    def _take(self, steps: int) -> dict[str, Tensor]:
        """The next ``steps`` × C proposals, drawing new batches as needed."""
        need = steps * self.n_chains
        parts = []
        while need > 0:
            if self._pending is None or len(self._pending["x"]) == 0:
                self._pending = self._propose()
            k = min(need, len(self._pending["x"]))
            parts.append({key: v[:k] for key, v in self._pending.items()})
            self._pending = {key: v[k:] for key, v in self._pending.items()}
            need -= k
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    @torch.no_grad()
    def advance(self, k: int) -> dict[str, np.ndarray]:
        """The next ``k`` rows (``k`` must be a multiple of ``n_chains``).

        Raises :class:`NonFiniteProposals` when too many proposals have a non-finite log weight.
        """
        if k < 1 or k % self.n_chains:
            raise ValueError(f"rows per call ({k}) must be a positive multiple of n_chains "
                             f"({self.n_chains})")
        steps = k // self.n_chains
        parts = []
        if self._state is None:
            self._state = self._start()
            parts.append(self._rows(self._state, np.ones((1, self.n_chains), dtype=bool)))
            steps -= 1
        if steps:
            parts.append(self._metropolis(steps))
        out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        self.rows_emitted += k
        self._session_rows += k
        self._session_accepted += int(out["accepted"].sum())
        return out

    def _record(self, log_weight: np.ndarray) -> None:
        """Add proposals' log weights to :attr:`proposals`; stop when too many are non-finite."""
        self.proposals.add(log_weight)
        bad, total = self.proposals.nonfinite, self.proposals.count
        if bad > NONFINITE_ALLOWANCE and bad > NONFINITE_TOLERANCE * total:
            raise NonFiniteProposals(
                f"{bad} of {total} flow proposals have a non-finite log weight −S − log q "
                f"(more than {NONFINITE_TOLERANCE:.0%}): the flow or the action gives inf or NaN")

    def _start(self) -> dict[str, Tensor]:
        """The first state of every chain: its first proposal with a finite log weight. Steps
        of C proposals are drawn until every chain has one; in those steps the proposals of
        chains that already have their state are discarded (they are independent of which
        proposals are finite, so this biases nothing)."""
        state: dict[str, Tensor] | None = None
        started = torch.zeros(self.n_chains, dtype=torch.bool, device=self.device)
        while not bool(started.all()):
            prop = self._take(1)
            prop.pop("log_u")
            prop["log_weight"] = -prop["action"] - prop["log_q"]
            self._record(prop["log_weight"].cpu().numpy())
            new = torch.isfinite(prop["log_weight"]) & ~started
            state = prop if state is None else {
                key: torch.where(new.view(-1, *[1] * (v.dim() - 1)), prop[key], v)
                for key, v in state.items()}
            started |= new
        return state

    def _metropolis(self, steps: int) -> dict[str, np.ndarray]:
        """Rows of ``steps`` Metropolis steps from the current chain states."""
        c = self.n_chains
        prop = self._take(steps)
        prop["log_weight"] = -prop["action"] - prop["log_q"]
        host = torch.stack([prop["log_weight"], prop["log_u"]]).cpu().numpy()
        self._record(host[0])
        current = self._state["log_weight"].cpu().numpy()
        accepted, state = independence_chain(host[0].reshape(steps, c),
                                             host[1].reshape(steps, c), current)
        # Gather the chain states: index −1 picks the carried state, t picks proposal t.
        flat = torch.as_tensor(state, device=self.device)
        flat = torch.where(flat < 0, -1, flat * c + torch.arange(c, device=self.device))
        pool = {key: torch.cat([prop[key], self._state[key]]) for key in self._state}
        carried = len(prop["x"]) + torch.arange(c, device=self.device).expand(steps, c)
        index = torch.where(flat < 0, carried, flat).reshape(-1)
        rows = {key: v.index_select(0, index) for key, v in pool.items()}
        self._state = {key: v[-c:] for key, v in rows.items()}
        return self._rows(rows, accepted)

    def _rows(self, rows: dict[str, Tensor], accepted: np.ndarray) -> dict[str, np.ndarray]:
        """The ensemble rows of chain states ``rows`` (steps × C, step-major) with their
        ``accepted`` flags ``(steps, C)``."""
        out = {
            "configs": rows["x"].to(self.store_dtype).cpu().numpy(),
            "action": rows["action"].cpu().numpy(),
            "accepted": accepted.reshape(-1),
            "log_q": rows["log_q"].cpu().numpy(),
            "log_weight": rows["log_weight"].cpu().numpy(),
        }
        if self.n_chains > 1:
            out["chain"] = np.tile(np.arange(self.n_chains, dtype=np.int32), len(accepted))
        return out

    @property
    def acceptance_rate(self) -> float:
        """Accepted fraction of the rows produced since this object was created."""
        return self._session_accepted / self._session_rows if self._session_rows else math.nan

    def attributes(self) -> dict[str, int | float]:
        """Root attributes for the ensemble file: the proposal summary of
        :mod:`latticeflow.samplers.proposals` (written with every chunk by
        :func:`latticeflow.samplers.chain.run_chain`)."""
        return self.proposals.summary().attributes()

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"generator": self.generator.get_state().numpy(),
                 "rows_emitted": np.int64(self.rows_emitted)}
        for prefix, part in (("chain_", self._state), ("pending_", self._pending)):
            for key, v in (part or {}).items():
                state[prefix + key] = v.cpu().numpy()
        state.update(self.proposals.state_dict(_PROPOSALS))
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.generator.set_state(torch.as_tensor(np.asarray(state["generator"])))
        self.rows_emitted = int(state["rows_emitted"])

        def part(prefix: str) -> dict[str, Tensor] | None:
            keys = [k for k in state if k.startswith(prefix)]
            if not keys:
                return None
            return {k[len(prefix):]: torch.as_tensor(np.asarray(state[k]), device=self.device)
                    for k in keys}

        self._state, self._pending = part("chain_"), part("pending_")
        self.proposals = ProposalStats.from_state_dict(state, _PROPOSALS)
