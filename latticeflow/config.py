"""Run recipes (``runs/*.toml``): TOML → validated, frozen dataclasses.

Everything is checked when the recipe is loaded, before any work starts; every error is a
:class:`~latticeflow.base.errors.ConfigError` naming the file and the key. Unknown keys are errors.
Relative paths are relative to the directory of the recipe file.

Recipe schema
-------------
Top level:

``name``     str, default: the file stem. Names the run (output directory ``<recipe dir>/<name>``).
``action``   path of an action card (``actions/*.toml``), or an inline table holding the card's
             keys; required. The card is validated by :func:`latticeflow.theories.load_action_card`.
``lattice``  list of positive ints, required. φ⁴ (RealNVP, checkerboard masks): 1 to 3 axes, every
             extent even. U(1): exactly 2 axes, extents divisible by 4 (``flows.MASK_PERIOD``).
``seed``     int >= 0, default 0: seeds weight initialisation and the training noise.
``device``   ``"auto"`` (default; CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
``dtype``    ``"float32"`` (default) or ``"float64"``.
``init_from`` path of another recipe (relative to this one), optional: a fresh run starts from
             the weights that recipe's run trained (its run directory ``<dir>/<name>``), and
             ``latticeflow run`` / ``train`` train that recipe first when it is not complete
             (:mod:`latticeflow.training.lineage`). Same theory and ``[flow]``; the lattice and
             the action parameters may differ.

``[flow]`` overrides keys of ``flows.DEFAULT_ARCHITECTURE[theory]``:
``n_couplings`` int >= 1 (0: the base alone, for the φ⁴ Fourier base, trainable, and the
U(1) plaquette prior, which has nothing to train: ``[training] steps = 0``); ``hidden`` list of
ints >= 1 (channels of the hidden convolutions; may be empty); ``kernel_size`` odd int >= 1, at
most the smallest lattice extent; ``activation`` one of ``flows.conditioner.ACTIVATIONS``;
``transform`` (the couplings' elementwise map; its choices depend on the theory, see below)
with ``n_bins`` int >= 2 (8, the spline's bins).
U(1) only (rejected for φ⁴): ``transform``: ``"ncp"`` (default: mixtures of tan-transforms,
``flows/ncp.py``) or ``"spline"`` (circular rational-quadratic splines, ``flows/spline.py``);
``n_mixture`` int >= 1 (6, NCP only) and ``loop_length`` int in 1..4
(the conditioner also sees the 1×k loops, k = 2..loop_length, through the updated links;
1 means plaquettes only; default 2) and ``prior``: ``"plaquette"`` (default: independent von
Mises plaquettes at the card's β, see ``flows/plaquette_prior.py``) or ``"uniform"`` (uniform
links). φ⁴ only (rejected for U(1)): ``transform``: ``"affine"`` (default) or ``"spline"``
(rational-quadratic spline couplings, ``flows/spline_coupling.py``) with ``spline_bound`` float
> 0 (3.0); ``base``: ``"normal"`` (default) or ``"fourier"`` (a learnable translation-invariant
Gaussian before the couplings, see ``flows/fourier.py``), ``fourier_terms`` int >= 1 (its
precision polynomial's terms, 3); ``z2`` bool (false): Z₂-equivariant spline couplings,
h(−x; −F) = −h(x; F), so that q(−φ) = q(φ) (``transform = "spline"`` only); ``coarse`` list of
ints ([]): coarse lattices C×…×C, increasing, each C even and dividing every extent, on whose
block means ``coarse_couplings`` int >= 1 (4) couplings of the same kind act after the base
(``flows/multiscale.py``); ``heat_bath`` bool (false): integrate the even sites out exactly;
the flow models the odd sites' marginal and sampling draws the even sites from their exact
conditional (``theories/phi4_sublattice.py``; 2 or more axes, reverse-KL estimators, coarse
blocks of an even number of sites). A map's own size
key (``n_mixture``, ``n_bins``, ``spline_bound``) is accepted, and unused, with the other map.

``[training]``:
``estimator``      one of ``estimators.ESTIMATORS``, default ``"reverse-fastpath"``.
``batch_size``     int > 0, default 256.
``steps``          int >= 0, default 1000: total number of optimiser steps of the run.
``optimizer``      ``"adam"`` (default) or ``"adamw"``.
``lr``             float > 0, default 1e-3: peak learning rate.
``weight_decay``   float >= 0, default 0.
``schedule``       ``"constant"`` (default) or ``"cosine"`` (from ``lr`` after warm-up to 0 at
                   ``steps``).
``warmup_steps``   int >= 0, default 0: linear warm-up from lr/warmup_steps to lr.
``grad_clip``      float > 0: clip the global gradient norm to this value; omitted: no clipping.
``ess_interval``   int >= 1, default 50: measure the ESS every this many steps.
``ess_batch``      int > 0, default 1024: samples per ESS measurement.
``checkpoint_interval``  int >= 1, default 500.
``data``           path of an HDF5 ensemble (DESIGN §6); required for the forward-* estimators
                   and rejected for the reverse ones. Must exist.
``reverse_weight`` float in [0, 1], default 0, forward estimators only: the loss is
                   (1 − w)·forward + w·(reverse-fastpath term on base noise).
``max_bad_steps``  int >= 1, default 20: consecutive non-finite steps before training gives up.
``init_floor``     bool, default true: a run started from another run's weights (``init_from``)
                   starts from them only when their ESS (on ``ess_batch`` fresh samples) is at
                   least that of this recipe's own fresh start (zero couplings: the base alone);
                   otherwise it starts fresh and logs why. False: always inherit.
``compile``        bool, default false: compile the couplings' conditioners and elementwise maps
                   with ``torch.compile`` (:mod:`latticeflow.flows.compile`); the same numbers
                   to float round-off, checkpoints unchanged. ``latticeflow train --compile``.

``[sampling]`` (``latticeflow sample`` / ``run``): ``n`` int > 0 (10000), ``batch_size`` int > 0
(1024), ``chunk`` int > 0 (1000, rows per ensemble append), ``chains`` int >= 1 (1), ``seed``
int >= 0 (top-level seed + 1).

``[analysis]``: ``thermalization`` int >= 0 (0), less than ``sampling.n``; ``plots`` bool (true).

:meth:`Recipe.to_dict` returns the fully resolved recipe in this same schema (defaults filled,
the action card inline, the data path absolute), so :func:`recipe_from_dict` of it rebuilds an
equal recipe (e.g. from a checkpoint, where files may have moved: there the data path is not
required to exist).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from latticeflow.base.errors import ConfigError
from latticeflow.base.toml_fields import Table, read_toml
from latticeflow.estimators import ESTIMATORS, direction
from latticeflow.flows import DEFAULT_ARCHITECTURE, MASK_PERIOD
from latticeflow.flows.conditioner import ACTIVATIONS
from latticeflow.flows.realnvp import BASES as PHI4_BASES
from latticeflow.flows.realnvp import TRANSFORMS as PHI4_TRANSFORMS
from latticeflow.flows.u1_equivariant import PRIORS as U1_PRIORS
from latticeflow.flows.u1_equivariant import TRANSFORMS as U1_TRANSFORMS
from latticeflow.theories import Action, action_from_table, load_action_card

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
DTYPE_NAMES = ("float32", "float64")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
#: ``[flow]`` keys of one theory's flow only, and each theory's choices of ``transform``.
_THEORY_FLOW_KEYS = {"u1": ("n_mixture", "loop_length", "prior"),
                     "phi4": ("base", "fourier_terms", "spline_bound", "z2", "coarse",
                              "coarse_couplings", "heat_bath")}
_TRANSFORMS = {"u1": U1_TRANSFORMS, "phi4": PHI4_TRANSFORMS}


@dataclass(frozen=True)
class TrainingConfig:
    """The ``[training]`` section (see the module docstring for meanings and defaults)."""

    estimator: str = "reverse-fastpath"
    batch_size: int = 256
    steps: int = 1000
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    ess_interval: int = 50
    ess_batch: int = 1024
    checkpoint_interval: int = 500
    data: Path | None = None
    reverse_weight: float = 0.0
    max_bad_steps: int = 20
    init_floor: bool = True
    compile: bool = False

    @property
    def direction(self) -> str:
        """"reverse" (training on base noise) or "forward" (training on ensemble data)."""
        return direction(self.estimator)


@dataclass(frozen=True)
class SamplingConfig:
    """The ``[sampling]`` section."""

    n: int = 10000
    batch_size: int = 1024
    chunk: int = 1000
    chains: int = 1
    seed: int = 1


@dataclass(frozen=True)
class AnalysisConfig:
    """The ``[analysis]`` section."""

    thermalization: int = 0
    plots: bool = True


@dataclass(frozen=True)
class Recipe:
    """A validated run recipe.

    ``action_card`` is the action card's table (as :meth:`Action.card` writes it) and
    ``architecture`` the complete flow architecture (defaults merged, ``hidden`` as a tuple).
    ``source`` is where the recipe was read from (a path, or e.g. ``"<checkpoint>"``) and
    ``base_dir`` the recipe file's directory; neither takes part in comparisons.
    """

    name: str
    action_card: MappingProxyType
    lattice: tuple[int, ...]
    architecture: MappingProxyType
    training: TrainingConfig
    sampling: SamplingConfig
    analysis: AnalysisConfig
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    init_from: str | None = None
    source: str = field(default="<recipe>", compare=False)
    base_dir: Path | None = field(default=None, compare=False)

    @property
    def theory(self) -> str:
        return str(self.action_card["theory"])

    def action(self) -> Action:
        """A fresh :class:`Action` from the card."""
        return action_from_table(dict(self.action_card), self.source)

    def architecture_dict(self) -> dict[str, Any]:
        """The architecture as plain keyword arguments of :func:`latticeflow.flows.build_flow`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.architecture.items()}

    def parent_recipe_path(self) -> Path | None:
        """The recipe named by ``init_from``, resolved against this recipe's directory."""
        if self.init_from is None:
            return None
        return ((self.base_dir or Path.cwd()) / self.init_from).resolve()

    def default_run_dir(self) -> Path:
        """``<recipe dir>/<name>`` (the current directory for recipes not read from a file)."""
        return (self.base_dir or Path.cwd()) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain TOML/JSON-serialisable data (no ``None`` values)."""
        training = {k: v for k, v in vars(self.training).items() if v is not None}
        if self.training.data is not None:
            training["data"] = str(self.training.data)
        chain = {} if self.init_from is None else {"init_from": self.init_from}
        return {
            "name": self.name, "action": dict(self.action_card), "lattice": list(self.lattice),
            "seed": self.seed, "device": self.device, "dtype": self.dtype, **chain,
            "flow": self.architecture_dict(), "training": training,
            "sampling": dict(vars(self.sampling)), "analysis": dict(vars(self.analysis)),
        }


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file.

    ``overrides`` maps dotted keys (``"training.steps"``, ``"device"``) to values; they replace
    the file's values before validation, so they are checked like the file's own.
    """
    path = Path(path)
    data = read_toml(path)
    if overrides:
        data = _apply_overrides(data, overrides, str(path))
    return _parse(data, str(path), path.resolve().parent, default_name=path.stem,
                  check_data=True)


