"""The tests' runtime annotation checks (tests/shape_checks.py) are on, and judge calls as documented there."""

from __future__ import annotations

import pytest
import shape_checks
import torch
from jaxtyping import TypeCheckError

from workbench import padding
from workbench.errors import InputError

pytestmark = pytest.mark.skipif(not shape_checks.enabled(), reason="WORKBENCH_TYPECHECK=0: the checks are off")


def test_every_workbench_function_is_checked():
    assert hasattr(padding.last_positions, "__wrapped__")
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert padding.last_positions(mask).tolist() == [1, 0]


def test_a_shape_the_annotation_excludes_and_the_function_accepts_fails():
    """gather_last's mask must be [batch pos] of x's batch and pos; the code would index with any mask."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeCheckError, match="gather_last"):
        padding.gather_last(x, torch.ones(2, 2, dtype=torch.bool))  # pos 2, not 3: indexes x all the same
    with pytest.raises(TypeCheckError, match="last_positions"):
        padding.last_positions(torch.ones(2, 3))  # floats where booleans belong: accepted by the code


def test_a_value_the_function_refuses_itself_gives_its_own_error():
    """A float attention mask is outside the annotation and check_attention_mask refuses it in its own words."""
    with pytest.raises(InputError, match="booleans or 0/1 integers"):
        padding.check_attention_mask(torch.ones(1, 3) * 0.5, torch.zeros(1, 3, dtype=torch.long))
