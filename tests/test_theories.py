import math

import pytest
import torch

from latticeflow.base.errors import ConfigError
from latticeflow.lattice import gauge_transform
from latticeflow.theories import (
    Phi4,
    Phi4Hopping,
    U1Wilson,
    action_from_table,
    hopping_to_standard,
    load_action_card,
    standard_to_hopping,
)

ACTIONS = [
    (Phi4(-4.0, 8.0), (3, 4, 6)),
    (Phi4(0.7, 0.3), (3, 3, 4, 5)),
    (Phi4Hopping(0.3, 0.022), (3, 4, 6)),
    (U1Wilson(2.5), (3, 2, 4, 6)),
]


@pytest.mark.parametrize(("action", "shape"), ACTIONS)
def test_force_is_minus_gradient(action, shape):
    x = torch.randn(shape, requires_grad=True)
    (grad,) = torch.autograd.grad(action(x).sum(), x)
    torch.testing.assert_close(action.force(x), -grad, rtol=1e-12, atol=1e-12)


def test_phi4_hand_computed_2x2():
    # φ = [[1, 2], [3, 4]]: Σ_x Σ_μ (φ(x+μ̂) − φ(x))² = 16 (axis 0) + 4 (axis 1) = 20,
    # Σ φ² = 30, Σ φ⁴ = 354, so S = 20 − 4·30 + 8·354 = 2732.
    phi = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert Phi4(-4.0, 8.0)(phi).item() == pytest.approx(2732.0, abs=1e-12)
    # Hopping form at κ = 0.5, λ = 0.25: −2κ Σ φφ(x+μ̂) = −(2·(1·3+2·4) + 2·(1·2+3·4)) = −50,
    # (1 − 2λ) Σ φ² = 15, λ Σ φ⁴ = 88.5, S = 53.5.
    assert Phi4Hopping(0.5, 0.25)(phi).item() == pytest.approx(53.5, abs=1e-12)


def test_u1_hand_computed_3x3():
    # A single non-zero link θ₀(0,0) = a enters P(0,0) with +1 and P(0,2) with −1:
    # S = −β (7 + 2 cos a).
    a, beta = 0.7, 1.3
    links = torch.zeros(1, 2, 3, 3)
    links[0, 0, 0, 0] = a
    assert U1Wilson(beta)(links).item() == pytest.approx(-beta * (7 + 2 * math.cos(a)), abs=1e-12)


def test_u1_gauge_invariance():
    links = 2 * math.pi * torch.rand(4, 2, 6, 4)
    alpha = 2 * math.pi * torch.rand(4, 6, 4)
    action = U1Wilson(3.0)
    transformed = gauge_transform(links, alpha)
    assert not torch.allclose(transformed, links)
    torch.testing.assert_close(action(transformed), action(links), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_phi4_forms_agree_after_mapping(d):
    kappa, lam_hat = 0.3, 0.022
    m2, lam, scale = hopping_to_standard(kappa, lam_hat, d)
    x = torch.randn((5,) + (4,) * d)
    torch.testing.assert_close(Phi4(m2, lam)(scale * x), Phi4Hopping(kappa, lam_hat)(x),
                               rtol=1e-12, atol=1e-10)
    back = standard_to_hopping(m2, lam, d)
    assert back[0] == pytest.approx(kappa, rel=1e-12)
    assert back[1] == pytest.approx(lam_hat, rel=1e-12)
    assert back[2] == pytest.approx(1 / scale, rel=1e-12)


def test_shipped_cards_load():
    from pathlib import Path

    cards = sorted((Path(__file__).parent.parent / "actions").glob("*.toml"))
    assert len(cards) >= 8
    actions = {card.stem: load_action_card(card) for card in cards}
    assert actions["phi4_m2-4_lam8"].params() == {"form": "standard", "m2": -4.0, "lam": 8.0}
    assert {a.beta for a in actions.values() if isinstance(a, U1Wilson)} >= {1, 2, 3, 4, 6}
    for action in actions.values():
        assert repr(action_from_table(action.card())) == repr(action)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('theory = "u1"\nbeta = -1.0\n', "beta", "must be >="),
        ('theory = "u1"\nbeta = nan\n', "beta", "finite"),
        ('theory = "u1"\nbeta = "two"\n', "beta", "expected a number"),
        ('theory = "u1"\nbeta = 2.0\ncolour = 3\n', "colour", "unknown key"),
        ('theory = "phi4"\nm2 = 1.0\n', "lam", "missing"),
        ('theory = "phi4"\nform = "hopping"\nkappa = 0.0\nlam = 0.1\n', "kappa", "must be >"),
        ('theory = "su3"\n', "theory", "must be one of"),
        ("theory = [u1\n", None, "malformed TOML"),
    ],
)
def test_bad_cards_name_file_and_key(tmp_path, text, key, problem):
    card = tmp_path / "card.toml"
    card.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_action_card(card)
    message = str(info.value)
    assert str(card) in message and problem in message
    if key:
        assert f": {key}:" in message


def test_missing_card(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_action_card(tmp_path / "nothing.toml")
