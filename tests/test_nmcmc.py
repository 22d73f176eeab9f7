from pathlib import Path

import numpy as np
import pytest
import torch
from flow_helpers import FlowDensityAction, random_flow

from latticeflow import exact
from latticeflow.config import load_recipe
from latticeflow.flows import build_flow
from latticeflow.observables import plaquette_mean, topological_charge
from latticeflow.samplers.nmcmc import (
    NONFINITE_ALLOWANCE,
    FlowMetropolis,
    NonFiniteProposals,
    independence_chain,
)
from latticeflow.samplers.proposals import TAIL_CAPACITY, ProposalStats
from latticeflow.statistics import ess, gamma_method
from latticeflow.thermodynamics import pareto_k, sample_flow
from latticeflow.training import open_trainer


def _reference_chain(log_weight, log_u, current):
    """Plain per-sample Metropolis loop, one chain at a time."""
    steps, chains = log_weight.shape
    state = np.full((steps, chains), -1)
    accepted = np.zeros((steps, chains), dtype=bool)
    for c in range(chains):
        lw, idx = current[c], -1
        for t in range(steps):
            if np.log(np.exp(log_u[t, c])) < log_weight[t, c] - lw:
                lw, idx = log_weight[t, c], t
                accepted[t, c] = True
            state[t, c] = idx
    return accepted, state


def test_vectorised_recursion_matches_per_sample_loop():
    rng = np.random.default_rng(0)
    lw = rng.normal(size=(300, 3))
    log_u = np.log(rng.random((300, 3)))
    current = rng.normal(size=3)
    accepted, state = independence_chain(lw, log_u, current)
    ref_accepted, ref_state = _reference_chain(lw, log_u, current)
    np.testing.assert_array_equal(accepted, ref_accepted)
    np.testing.assert_array_equal(state, ref_state)
    assert 0.2 < accepted.mean() < 0.8


@pytest.mark.parametrize("chains", [1, 3])
def test_rows_are_consistent(chains):
    target = FlowDensityAction(random_flow("phi4", (4, 4), seed=5))
    sampler = FlowMetropolis(random_flow("phi4", (4, 4), seed=1), target, seed=0,
                             batch_size=50, n_chains=chains, store_dtype=torch.float64)
    rows = sampler.advance(120 * chains)
    x = torch.as_tensor(rows["configs"])
    torch.testing.assert_close(torch.as_tensor(rows["action"]), target(x))
    np.testing.assert_allclose(rows["log_weight"], -rows["action"] - rows["log_q"])
    for c in range(chains):
        mine = rows["configs"][c::chains]
        moved = np.any(mine[1:] != mine[:-1], axis=tuple(range(1, mine.ndim)))
        np.testing.assert_array_equal(moved, rows["accepted"][c::chains][1:])
    if chains > 1:
        np.testing.assert_array_equal(rows["chain"], np.tile(np.arange(chains), 120))


def run_with_resume(flow, target) -> tuple[dict[str, np.ndarray], FlowMetropolis]:
    """400 rows (2 chains, batches of 64, seed 3) in uneven calls, resumed after 200 rows into
    a sampler built with another seed; returns the joined rows and the resumed sampler."""
    first = FlowMetropolis(flow, target, seed=3, batch_size=64, n_chains=2)
    part = [first.advance(130), first.advance(70)]
    second = FlowMetropolis(flow, target, seed=999, batch_size=64, n_chains=2)
    second.load_state_dict(first.state_dict())
    part += [second.advance(90), second.advance(110)]
    return {key: np.concatenate([p[key] for p in part]) for key in part[0]}, second


def test_resume_reproduces_uninterrupted_run_whatever_the_chunking():
    flow = random_flow("u1", (4, 4), seed=1)
    target = FlowDensityAction(random_flow("u1", (4, 4), seed=5))
    whole = FlowMetropolis(flow, target, seed=3, batch_size=64, n_chains=2).advance(400)
    rows, _ = run_with_resume(flow, target)
    for key in whole:
        np.testing.assert_array_equal(rows[key], whole[key])


def test_poor_flow_still_gives_unbiased_expectations():
    """An untrained (identity) flow proposing for a different density: low acceptance, but
    the chain's means agree with exact samples of the target within a few standard errors."""
    target_flow = random_flow("phi4", (4, 4), seed=5, std=0.1)
    target = FlowDensityAction(target_flow)
    poor = build_flow("phi4", (4, 4), {"n_couplings": 2, "hidden": [4]}).double()
    sampler = FlowMetropolis(poor, target, seed=0, batch_size=4000)
    rows = sampler.advance(40000)
    acceptance = rows["accepted"].mean()
    assert acceptance < 0.4
    with torch.no_grad():
        exact = target_flow.sample(40000)[0].numpy()

    def observables(x):
        m = x.mean(axis=(1, 2))
        return np.column_stack([m, m**2, (x**2).mean(axis=(1, 2))])

    chain_obs, exact_obs = observables(rows["configs"]), observables(exact)
    for k in range(3):
        mc = gamma_method(chain_obs[:, k])
        ex = gamma_method(exact_obs[:, k])
        pull = (mc.value - ex.value) / np.hypot(mc.error, ex.error)
        assert abs(pull) < 4, (k, mc.value, ex.value, pull)


