"""Initialisation as the reference implementations do it (docs/design.md §1, "Initialisation"): each
parameter group of a freshly built CRATE and CRATE-α is drawn from the distribution that table
states, checked by its bounds and moments at the real widths."""

import math
import re

import numpy as np
import pytest
from flax import nnx

from crate_jax import models

NORMS = [(r".*norm\w*/scale", "constant", 1.0), (r".*norm\w*/bias", "constant", 0.0)]


def _params(name: str, **overrides) -> dict[str, np.ndarray]:
    model = models.create(name, seed=3, **overrides)
    return {k: np.asarray(v) for k, v in
            models.flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def _uniform(x: np.ndarray, bound: float, what: str) -> None:
    """U(±bound): inside the bound, reaching it, with std bound/√3 and mean 0."""
    assert np.abs(x).max() <= bound * (1 + 1e-6), what
    assert np.abs(x).max() > 0.97 * bound, what
    np.testing.assert_allclose(x.std(), bound / math.sqrt(3), rtol=0.05, err_msg=what)
    assert abs(x.mean()) < 5 * bound / math.sqrt(3 * x.size), what


def _normal(x: np.ndarray, std: float, what: str) -> None:
    """N(0, std²): its std, its mean and, for large groups, the normal's tails (4.55 % beyond
    2σ; a uniform of the same std has none beyond 1.73σ)."""
    np.testing.assert_allclose(x.std(), std, rtol=0.05 if x.size > 2000 else 0.3, err_msg=what)
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size), what
    if x.size > 2000:
        np.testing.assert_allclose(np.mean(np.abs(x) > 2 * std), 0.0455, atol=0.01,
                                   err_msg=what)


def _constant(x: np.ndarray, value: float, what: str) -> None:
    np.testing.assert_array_equal(x, np.full_like(x, value), err_msg=what)


CHECKS = {"uniform": _uniform, "normal": _normal, "constant": _constant}


def _check(params: dict, table: list[tuple[str, str, float]]) -> None:
    """Every parameter matches exactly one rule (a regular expression on its path)."""
    for path, x in params.items():
        rules = [(kind, arg) for pattern, kind, arg in table if re.fullmatch(pattern, path)]
        assert len(rules) == 1, (path, rules)
        kind, arg = rules[0]
        CHECKS[kind](x, arg, path)


def test_crate_as_its_pytorch_reference():
    """nn.Linear defaults U(±1/√fan_in), weight and bias, for the stem Linear, the MSSA
    projections and the head; ISTA's W kaiming-uniform U(±√(6/d)); cls and position table
    torch.randn; LayerNorms 1 and 0."""
    d, patch_dim = 384, 16 * 16 * 3
    _check(_params("crate-t/16", depth=2), [
        (r"stem/proj/(kernel|bias)", "uniform", patch_dim ** -0.5),
        (r".*attn/(proj|out|out_bias)", "uniform", d ** -0.5),
        (r".*sparse/weight", "uniform", math.sqrt(6 / d)),
        (r"head/(kernel|bias)", "uniform", d ** -0.5),
        (r"cls|posemb/embedding", "normal", 1.0),
        *NORMS,
    ])


@pytest.mark.parametrize("patch", [16, 8])
def test_crate_alpha_as_its_jax_reference(patch):
    """MSSA projections N(0, 0.02); D and D1 kaiming-uniform over d; conv stem kaiming-uniform
    over P·P·3 with a zero bias; cls N(0, 1e-6); learned position table N(0, 0.02); head
    N(0, 0.02) with a zero bias; LayerNorms 1 and 0."""
    d = 192
    _check(_params(f"crate-alpha-ti/{patch}", depth=2), [
        (r".*attn/(proj|out)", "normal", 0.02),
        (r".*sparse/D1?", "uniform", math.sqrt(6 / d)),
        (r"stem/kernel", "uniform", math.sqrt(6 / (patch * patch * 3))),
        (r"stem/bias|head/bias", "constant", 0.0),
        (r"cls", "normal", 1e-6),
        (r"posemb/embedding|head/kernel", "normal", 0.02),
        *NORMS,
    ])
