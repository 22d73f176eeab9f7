"""Neural MCMC: independent Metropolis–Hastings with proposals from a trained flow.

A proposal x′ ~ q is accepted with probability min(1, w(x′)/w(x)), w = exp(−S − log q), where x
is the chain's current configuration. Proposals, their actions and log-weights are computed in
batches on the flow's device; the accept/reject recursion then runs on the host over the batch's
log-weights (one transfer per batch, never one per sample), and the chain configurations are
gathered on the device. The chain state (configuration, S, log q) carries across batches.

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

from latticeflow.flows.flow import Flow
from latticeflow.theories.base import Action


def independence_chain(log_weight: np.ndarray, log_u: np.ndarray, current: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The Metropolis recursion for independence proposals.

    ``log_weight``, ``log_u``: ``(steps, chains)`` of the proposals and of uniform draws;
    ``current``: ``(chains,)`` log-weight of the states before the first step. Returns the
    accepted flags and, per step and chain, the index of the proposal that is the chain state
    (−1: still the state carried in from before the batch).
    """
    steps, chains = log_weight.shape
    state = np.full((steps, chains), -1, dtype=np.int64)
    accepted = np.zeros((steps, chains), dtype=bool)
    current = current.astype(np.float64).copy()
    index = np.full(chains, -1, dtype=np.int64)
    for t in range(steps):
        accept = log_u[t] < log_weight[t] - current
        index = np.where(accept, t, index)
        current = np.where(accept, log_weight[t], current)
        state[t], accepted[t] = index, accept
    return accepted, state


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
        ref = next(flow.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.rows_emitted = 0
        self._pending: dict[str, Tensor] | None = None  # proposals drawn but not yet used
        self._state: dict[str, Tensor] | None = None    # (C, ...) current chain state
        self._session_log_weights: list[np.ndarray] = []  # proposals used in this session
        self._session_accepted = 0

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
        """The next ``k`` rows (``k`` must be a multiple of ``n_chains``)."""
        if k % self.n_chains:
            raise ValueError(f"rows per call ({k}) must be a multiple of n_chains "
                             f"({self.n_chains})")
        steps, c = k // self.n_chains, self.n_chains
        prop = self._take(steps)
        prop["log_weight"] = -prop["action"] - prop["log_q"]
        if self._state is None:  # the first proposal of each chain starts it
            first = {key: v[:c] for key, v in prop.items() if key != "log_u"}
            self._state = {key: torch.full_like(v, -math.inf) if key == "log_weight" else v
                           for key, v in first.items()}
        host = torch.stack([prop["log_weight"], prop["log_u"]]).cpu().numpy()
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
        self.rows_emitted += k
        self._session_log_weights.append(host[0])
        self._session_accepted += int(accepted.sum())
        out = {
            "configs": rows["x"].to(self.store_dtype).cpu().numpy(),
            "action": rows["action"].cpu().numpy(),
            "accepted": accepted.reshape(-1),
            "log_q": rows["log_q"].cpu().numpy(),
            "log_weight": rows["log_weight"].cpu().numpy(),
        }
        if c > 1:
            out["chain"] = np.tile(np.arange(c, dtype=np.int32), steps)
        return out

    def proposal_log_weights(self) -> np.ndarray:
        """log w of the proposals used since this object was created (for the proposal ESS)."""
        if not self._session_log_weights:
            return np.zeros(0)
        return np.concatenate(self._session_log_weights)

    @property
    def acceptance_rate(self) -> float:
        """Accepted fraction of the proposals used since this object was created."""
        n = sum(len(lw) for lw in self._session_log_weights)
        return self._session_accepted / n if n else float("nan")

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"generator": self.generator.get_state().numpy(),
                 "rows_emitted": np.int64(self.rows_emitted)}
        for prefix, part in (("chain_", self._state), ("pending_", self._pending)):
            for key, v in (part or {}).items():
                state[prefix + key] = v.cpu().numpy()
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
