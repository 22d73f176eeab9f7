"""Checkpoint files: the format, reading and validating them, the trained flow of one for
sampling, the atomic write, and the checks that refuse a checkpoint that does not fit (resuming
with another recipe or number of processes, initialising from another theory or architecture).

Checkpoint (a dict of tensors, numbers, strings, lists and dicts: loadable with
``torch.load(weights_only=True)``): ``format = "latticeflow-checkpoint"``, ``format_version = 1``,
``latticeflow_version``, ``torch_version``, ``theory``, ``lattice`` (list), ``architecture``,
``dtype``, ``action`` (the action card), ``recipe`` (:meth:`Recipe.to_dict`), ``model``
(state_dict; lattice independent), ``optimizer``, ``scheduler``, ``step``, ``rng`` (``train``:
training generator state, ``torch``: global CPU generator, ``cuda``: current CUDA generator when
trained on CUDA), ``ess`` (last measured ESS or None), ``ess_step``, ``skipped_steps``,
``wall_time`` (seconds of training so far), ``world_size`` (number of data-parallel processes;
absent in older checkpoints: 1); with ``world_size > 1``, ``rng["train_ranks"]`` holds every
rank's training generator state.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import latticeflow
from latticeflow.base.device import select_device, select_dtype
from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe, recipe_from_dict
from latticeflow.ensemble import sync_folder
from latticeflow.flows import DEFAULT_ARCHITECTURE, Flow, build_flow
from latticeflow.flows.multiscale import with_coarse_levels
from latticeflow.theories import Action, action_from_table

CHECKPOINT_FORMAT = "latticeflow-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"

#: Recipe keys that may change when resuming (they do not alter the training trajectory;
#: ``init_floor`` only decides the start, which a checkpoint has already taken).
RESUMABLE_CHANGES = ("name", "device", "training.steps", "training.ess_interval",
                     "training.ess_batch", "training.checkpoint_interval",
                     "training.max_bad_steps", "training.compile", "training.init_floor")
_RESUMABLE_SECTIONS = ("sampling.", "analysis.")
#: ``[flow]`` values of U(1) checkpoints written before the key existed: the flow they trained.
#: Without a ``prior`` key it trained on uniform links (a recipe that names no prior gets the
#: constructor's default, ``"plaquette"``, and its checkpoint stores it); without ``transform``
#: it had NCP maps, which do not read ``n_bins`` (the default stands in for it).
LEGACY_U1_ARCHITECTURE = {"prior": "uniform", "transform": "ncp",
                          "n_bins": DEFAULT_ARCHITECTURE["u1"]["n_bins"]}
#: φ⁴ checkpoints written before the Fourier base, spline couplings, ``z2`` and coarse levels:
#: the defaults (RealNVP on a normal base, splines without the Z₂ symmetrisation, no levels).
LEGACY_PHI4_ARCHITECTURE = {key: DEFAULT_ARCHITECTURE["phi4"][key] for key in
                            ("base", "fourier_terms", "transform", "n_bins", "spline_bound",
                             "z2", "coarse", "coarse_couplings", "heat_bath")}
#: ``[flow]`` keys that a run may add to the flow it starts from (``init_from``): coarse levels,
#: which start as the identity (:func:`latticeflow.flows.multiscale.with_coarse_levels`).
COARSE_KEYS = ("coarse", "coarse_couplings")
_CHECKPOINT_KEYS = ("theory", "lattice", "architecture", "dtype", "action", "recipe", "model",
                    "optimizer", "scheduler", "step", "rng", "ess", "ess_step", "skipped_steps",
                    "wall_time")


@dataclass
class LoadedFlow:
    """A trained flow from a checkpoint, ready for sampling (``flow`` is in eval mode).

    ``lattice`` is the lattice the flow was built for (the training lattice unless another was
    asked for); ``recipe`` is the training recipe; ``sha256`` the checkpoint file's digest;
    ``last_ess`` the last ESS measured during training (on the training lattice).
    """

    flow: Flow
    action: Action
    lattice: tuple[int, ...]
    recipe: Recipe
    step: int
    sha256: str
    last_ess: float | None

    def nmcmc_header(self, *, seed: int, sampler_params: dict[str, Any], store_dtype: str,
                     chains: bool) -> dict[str, Any]:
        """The :meth:`~latticeflow.ensemble.EnsembleWriter.create` arguments of a neural-MCMC
        ensemble of this flow (the header of DESIGN §6); ``chains``: store a chain column."""
        return {"theory": self.action.theory, "action_card": self.action.card(),
                "lattice": self.lattice, "field_shape": self.flow.field_shape,
                "sampler": "nmcmc", "seed": seed, "sampler_params": sampler_params,
                "checkpoint_sha256": self.sha256, "dtype": store_dtype, "chains": chains}


def checkpoint_path(path_or_run_dir: str | os.PathLike) -> Path:
    """The checkpoint file itself, or ``<dir>/checkpoint.pt`` for a run directory."""
    path = Path(path_or_run_dir)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Load and validate a checkpoint file (on the CPU): ``(contents, sha256 of the file)``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LatticeflowError(f"{path}: no such checkpoint") from None
    except OSError as exc:
        raise LatticeflowError(f"{path}: cannot read checkpoint ({exc})") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle means: not a (complete) checkpoint
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LatticeflowError(f"{path}: not a latticeflow checkpoint (cannot be loaded: "
                               f"{first_line})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LatticeflowError(f"{path}: not a latticeflow checkpoint (no format marker "
                               f"{CHECKPOINT_FORMAT!r})")
    version = state.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise LatticeflowError(f"{path}: checkpoint format_version {version!r} is not supported "
                               f"(this latticeflow {latticeflow.__version__} reads version "
                               f"{CHECKPOINT_VERSION})")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise LatticeflowError(f"{path}: corrupt checkpoint (missing {', '.join(missing)})")
    return state, hashlib.sha256(raw).hexdigest()


def load_checkpoint(path_or_run_dir: str | os.PathLike, device: str | torch.device | None = None,
                    lattice: tuple[int, ...] | list[int] | None = None) -> LoadedFlow:
    """The trained flow of a checkpoint (file or run directory), for sampling.

    ``device``: None → CUDA when available, else CPU. ``lattice``: rebuild the flow on another
    lattice (the weights do not depend on the lattice size; it must suit the flow's masks).
    """
    path = checkpoint_path(path_or_run_dir)
    state, digest = read_checkpoint(path)
    recipe = recipe_from_dict(state["recipe"], source=str(path))
    device = device if isinstance(device, torch.device) else select_device(device or "auto")
    target = tuple(int(n) for n in (lattice if lattice is not None else state["lattice"]))
    flow = build_checkpoint_flow(state["theory"], target, state["architecture"], state["action"],
                                 path)
    flow.to(device=device, dtype=select_dtype(state["dtype"]))
    load_weights(flow, state["model"], path)
    return LoadedFlow(flow=flow.eval(), action=action_from_table(state["action"], str(path)),
                      lattice=target, recipe=recipe, step=int(state["step"]), sha256=digest,
                      last_ess=state["ess"])


def build_checkpoint_flow(theory: str, lattice: tuple[int, ...], architecture: dict[str, Any],
           action_params: Mapping[str, Any], source: str | os.PathLike) -> Flow:
    architecture = with_legacy_keys(theory, architecture)
    try:
        return build_flow(theory, lattice, architecture, action_params)
    except (ValueError, TypeError) as exc:
        raise LatticeflowError(f"{source}: cannot build the {theory} flow on lattice "
                               f"{lattice}: {exc}") from None


def load_weights(flow: Flow, model_state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        flow.load_state_dict(model_state)
    except RuntimeError as exc:
        raise LatticeflowError(f"{source}: the weights do not fit the flow "
                               f"({str(exc).splitlines()[0]})") from None


def atomic_save(state: dict[str, Any], path: Path, kept: str) -> None:
    """Write ``state`` to a temporary file, sync it to disk and rename it to ``path``; the
    rename is synced too. A failed write (disk full, ...) leaves ``path`` as it was and raises
    :class:`LatticeflowError`, whose message ends with ``kept`` (what remains, what to do)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # torch's zip writer raises RuntimeError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
                " ".join(str(exc).split()))
            raise LatticeflowError(f"{path}: writing the checkpoint failed ({reason}); "
                                   f"{kept}") from None
        sync_folder(path)
    finally:
        tmp.unlink(missing_ok=True)