def recipe_from_dict(data: dict[str, Any], source: str = "<checkpoint>") -> Recipe:
    """Rebuild a recipe from :meth:`Recipe.to_dict` output (the data file need not exist)."""
    return _parse(data, source, None, default_name=None, check_data=False)


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str
                     ) -> dict[str, Any]:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, value in overrides.items():
        *sections, name = key.split(".")
        table = data
        for section in sections:
            table = table.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(source, key, f"cannot override: {section} is not a table")
        table[name] = value
    return data


def _parse(data: dict[str, Any], source: str, base_dir: Path | None, *,
           default_name: str | None, check_data: bool) -> Recipe:
    top = Table(data, source)
    name = top.get("name", str, default_name if default_name is not None else ...)
    if not name or "/" in name or name in (".", ".."):
        raise top.error("name", f"must be a plain directory name, got {name!r}")
    action = _action(top, base_dir)
    lattice = _lattice(top, action.theory)
    seed = top.integer("seed", 0, low=0)
    device = top.get("device", str, "auto")
    if not _DEVICE_PATTERN.fullmatch(device):
        raise top.error("device", f"must be auto, cpu, cuda or cuda:N; got {device!r}")
    dtype = top.choice("dtype", DTYPE_NAMES, "float32")
    init_from = _init_from(top, base_dir, source)
    architecture = _architecture(top.sub("flow"), action.theory, lattice)
    training = _training(top.sub("training"), base_dir, check_data)
    if architecture.get("heat_bath") and training.direction == "forward":
        raise ConfigError(source, "training.estimator", "a heat_bath flow trains by reverse KL "
                                                        "(its target is the odd sites' marginal)")
    if architecture["n_couplings"] == 0 and architecture.get("prior") == "plaquette" and (
            training.steps):
        raise ConfigError(source, "training.steps", "must be 0: the plaquette prior alone "
                                                    "([flow] n_couplings = 0) has nothing to train")
    sampling = _sampling(top.sub("sampling"), seed)
    analysis = _analysis(top.sub("analysis"), sampling)
    top.finish()
    return Recipe(name=name, action_card=MappingProxyType(action.card()), lattice=lattice,
                  architecture=MappingProxyType(architecture), training=training,
                  sampling=sampling, analysis=analysis, seed=seed, device=device, dtype=dtype,
                  init_from=init_from, source=source, base_dir=base_dir)


