"""Run recipes: defaults, round trip, and errors that name the file and the key."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from latticeflow.base.errors import ConfigError
from latticeflow.config import load_recipe, recipe_from_dict
from latticeflow.flows import DEFAULT_ARCHITECTURE

REPO = Path(__file__).resolve().parent.parent
PHI4_CARD = 'theory = "phi4"\nform = "standard"\nm2 = -4.0\nlam = 8.0\n'
U1_CARD = 'theory = "u1"\nbeta = 2.0\n'


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "actions").mkdir()
    (tmp_path / "actions" / "phi4.toml").write_text(PHI4_CARD)
    (tmp_path / "actions" / "u1.toml").write_text(U1_CARD)
    (tmp_path / "runs").mkdir()
    (tmp_path / "data.h5").write_bytes(b"")  # existence is all the recipe checks
    return tmp_path / "runs"


def write(directory: Path, text: str, name: str = "recipe.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


PHI4 = 'action = "../actions/phi4.toml"\nlattice = [8, 8]\n'
U1 = 'action = "../actions/u1.toml"\nlattice = [8, 8]\n'


def test_defaults(recipe_dir: Path) -> None:
    recipe = load_recipe(write(recipe_dir, PHI4 + "seed = 7\n", "my_run.toml"))
    assert recipe.name == "my_run"
    assert recipe.theory == "phi4" and recipe.lattice == (8, 8)
    assert recipe.action().params() == {"form": "standard", "m2": -4.0, "lam": 8.0}
    assert recipe.architecture_dict() == DEFAULT_ARCHITECTURE["phi4"]
    assert recipe.training.estimator == "reverse-fastpath" and recipe.training.grad_clip is None
    assert recipe.sampling.seed == 8 and recipe.sampling.n == 10000
    assert recipe.analysis.thermalization == 0 and recipe.analysis.plots is True
    assert recipe.device == "auto" and recipe.dtype == "float32"
    assert recipe.default_run_dir() == recipe_dir.resolve() / "my_run"


def test_flow_overrides_merge_with_defaults(recipe_dir: Path) -> None:
    recipe = load_recipe(write(recipe_dir, U1 + "[flow]\nn_couplings = 8\nn_mixture = 3\n"
                                                     "loop_length = 1\n"))
    assert recipe.architecture_dict() == {**DEFAULT_ARCHITECTURE["u1"], "n_couplings": 8,
                                          "n_mixture": 3, "loop_length": 1}


def test_u1_spline_transform(recipe_dir: Path) -> None:
    recipe = load_recipe(write(recipe_dir, U1 + '[flow]\ntransform = "spline"\nn_bins = 6\n'))
    assert recipe.architecture_dict() == {**DEFAULT_ARCHITECTURE["u1"], "transform": "spline",
                                          "n_bins": 6}
    assert DEFAULT_ARCHITECTURE["u1"]["transform"] == "ncp"


def test_round_trip_through_dict(recipe_dir: Path) -> None:
    text = (U1 + 'name = "x"\nseed = 3\ndtype = "float64"\n[flow]\nhidden = [4, 4]\n'
            '[training]\nestimator = "forward-fastpath"\ndata = "../data.h5"\n'
            'reverse_weight = 0.25\ngrad_clip = 5.0\nschedule = "cosine"\n'
            '[sampling]\nn = 500\n[analysis]\nthermalization = 10\nplots = false\n')
    recipe = load_recipe(write(recipe_dir, text))
    data = recipe.to_dict()
    json.dumps(data)                      # JSON-serialisable, and no None (TOML has no null)
    assert "None" not in repr(data)
    assert data["training"]["data"] == str((recipe_dir.parent / "data.h5").resolve())
    assert recipe_from_dict(data) == recipe
    # the dict is itself a valid recipe table with an inline action card
    assert recipe_from_dict(json.loads(json.dumps(data))).to_dict() == data


def test_inline_action_table(recipe_dir: Path) -> None:
    recipe = load_recipe(write(recipe_dir, 'lattice = [4, 4]\n[action]\ntheory = "u1"\n'
                                           'beta = 3.0\n'))
    assert recipe.theory == "u1" and recipe.action().params() == {"beta": 3.0}


def test_overrides_are_validated(recipe_dir: Path) -> None:
    path = write(recipe_dir, PHI4)
    assert load_recipe(path, {"training.steps": 5, "device": "cpu"}).training.steps == 5
    with pytest.raises(ConfigError) as err:
        load_recipe(path, {"training.steps": -1})
    assert err.value.key == "training.steps"


ERRORS = [
    # (recipe text, key named in the error, a fragment of the problem)
    (PHI4 + "colour = 1\n", "colour", "unknown key"),
    (PHI4 + "[training]\nlearning_rate = 0.1\n", "training.learning_rate", "unknown key"),
    (PHI4 + "[sampling]\nn = 10\nbogus = 2\n", "sampling.bogus", "unknown key"),
    (PHI4 + '[training]\nbatch_size = "big"\n', "training.batch_size", "integer"),
    (PHI4 + "[training]\nbatch_size = 0\n", "training.batch_size", ">= 1"),
    (PHI4 + "[training]\nlr = 0\n", "training.lr", "> 0"),
    (PHI4 + "seed = -1\n", "seed", ">= 0"),
    ('action = "../actions/phi4.toml"\nlattice = [7, 8]\n', "lattice", "even"),
    ('action = "../actions/phi4.toml"\nlattice = [8, 0]\n', "lattice", "positive"),
    ('action = "../actions/phi4.toml"\nlattice = 8\n', "lattice", "list"),
    ('action = "../actions/u1.toml"\nlattice = [6, 8]\n', "lattice", "divisible by 4"),
    ('action = "../actions/u1.toml"\nlattice = [8, 8, 8]\n', "lattice", "2D"),
    ('action = "../actions/missing.toml"\nlattice = [8, 8]\n', "action", "not found"),
    ("lattice = [8, 8]\n", "action", "missing"),
    (PHI4 + '[training]\nestimator = "forward-standard"\n', "training.data", "missing"),
    (PHI4 + '[training]\ndata = "../data.h5"\n', "training.data", "only forward"),
    (PHI4 + '[training]\nestimator = "forward-standard"\ndata = "nope.h5"\n', "training.data",
     "not found"),
    (PHI4 + "[training]\nreverse_weight = 0.5\n", "training.reverse_weight", "forward"),
    (PHI4 + '[training]\nestimator = "reverse-magic"\n', "training.estimator", "one of"),
    (PHI4 + "[training]\ngrad_clip = -1.0\n", "training.grad_clip", "> 0"),
    (PHI4 + "[flow]\nn_mixture = 4\n", "flow.n_mixture", "u1"),
    (PHI4 + "[flow]\nloop_length = 2\n", "flow.loop_length", "u1"),
    (U1 + "[flow]\nloop_length = 5\n", "flow.loop_length", "4"),
    (U1 + '[flow]\ntransform = "affine"\n', "flow.transform", "ncp, spline"),
    (PHI4 + '[flow]\ntransform = "ncp"\n', "flow.transform", "affine, spline"),
    (U1 + "[flow]\nn_bins = 1\n", "flow.n_bins", "2"),
    (U1 + "[flow]\nspline_bound = 2.0\n", "flow.spline_bound", "phi4"),
    (U1 + "[flow]\nz2 = true\n", "flow.z2", "phi4"),
    (PHI4 + "[flow]\nz2 = true\n", "flow.z2", "spline"),
    (U1 + '[flow]\nn_couplings = 0\nprior = "uniform"\n', "flow.n_couplings", "plaquette"),
    (U1 + "[flow]\nn_couplings = 0\n", "training.steps", "nothing to train"),
    (PHI4 + "[training]\ninit_floor = 1\n", "training.init_floor", "boolean"),
    (PHI4 + "[flow]\nkernel_size = 4\n", "flow.kernel_size", "odd"),
    (PHI4 + "[flow]\nhidden = [8, -1]\n", "flow.hidden", "positive"),
    (PHI4 + '[flow]\nactivation = "swish"\n', "flow.activation", "one of"),
    (PHI4 + '[analysis]\nthermalization = 10\n[sampling]\nn = 10\n', "analysis.thermalization",
     "less than"),
    (PHI4 + 'dtype = "float16"\n', "dtype", "one of"),
    (PHI4 + 'device = "gpu"\n', "device", "auto, cpu"),
    (PHI4 + '[analysis]\nplots = "yes"\n', "analysis.plots", "boolean"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), ERRORS)
def test_errors_name_file_and_key(recipe_dir: Path, text: str, key: str, fragment: str) -> None:
    path = write(recipe_dir, text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert err.value.source == str(path)
    assert err.value.key == key
    assert fragment in err.value.problem
    assert str(path) in str(err.value) and key in str(err.value)


def test_bad_action_card_is_reported_with_its_own_file(recipe_dir: Path) -> None:
    (recipe_dir.parent / "actions" / "bad.toml").write_text('theory = "u1"\nbeta = -1.0\n')
    with pytest.raises(ConfigError) as err:
        load_recipe(write(recipe_dir, 'action = "../actions/bad.toml"\nlattice = [8, 8]\n'))
    assert err.value.source.endswith("bad.toml") and err.value.key == "beta"


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", sorted((REPO / "runs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.training.direction == "reverse"
    assert recipe.name == tomllib.loads(path.read_text()).get("name", path.stem)