U1_CARD = 'theory = "u1"\nbeta = 2.0\n'
#: Calibration: independent NMCMC runs (seeds) × rows per run, and the flow's training steps
#: (from uniform links on 4×4 at β = 2 the flow reaches a proposal ESS of 0.1–0.2 after 200).
CALIBRATION_SEEDS, CALIBRATION_ROWS, CALIBRATION_TRAINING = 24, 6000, 200


def _train_u1_flow(tmp_path: Path, steps: int):
    """A U(1) flow on 4×4 at β = 2 from uniform links (the plaquette prior alone is nearly
    exact there), trained for ``steps`` reverse-KL steps; returns the flow and the action."""
    (tmp_path / "card.toml").write_text(U1_CARD)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(
        'action = "card.toml"\nlattice = [4, 4]\ndevice = "cpu"\nseed = 1\n'
        '[flow]\nprior = "uniform"\n'
        f'[training]\nsteps = {steps}\nbatch_size = 256\nlr = 3e-3\nschedule = "cosine"\n'
        "ess_interval = 100\ncheckpoint_interval = 10000\n")
    trainer = open_trainer(load_recipe(recipe_file), tmp_path / "run")
    trainer.train()
    return trainer.flow.eval(), trainer.recipe.action()


def _u1_pulls(flow, action, seeds: int, rows: int) -> dict[str, np.ndarray]:
    """(estimate − exact)/error of the plaquette and χ_t = <Q²>/V over independent runs."""
    volume = 16
    references = {"plaquette": exact.u1_mean_plaquette(2.0, (4, 4)),
                  "chi_t": exact.u1_topological_susceptibility(2.0, (4, 4))}
    pulls: dict[str, list[float]] = {name: [] for name in references}
    for seed in range(seeds):
        sampler = FlowMetropolis(flow, action, seed=100 + seed, batch_size=2000)
        links = torch.as_tensor(sampler.advance(rows)["configs"], dtype=torch.float64)
        series = {"plaquette": plaquette_mean(links).numpy(),
                  "chi_t": topological_charge(links).round().numpy() ** 2 / volume}
        for name, values in series.items():
            result = gamma_method(values)
            pulls[name].append((result.value - references[name]) / result.error)
    return {name: np.asarray(p) for name, p in pulls.items()}


@pytest.mark.slow
def test_nmcmc_error_bars_are_calibrated(tmp_path):
    """Pulls (estimate − exact)/error of independent NMCMC runs with a flow of moderate quality
    (proposal ESS 0.1–0.2): standard deviation within 0.7–1.4 and mean within ±0.5, for the
    plaquette and the topological susceptibility (exact finite-volume values)."""
    flow, action = _train_u1_flow(tmp_path, CALIBRATION_TRAINING)
    with torch.no_grad():
        proposals = sample_flow(flow, action, 20000, generator=torch.Generator().manual_seed(9))
    assert 0.05 < ess(proposals.log_weight) < 0.35
    pulls = _u1_pulls(flow, action, CALIBRATION_SEEDS, CALIBRATION_ROWS)
    table = "; ".join(f"{name}: mean {p.mean():+.2f}, std {p.std(ddof=1):.2f}"
                      for name, p in pulls.items())
    print(f"proposal ESS {ess(proposals.log_weight):.3f}; pulls over {CALIBRATION_SEEDS} seeds "
          f"× {CALIBRATION_ROWS} rows: {table}")
    for p in pulls.values():
        assert 0.7 < p.std(ddof=1) < 1.4, table
        assert abs(p.mean()) < 0.5, table


# ------------------------------------------------------------------ non-finite log weights


class PoisonedFlow(torch.nn.Module):
    """``flow`` whose proposals at the given positions of its stream of draws (0: the first
    proposal it ever returns) get log q = ``value``: −inf gives log w = +inf, +inf gives
    log w = −inf, NaN gives NaN."""

    def __init__(self, flow, positions, value: float):
        super().__init__()
        self.flow, self.positions, self.value, self.drawn = flow, set(positions), value, 0

    @property
    def device(self):
        return self.flow.device

    @property
    def dtype(self):
        return self.flow.dtype

    def sample(self, n, generator=None):
        x, log_q = self.flow.sample(n, generator=generator)
        for j in self.positions:
            if self.drawn <= j < self.drawn + n:
                log_q[j - self.drawn] = self.value
        self.drawn += n
        return x, log_q