def _init_from(top: Table, base_dir: Path | None, source: str) -> str | None:
    if not top.has("init_from"):
        return None
    value = top.get("init_from", str)
    if base_dir is not None:
        path = (base_dir / value).resolve()
        if not path.is_file():
            raise top.error("init_from", f"recipe {path} not found")
        if path == Path(source).resolve():
            raise top.error("init_from", "names the recipe itself")
    return value


def _action(top: Table, base_dir: Path | None) -> Action:
    value = top.get("action", (str, dict))
    if isinstance(value, dict):
        return action_from_table(value, f"{top.source}: action")
    if base_dir is None:
        raise top.error("action", "must be an inline action card here")
    path = base_dir / value
    if not path.is_file():
        raise top.error("action", f"action card {path} not found")
    return load_action_card(path)


def _lattice(top: Table, theory: str) -> tuple[int, ...]:
    value = top.get("lattice", list)
    if not value or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in value):
        raise top.error("lattice", f"must be a non-empty list of positive integers, got {value}")
    lattice = tuple(value)
    if theory == "phi4":
        if len(lattice) > 3:
            raise top.error("lattice", f"the φ⁴ flow supports 1 to 3 dimensions, got {lattice}")
        if any(n % 2 for n in lattice):
            raise top.error("lattice", f"the φ⁴ RealNVP flow (checkerboard masks) needs every "
                                       f"extent even, got {lattice}")
    elif len(lattice) != 2 or any(n % MASK_PERIOD for n in lattice):
        raise top.error("lattice", f"the U(1) flow needs a 2D lattice with extents divisible by "
                                   f"{MASK_PERIOD}, got {lattice}")
    return lattice