def with_legacy_keys(theory: str, architecture: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's architecture (or recipe ``[flow]``) with the keys it predates filled in."""
    legacy = LEGACY_U1_ARCHITECTURE if theory == "u1" else LEGACY_PHI4_ARCHITECTURE
    return {**legacy, **architecture}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "action":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def refuse_other_recipe(state: dict[str, Any], recipe: Recipe, message: str) -> None:
    """The lineage check: refuse a checkpoint (contents ``state``) trained from another recipe
    than ``recipe``, i.e. one whose recipe differs in a key that changes the training
    trajectory (anything beyond :data:`RESUMABLE_CHANGES` and the sampling and analysis
    sections). Raises :class:`LatticeflowError` with ``message``, whose ``{differences}``
    becomes the differing keys, ``"key (old → new); ..."``."""
    old_recipe = {**state["recipe"], "flow": with_legacy_keys(
        state["theory"], state["recipe"].get("flow", {}))}
    old, new = _flatten(old_recipe), _flatten(recipe.to_dict())
    differences = [f"{key} ({old.get(key)!r} → {new.get(key)!r})"
                   for key in sorted(set(old) | set(new))
                   if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES
                   and not key.startswith(_RESUMABLE_SECTIONS)]
    if differences:
        raise LatticeflowError(message.replace("{differences}", "; ".join(differences)))


def check_resumable(state: dict[str, Any], recipe: Recipe, world_size: int,
                     path: Path) -> None:
    """Refuse to resume checkpoint ``path`` (contents ``state``) with ``recipe`` and
    ``world_size`` processes when the recipe differs beyond :data:`RESUMABLE_CHANGES` or the
    number of processes differs."""
    refuse_other_recipe(
        state, recipe, f"cannot resume {path}: the recipe differs from the one it was "
                       f"trained with in {{differences}}. Use --force to start over, or "
                       f"--init-from with a new output directory to start from its weights")
    trained_with = int(state.get("world_size", 1))
    if trained_with != world_size:
        raise LatticeflowError(
            f"cannot resume {path}: it was trained with {trained_with} "
            f"process(es) and this run has {world_size}; the per-rank random streams "
            f"and the global batch would differ. Resume with the same number of processes "
            f"(torchrun --nproc_per_node={trained_with}), or start a new run from its "
            f"weights with --init-from")


def check_init_from(state: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """Refuse the weights of checkpoint ``path`` (contents ``state``) as the start of a run of
    ``recipe`` unless theory and architecture are the same (the lattice may differ), or the
    recipe only adds coarse levels (:func:`adds_coarse_levels`)."""
    if state["theory"] != recipe.theory:
        raise LatticeflowError(f"--init-from {path}: the checkpoint is a {state['theory']} "
                               f"flow, the recipe trains a {recipe.theory} flow")
    ours = recipe.architecture_dict()
    theirs = with_legacy_keys(state["theory"], state["architecture"])
    if not can_start_from(theirs, ours):
        diff = ", ".join(f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}"
                         for k in sorted(set(ours) | set(theirs)) if theirs.get(k) != ours.get(k))
        raise LatticeflowError(f"--init-from {path}: architecture differs from the "
                               f"recipe's [flow] ({diff})")


def _plain(arch: Mapping[str, Any], without: tuple[str, ...] = ()) -> dict[str, Any]:
    """An architecture with sequences as lists (recipes hold tuples, checkpoints lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()
            if k not in without}


def adds_coarse_levels(parent: Mapping[str, Any], child: Mapping[str, Any]) -> bool:
    """Whether the φ⁴ architecture ``child`` is ``parent`` (which has no coarse levels) with
    coarse levels added, and otherwise the same."""
    return (not parent.get("coarse") and bool(child.get("coarse"))
            and _plain(parent, COARSE_KEYS) == _plain(child, COARSE_KEYS))


def can_start_from(parent: Mapping[str, Any], child: Mapping[str, Any]) -> bool:
    """Whether a flow of architecture ``child`` may start from weights of architecture
    ``parent``: the same architecture, or the same with coarse levels added."""
    return _plain(parent) == _plain(child) or adds_coarse_levels(parent, child)


def inherited_weights(model: dict[str, torch.Tensor], parent: Mapping[str, Any],
                      child: Mapping[str, Any], fresh: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """The weights ``model`` of a flow of architecture ``parent`` for a flow of architecture
    ``child`` (fresh weights ``fresh``): as they are, or with identity coarse levels where
    ``child`` adds them (:func:`adds_coarse_levels`)."""
    if not adds_coarse_levels(parent, child):
        return model
    return with_coarse_levels(model, fresh, int(child["base"] == "fourier"),
                              len(child["coarse"]))


def initial_weights(state: dict[str, Any], recipe: Recipe, fresh: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """The weights a run of ``recipe`` starts from, out of checkpoint contents ``state`` (passed
    by :func:`check_init_from`); ``fresh``: the recipe's own fresh start."""
    return inherited_weights(state["model"],
                             with_legacy_keys(state["theory"], state["architecture"]),
                             recipe.architecture_dict(), fresh)


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "CHECKPOINT_VERSION", "LoadedFlow",
           "RESUMABLE_CHANGES", "checkpoint_path", "load_checkpoint", "read_checkpoint",
           "refuse_other_recipe"]