BATCH = 16


def _poison_cases(chains: int) -> dict[str, list[int]]:
    """Positions in the proposal stream (step-major: proposal j is chain j % C of step j // C)."""
    last = BATCH * chains - 1
    return {"first": [0], "first-two-steps": [0, chains], "middle": [5 * chains + chains - 1],
            "batch-boundary": [last, last + 1], "every-chain-first": list(range(chains))}


def _reference_rows(stream: dict, steps: int, chains: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample reference of FlowMetropolis over the proposal stream: each chain starts at
    its first finite proposal (steps are drawn until all have one), then a proposal is
    accepted iff its log weight is finite and log u < log w′ − log w. Returns, per row
    (steps, C), the stream step of the proposal that is the chain state, and ``accepted``."""
    lw = (-stream["action"] - stream["log_q"]).numpy().reshape(-1, chains)
    log_u = stream["log_u"].numpy().reshape(-1, chains)
    start: list[int | None] = [None] * chains
    t = 0
    while None in start:
        for c in range(chains):
            if start[c] is None and np.isfinite(lw[t, c]):
                start[c] = t
        t += 1
    index = np.array(start)
    states, accepted = [index.copy()], [np.ones(chains, dtype=bool)]
    for step in range(t, t + steps - 1):
        flags = np.zeros(chains, dtype=bool)
        for c in range(chains):
            if np.isfinite(lw[step, c]) and log_u[step, c] < lw[step, c] - lw[index[c], c]:
                index[c], flags[c] = step, True
        states.append(index.copy())
        accepted.append(flags)
    return np.array(states), np.array(accepted)


@pytest.mark.parametrize("bad", [np.nan, -np.inf, np.inf], ids=["nan", "logq-minus-inf",
                                                                  "logq-plus-inf"])
def test_recursion_never_accepts_a_non_finite_proposal(bad):
    rng = np.random.default_rng(1)
    lw = rng.normal(size=(200, 3))
    log_u = np.log(rng.random((200, 3)))
    for t, c in [(0, 0), (1, 0), (0, 1), (77, 1), (199, 2), (100, 2)]:
        lw[t, c] = -bad  # log w = −log q − S
    current = np.array([-np.inf, 0.3, -0.2])   # chain 0 has no state yet
    accepted, state = independence_chain(lw, log_u, current)
    assert not accepted[~np.isfinite(lw)].any()
    assert accepted[2, 0] and state[1, 0] == -1 and state[2, 0] == 2   # starts at t = 2
    with np.errstate(invalid="ignore"):   # −inf − (−inf)
        ref_accepted, ref_state = _reference_chain(np.where(np.isfinite(lw), lw, -np.inf),
                                                   log_u, current)
    np.testing.assert_array_equal(accepted, ref_accepted)
    np.testing.assert_array_equal(state, ref_state)


@pytest.mark.parametrize("bad", [np.nan, -np.inf, np.inf], ids=["nan", "logq-minus-inf",
                                                                  "logq-plus-inf"])
@pytest.mark.parametrize("case", ["first", "first-two-steps", "middle", "batch-boundary",
                                  "every-chain-first"])
@pytest.mark.parametrize("chains", [1, 3])
def test_non_finite_proposals_are_never_chain_states(chains, case, bad):
    positions = _poison_cases(chains)[case]
    flow = random_flow("phi4", (4, 4), seed=1)
    target = FlowDensityAction(random_flow("phi4", (4, 4), seed=5))
    steps = 3 * BATCH

    def sampler():
        return FlowMetropolis(PoisonedFlow(flow, positions, bad), target, seed=4,
                              batch_size=BATCH, n_chains=chains, store_dtype=torch.float64)

    rows = sampler().advance(steps * chains)
    reference = sampler()
    batches = [reference._propose() for _ in range(4)]
    stream = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    states, accepted = _reference_rows(stream, steps, chains)
    proposal = states * chains + np.arange(chains)      # index in the stream
    for key, column in (("configs", "x"), ("log_q", "log_q"), ("action", "action")):
        np.testing.assert_array_equal(rows[key], stream[column].numpy()[proposal.reshape(-1)],
                                      err_msg=key)
    np.testing.assert_array_equal(rows["accepted"], accepted.reshape(-1))
    assert np.all(np.isfinite(rows["log_weight"])) and np.all(np.isfinite(rows["log_q"]))
    np.testing.assert_array_equal(rows["log_weight"], -rows["action"] - rows["log_q"])
    assert not np.isin(proposal, positions).any()


def test_resume_is_bit_identical_with_non_finite_proposals():
    flow = random_flow("u1", (4, 4), seed=1)
    target = FlowDensityAction(random_flow("u1", (4, 4), seed=5))
    positions = [0, 3, 127, 128, 300]   # chain 0 starts late; a batch boundary (64 × 2)

    whole = FlowMetropolis(PoisonedFlow(flow, positions, np.nan), target, seed=3,
                           batch_size=64, n_chains=2)
    expected = whole.advance(400)
    # one poisoned stream, continued after the resume
    rows, second = run_with_resume(PoisonedFlow(flow, positions, np.nan), target)
    for key in expected:
        np.testing.assert_array_equal(rows[key], expected[key])
    assert second.proposals.summary() == whole.proposals.summary()
    assert whole.proposals.nonfinite == len(positions) and whole.proposals.count == 402


def test_too_many_non_finite_proposals_stop_the_run():
    flow = random_flow("phi4", (4, 4), seed=1)
    target = FlowDensityAction(random_flow("phi4", (4, 4), seed=5))

    def run(positions):
        sampler = FlowMetropolis(PoisonedFlow(flow, positions, np.nan), target, seed=0,
                                 batch_size=BATCH)
        return sampler.advance(4 * BATCH)

    rows = run(range(NONFINITE_ALLOWANCE))          # the allowance is tolerated
    assert np.all(np.isfinite(rows["log_weight"]))
    with pytest.raises(NonFiniteProposals, match=r"11 of \d+ flow proposals .*non-finite"):
        run(range(NONFINITE_ALLOWANCE + 1))
    with pytest.raises(NonFiniteProposals, match="non-finite"):
        run(range(10**6))                            # a flow that only gives NaN


# ------------------------------------------------------------------ proposal diagnostics


def test_proposal_statistics_are_those_of_all_proposals():
    flow = random_flow("phi4", (4, 4), seed=1)
    target = FlowDensityAction(random_flow("phi4", (4, 4), seed=5))
    sampler = FlowMetropolis(flow, target, seed=2, batch_size=100, n_chains=2)
    for _ in range(3):
        sampler.advance(600)                      # 1800 proposals: 9 batches of 200
    reference = FlowMetropolis(flow, target, seed=2, batch_size=100, n_chains=2)
    lw = torch.cat([-(b["action"] + b["log_q"]) for b in
                    (reference._propose() for _ in range(9))]).numpy()
    summary = sampler.proposals.summary()
    assert (summary.proposals, summary.nonfinite) == (1800, 0)
    assert summary.ess == pytest.approx(ess(lw), rel=1e-12)
    assert summary.pareto_k == pareto_k(lw)
    attributes = sampler.attributes()
    assert attributes["proposal_ess"] == summary.ess and attributes["proposals"] == 1800
    # The stored rows are states of p: their "ESS" is not the proposal ESS.
    assert ess(sampler.advance(2)["log_weight"]) != summary.ess


def test_proposal_statistics_keep_a_bounded_tail_and_combine():
    rng = np.random.default_rng(3)
    lw = rng.standard_t(3, size=3 * TAIL_CAPACITY)
    lw[[5, 6000]] = [np.nan, np.inf]
    parts = [ProposalStats() for _ in range(3)]
    for part, piece in zip(parts, np.array_split(lw, 3), strict=True):
        for chunk in np.array_split(piece, 5):
            part.add(chunk)
    whole = ProposalStats()
    whole.add(lw)
    combined = ProposalStats.combined(parts)
    finite = lw[np.isfinite(lw)]
    for stats in (whole, combined):
        assert (stats.count, stats.nonfinite) == (lw.size, 2)
        assert stats.tail.shape == (TAIL_CAPACITY,)
        np.testing.assert_array_equal(stats.tail, np.sort(finite)[-TAIL_CAPACITY:])
        assert stats.summary().ess == pytest.approx(ess(finite), rel=1e-12)
    assert whole.summary().pareto_k == pareto_k(finite)   # 3√N < capacity: the same tail
    state = whole.state_dict("p_")
    assert ProposalStats.from_state_dict(state, "p_").summary() == whole.summary()


def test_proposal_statistics_do_not_depend_on_how_proposals_arrive():
    """Float sums depend on grouping: the summary must not depend on the batch sizes the log
    weights arrive in, nor on a save and restore of the state in between (a resume)."""
    rng = np.random.default_rng(4)
    log_w = np.concatenate([rng.normal(0.0, 3.0, 3000), [np.nan, -np.inf],
                            rng.normal(5.0, 1.0, 2500)])   # the maximum grows late
    whole = ProposalStats()
    whole.add(log_w)
    for trial in range(5):
        cuts = np.sort(rng.choice(np.arange(1, log_w.size), size=7 + trial, replace=False))
        pieces = ProposalStats()
        for i, part in enumerate(np.split(log_w, cuts)):
            pieces.add(part)
            if i == 3:   # a resume: the state goes through the file's arrays
                pieces = ProposalStats.from_state_dict(pieces.state_dict("p/"), "p/")
        assert pieces.summary() == whole.summary()