def _architecture(table: Table, theory: str, lattice: tuple[int, ...]) -> dict[str, Any]:
    defaults = DEFAULT_ARCHITECTURE[theory]
    for owner, keys in _THEORY_FLOW_KEYS.items():
        for key in keys:
            if theory != owner and table.has(key):
                raise table.error(key, f"only applies to the {owner} flow")
    arch: dict[str, Any] = {"n_couplings": table.integer("n_couplings", defaults["n_couplings"],
                                                         low=0)}
    hidden = table.get("hidden", list, defaults["hidden"])
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise table.error("hidden", f"must be a list of positive integers, got {hidden}")
    arch["hidden"] = tuple(hidden)
    kernel = table.integer("kernel_size", defaults["kernel_size"], low=1)
    if kernel % 2 == 0:
        raise table.error("kernel_size", f"must be odd, got {kernel}")
    if kernel > min(lattice):
        raise table.error("kernel_size", f"{kernel} exceeds the smallest lattice extent "
                                         f"{min(lattice)}")
    arch["kernel_size"] = kernel
    arch["activation"] = table.choice("activation", tuple(ACTIVATIONS), defaults["activation"])
    arch["transform"] = table.choice("transform", _TRANSFORMS[theory], defaults["transform"])
    arch["n_bins"] = table.integer("n_bins", defaults["n_bins"], low=2)
    if theory == "u1":
        arch["n_mixture"] = table.integer("n_mixture", defaults["n_mixture"], low=1)
        arch["loop_length"] = table.integer("loop_length", defaults["loop_length"], low=1,
                                            high=MASK_PERIOD)
        arch["prior"] = table.choice("prior", U1_PRIORS, defaults["prior"])
    else:
        arch["base"] = table.choice("base", PHI4_BASES, defaults["base"])
        arch["fourier_terms"] = table.integer("fourier_terms", defaults["fourier_terms"], low=1)
        arch["spline_bound"] = table.number("spline_bound", defaults["spline_bound"],
                                          low=0.0, low_open=True)
        arch["z2"] = table.get("z2", bool, defaults["z2"])
        if arch["z2"] and arch["transform"] != "spline":
            raise table.error("z2", 'true needs transform = "spline"')
        arch["coarse"] = _coarse_levels(table, lattice, kernel)
        arch["coarse_couplings"] = table.integer("coarse_couplings",
                                                 defaults["coarse_couplings"], low=1)
        arch["heat_bath"] = _heat_bath(table, lattice, arch["coarse"], defaults["heat_bath"])
    if arch["n_couplings"] == 0 and arch.get("base") != "fourier" and arch.get("prior") != (
            "plaquette"):
        raise table.error("n_couplings", "0 (a base without couplings) needs the phi4 base = "
                                         '"fourier" or the u1 prior = "plaquette"')
    table.finish()
    return arch


def _coarse_levels(table: Table, lattice: tuple[int, ...], kernel: int) -> tuple[int, ...]:
    """``[flow] coarse``: increasing even extents that divide every lattice extent."""
    levels = table.get("coarse", list, [])
    if any(isinstance(c, bool) or not isinstance(c, int) for c in levels):
        raise table.error("coarse", f"must be a list of integers, got {levels}")
    for c in levels:
        if c < 2 or c % 2 or any(n % c for n in lattice) or kernel // 2 > c:
            raise table.error("coarse", f"{c} is not a coarse extent of the lattice {lattice} "
                                        f"(even, dividing every extent, at least "
                                        f"{max(2, kernel // 2)})")
    if list(levels) != sorted(set(levels)):
        raise table.error("coarse", f"must increase from coarse to fine, got {levels}")
    return tuple(levels)


def _heat_bath(table: Table, lattice: tuple[int, ...], coarse: tuple[int, ...],
               default: bool) -> bool:
    """``[flow] heat_bath``: needs two or more axes and coarse blocks of an even volume."""
    value = table.get("heat_bath", bool, default)
    if value and len(lattice) < 2:
        raise table.error("heat_bath", f"needs a lattice of two or more axes, got {lattice}")
    for c in coarse if value else ():
        if all((n // c) % 2 for n in lattice):
            raise table.error("coarse", f"{c}: with heat_bath a coarse block must hold an even "
                                        f"number of sites (lattice {lattice})")
    return value


def _positive(table: Table, name: str, default: int) -> int:
    return table.integer(name, default, low=1)


def _training(table: Table, base_dir: Path | None, check_data: bool) -> TrainingConfig:
    d = TrainingConfig()
    estimator = table.choice("estimator", ESTIMATORS, d.estimator)
    forward = direction(estimator) == "forward"
    values: dict[str, Any] = {
        "estimator": estimator,
        "batch_size": _positive(table, "batch_size", d.batch_size),
        "steps": table.integer("steps", d.steps, low=0),
        "optimizer": table.choice("optimizer", OPTIMIZERS, d.optimizer),
        "lr": table.number("lr", d.lr, low=0.0, low_open=True),
        "weight_decay": table.number("weight_decay", d.weight_decay, low=0.0),
        "schedule": table.choice("schedule", SCHEDULES, d.schedule),
        "warmup_steps": table.integer("warmup_steps", d.warmup_steps, low=0),
        "grad_clip": table.number("grad_clip", None, low=0.0, low_open=True),
        "ess_interval": _positive(table, "ess_interval", d.ess_interval),
        "ess_batch": _positive(table, "ess_batch", d.ess_batch),
        "checkpoint_interval": _positive(table, "checkpoint_interval", d.checkpoint_interval),
        "reverse_weight": table.number("reverse_weight", d.reverse_weight, low=0.0, high=1.0),
        "max_bad_steps": _positive(table, "max_bad_steps", d.max_bad_steps),
        "init_floor": table.get("init_floor", bool, d.init_floor),
        "compile": table.get("compile", bool, d.compile),
    }
    data = table.get("data", str, None)
    if forward and data is None:
        raise table.error("data", f"missing: the {estimator} estimator trains on an HDF5 "
                                  f"ensemble; give its path")
    if not forward and data is not None:
        raise table.error("data", f"only forward-* estimators use data, not {estimator}")
    if not forward and values["reverse_weight"] != 0.0:
        raise table.error("reverse_weight", f"only applies to forward-* estimators, not "
                                            f"{estimator}")
    if data is not None:
        path = Path(data) if base_dir is None else (base_dir / data).resolve()
        if check_data and not path.is_file():
            raise table.error("data", f"ensemble file {path} not found")
        values["data"] = path
    table.finish()
    return TrainingConfig(**values)


def _sampling(table: Table, seed: int) -> SamplingConfig:
    d = SamplingConfig()
    config = SamplingConfig(
        n=_positive(table, "n", d.n), batch_size=_positive(table, "batch_size", d.batch_size),
        chunk=_positive(table, "chunk", d.chunk), chains=_positive(table, "chains", d.chains),
        seed=table.integer("seed", seed + 1, low=0))
    table.finish()
    return config


def _analysis(table: Table, sampling: SamplingConfig) -> AnalysisConfig:
    thermalization = table.integer("thermalization", 0, low=0)
    if thermalization >= sampling.n:
        raise table.error("thermalization", f"must be less than sampling.n = {sampling.n}, "
                                            f"got {thermalization}")
    config = AnalysisConfig(thermalization=thermalization, plots=table.get("plots", bool, True))
    table.finish()
    return config

